"""Stager options: sizes as strings, and bad values refused where they are written."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

import async_ckpt
from async_ckpt import AsyncCheckpointer, CheckpointError, Stager, StagerOptions
from async_ckpt.staging import parse_size
from async_ckpt.staging.options import InvalidOptionError

KiB = 1 << 10


@pytest.fixture(autouse=True)
def _no_option_env(monkeypatch):
    """The developer's ASYNC_CKPT_* settings must not change what these tests see."""
    for f in dataclasses.fields(StagerOptions):
        monkeypatch.delenv(f"ASYNC_CKPT_{f.name.upper()}", raising=False)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("64KiB", 64 * KiB),
        ("64k", 64 * KiB),
        (" 2 GiB ", 2 << 30),
        ("100MB", 100 * 10**6),
        ("1048577", 1048577),
        ("1.5KiB", 1536),
        ("0", 0),
        ("9007199254740993", 9007199254740993),  # 2**53 + 1: exact, not through a float
        ("1.1TiB", int(11 * (1 << 40) / 10)),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("field", ["max_staging_bytes", "wave_bytes"])
def test_sizes_accept_strings_everywhere(field):
    assert getattr(StagerOptions(**{field: "64KiB"}), field) == 64 * KiB
    assert getattr(StagerOptions.from_env(**{field: "1MiB"}), field) == 1 << 20
    stager = Stager(**{field: "128KiB"})
    assert getattr(stager.options, field) == 128 * KiB
    assert type(getattr(stager.options, field)) is int  # read back, always an int
    opts = StagerOptions()
    setattr(opts, field, "2MiB")  # assignment is checked and converted too
    assert getattr(opts, field) == 2 << 20
    assert getattr(StagerOptions(**{field: 1e6}), field) == 1_000_000  # a whole float


def test_a_size_string_budget_saves_in_waves_and_loads_back(tmp_path):
    """The user's report: Stager(max_staging_bytes="64KiB") failed inside save()."""
    gen = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(160, 256, generator=gen), "b": torch.randn(300, generator=gen)}
    stager = Stager(max_staging_bytes="64KiB", num_buffers=2)
    with AsyncCheckpointer(executor="thread", stager=stager) as ckpt:
        ckpt.save(state, checkpoint_id=tmp_path / "c").result(timeout=60)
        assert 0 < sum(a.nbytes for a in stager.arenas) <= 64 * KiB  # 160 KiB in waves
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    async_ckpt.load(got, checkpoint_id=tmp_path / "c")
    assert all(torch.equal(got[k], state[k]) for k in state)


BAD = [
    ("max_staging_bytes", -1, "cannot be negative"),
    ("max_staging_bytes", "-64KiB", "cannot read"),
    ("max_staging_bytes", "lots", "cannot read"),
    ("max_staging_bytes", "64 furlongs", "cannot read"),
    ("max_staging_bytes", "", "cannot read"),
    ("max_staging_bytes", True, "not a bool"),
    ("max_staging_bytes", None, "not NoneType"),
    ("max_staging_bytes", [64], "not list"),
    ("max_staging_bytes", 1.5, "whole number"),
    ("max_staging_bytes", math.nan, "whole number"),
    ("wave_bytes", math.inf, "whole number"),
    ("wave_bytes", False, "not a bool"),
    ("wave_bytes", -5, "cannot be negative"),
    ("wave_bytes", b"64KiB", "not bytes"),
    ("num_buffers", 0, "at least 1"),
    ("num_buffers", "2", "must be an int"),
    ("num_buffers", True, "must be an int"),
    ("copy_threads", -1, "at least 0"),
    ("copy_threads", 2.0, "must be an int"),
    ("async_staging", 1, "True or False"),
    ("pin_memory", "yes", "True or False"),
]


@pytest.mark.parametrize("field,value,words", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_values_are_refused_at_construction_naming_the_option(field, value, words):
    for build in (
        lambda: StagerOptions(**{field: value}),
        lambda: StagerOptions.from_env(**{field: value}),
        lambda: Stager(**{field: value}),
    ):
        with pytest.raises(InvalidOptionError, match=words) as info:
            build()
        assert field in str(info.value)
        assert isinstance(info.value, ValueError) and isinstance(info.value, CheckpointError)
    opts = StagerOptions()
    with pytest.raises(InvalidOptionError, match=field):
        setattr(opts, field, value)
    assert getattr(opts, field) == getattr(StagerOptions(), field)  # left as it was


def test_unknown_options_are_refused_with_a_suggestion():
    with pytest.raises(InvalidOptionError, match="did you mean 'max_staging_bytes'"):
        Stager(max_staging_byte="64KiB")
    with pytest.raises(InvalidOptionError, match="unknown stager option 'wave_size'"):
        StagerOptions.from_env(wave_size=1)
    opts = StagerOptions()
    with pytest.raises(InvalidOptionError, match="did you mean 'num_buffers'"):
        opts.num_buffer = 2  # type: ignore[attr-defined]
    with pytest.raises(TypeError):  # the constructor's own signature
        StagerOptions(num_buffer=2)  # type: ignore[call-arg]


def test_a_budget_too_small_for_the_buffers_is_refused_at_construction():
    with pytest.raises(InvalidOptionError, match=r"max_staging_bytes=100 .*at least 128"):
        Stager(max_staging_bytes=100, num_buffers=2)
    assert Stager(max_staging_bytes=128, num_buffers=2).options.max_staging_bytes == 128


def test_options_and_keywords_combine_without_changing_the_options():
    opts = StagerOptions(num_buffers=2, max_staging_bytes="1MiB")
    stager = Stager(opts, wave_bytes="256KiB", async_staging=True)
    assert (stager.options.num_buffers, stager.options.max_staging_bytes) == (2, 1 << 20)
    assert (stager.options.wave_bytes, stager.options.async_staging) == (256 * KiB, True)
    assert (opts.wave_bytes, opts.async_staging) == (0, False)  # the caller's object is untouched
    with pytest.raises(InvalidOptionError, match="wave_bytes"):
        Stager(opts, wave_bytes="a lot")


def test_stager_refuses_something_other_than_options():
    with pytest.raises(InvalidOptionError, match="takes a StagerOptions, not dict"):
        Stager({"max_staging_bytes": "64KiB"})  # type: ignore[arg-type]


def test_environment_values_are_checked_and_named(monkeypatch):
    monkeypatch.setenv("ASYNC_CKPT_WAVE_BYTES", "32KiB")
    monkeypatch.setenv("ASYNC_CKPT_ASYNC_STAGING", "on")
    monkeypatch.setenv("ASYNC_CKPT_NUM_BUFFERS", "2")
    opts = StagerOptions.from_env()
    assert (opts.wave_bytes, opts.async_staging, opts.num_buffers) == (32 * KiB, True, 2)
    monkeypatch.setenv("ASYNC_CKPT_PREFAULT", "off")
    assert StagerOptions.from_env().prefault is False
    for var, raw, words in [
        ("ASYNC_CKPT_MAX_STAGING_BYTES", "lots", "cannot read"),
        ("ASYNC_CKPT_ASYNC_STAGING", "maybe", "expected 1/true"),
        ("ASYNC_CKPT_NUM_BUFFERS", "two", "whole number"),
        ("ASYNC_CKPT_NUM_BUFFERS", "0", "at least 1"),
    ]:
        monkeypatch.setenv(var, raw)
        with pytest.raises(InvalidOptionError, match=words) as info:
            Stager()
        assert var in str(info.value)
        monkeypatch.delenv(var)
    # a keyword wins over the environment, whose (bad) value is then not read
    monkeypatch.setenv("ASYNC_CKPT_MAX_STAGING_BYTES", "lots")
    assert Stager(max_staging_bytes="1MiB").options.max_staging_bytes == 1 << 20


def test_options_stay_a_plain_dataclass():
    opts = StagerOptions(max_staging_bytes="1MiB", num_buffers=2)
    assert dataclasses.replace(opts, num_buffers=3).max_staging_bytes == 1 << 20
    assert opts == StagerOptions(max_staging_bytes=1 << 20, num_buffers=2)
    # the constructor's defaults are the fields' defaults
    params = inspect.signature(StagerOptions.__init__).parameters
    for f in dataclasses.fields(StagerOptions):
        assert params[f.name].default == f.default, f.name
    assert [f.name for f in dataclasses.fields(StagerOptions)] == list(params)[1:]
