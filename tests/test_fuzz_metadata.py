"""Fuzzing the metadata decoder: whatever the bytes, Metadata or MetadataError, nothing else.

The metadata file is the one piece of a checkpoint a loader must parse before it
knows anything, so it is where hostile or damaged input arrives first. Three
generators feed ``decode_metadata``: random bytes, random JSON (with and
without the right format header), and mutations of a valid document (fields
dropped, replaced, retyped, given extreme integers, unknown fields added).
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_ckpt import CheckpointError, MetadataError
from async_ckpt.format.decode import decode_metadata
from async_ckpt.format.metadata import (
    Chunk,
    Metadata,
    ObjectEntry,
    TensorEntry,
    ValueEntry,
    encode_metadata,
)
from async_ckpt.format.objects import encode_plain
from async_ckpt.format.seal import seal_metadata

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same examples on every run: a failure here is reproducible
)


def valid_metadata() -> Metadata:
    """A document using every feature: chunked tensors, ndarray, values, objects, containers."""
    block = 4096
    files = {"abc123-r0-0.data": 3 * 4096 + 100, "abc123-r1-0.data": 8192, "abc123-r0-1.data": 64}
    w_chunks = (
        Chunk((0, 0), (2, 1024), "abc123-r0-0.data", 0, 8192, (1, 2)),
        Chunk((2, 0), (2, 1024), "abc123-r1-0.data", 0, 8192, (3, 4)),
    )
    entries = {
        "model.w": TensorEntry(("model", "w"), "float32", (4, 1024), w_chunks),
        "model.b": TensorEntry(
            ("model", "b"),
            "int64",
            (10,),
            (Chunk((0,), (10,), "abc123-r0-0.data", 8192, 80, (5,)),),
        ),
        "arr": TensorEntry(
            ("arr",),
            "uint8",
            (),
            (Chunk((), (), "abc123-r0-1.data", 0, 1, (6,)),),
            numpy=True,
        ),
        "optim.state.0.step": ValueEntry(("optim", "state", 0, "step"), encode_plain(7)),
        "lr": ValueEntry(("lr",), encode_plain(float("inf"))),
        "blob": ValueEntry(("blob",), encode_plain(b"\x00\xff")),
        "none": ValueEntry(("none",), encode_plain(None)),
        "obj": ObjectEntry(("obj",), "datetime.date", "abc123-r0-1.data", 1, 40, (7,)),
    }
    containers = {"": "dict", "model": "dict", "optim": "dict", "optim.state": "dict"}
    containers["optim.state.0"] = "dict"
    return Metadata(
        save_id="abc123",
        world_size=2,
        block_size=block,
        files=files,
        containers=containers,
        entries=entries,
        extra={"note": "fuzz"},
    )


VALID = json.loads(encode_metadata(valid_metadata()))


def sealed(doc: Any) -> bytes:
    """Compact JSON of ``doc``, its own checksum made to match (a forger's document), so
    that the decoder's structural checks are what the input meets."""
    data = json.dumps(doc, separators=(",", ":")).encode()
    try:
        return seal_metadata(data)
    except ValueError:
        return data  # no checksum field to seal


def decode_or_metadata_error(data: bytes) -> Metadata | None:
    """The property under test; returns the Metadata when the input was accepted."""
    try:
        meta = decode_metadata(data)
    except MetadataError:
        return None
    assert isinstance(meta, Metadata)
    return meta


def test_the_seed_document_is_valid_and_round_trips():
    meta = decode_metadata(sealed(VALID))
    assert meta == valid_metadata()
    assert issubclass(MetadataError, CheckpointError)


# ---------------------------------------------------------------------------- random input

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 4096, 2**31, 2**32, 2**62, 2**62 + 1, 2**63, 2**64])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["tensor", "ndarray", "value", "object", "dict", "list", "float32", "../x"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    decode_or_metadata_error(data)


@FUZZ
@given(json_values)
def test_random_json(doc):
    decode_or_metadata_error(json.dumps(doc).encode())


@FUZZ
@given(
    st.fixed_dictionaries(
        {"format": st.just("async_ckpt"), "version": st.just(1)},
        optional={name: json_values for name in VALID if name not in ("format", "version")},
    )
)
def test_random_json_behind_a_valid_header(doc):
    decode_or_metadata_error(sealed(doc))


# ---------------------------------------------------------------------------- mutations


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in a JSON document (the root excluded)."""
    found: list[tuple] = []
    if isinstance(node, (dict, list)):
        for key, child in node.items() if isinstance(node, dict) else enumerate(node):
            found.append((*prefix, key))
            found.extend(_paths(child, (*prefix, key)))
    return found


def _retyped(value: Any) -> list[Any]:
    """The same information in other JSON types."""
    out: list[Any] = [str(value), [value], {"value": value}, None, True]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out += [float(value), -value, value + 1, value - 1, value * 2**40]
    if isinstance(value, str):
        out += [value + "/x", "../" + value, "", ".", value.upper(), value + "\n", len(value)]
    if isinstance(value, list):
        out += [value[:-1], value + value, value[::-1], {str(i): v for i, v in enumerate(value)}]
    if isinstance(value, dict):
        out += [list(value.values()), {**value, "unknown": 1}, {}]
    return out


extreme_ints = st.sampled_from(
    [0, -1, 1, 2**31 - 1, 2**32, 2**61, 2**62, 2**62 + 1, 2**63, 2**64, 10**30, -(2**63)]
) | st.integers(min_value=-(2**64), max_value=2**64)


@st.composite
def mutated(draw) -> dict:
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = draw(st.sampled_from(["drop", "replace", "retype", "int", "add", "duplicate"]))
        if op == "drop":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(json_values)
        elif op == "retype":
            parent[key] = draw(st.sampled_from(_retyped(parent[key])))
        elif op == "int":
            parent[key] = draw(extreme_ints)
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        elif op == "add":
            parent.append(draw(json_values))
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        else:
            parent[f"{key}x"] = copy.deepcopy(parent[key])
    return doc


def _finite(node: Any) -> bool:
    if isinstance(node, float):
        return math.isfinite(node)
    if isinstance(node, dict):
        return all(_finite(v) for v in node.values())
    return all(_finite(v) for v in node) if isinstance(node, list) else True


@settings(FUZZ, max_examples=800)
@given(mutated())
def test_mutations_of_a_valid_document(doc):
    meta = decode_or_metadata_error(sealed(doc))
    if meta is None:
        return
    # Whatever was accepted is consistent: every range lies in its file ...
    for entry in meta.entries.values():
        for chunk in getattr(entry, "chunks", [entry] if hasattr(entry, "file") else []):
            assert chunk.offset + chunk.nbytes <= meta.files[chunk.file]
    # ... and survives a round trip (non-finite floats: see the xfail test below).
    if _finite(doc):
        assert decode_metadata(encode_metadata(meta)) == meta


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0))
def test_byte_level_damage_of_a_valid_file(patch, where):
    raw = bytearray(encode_metadata(valid_metadata()))
    at = where % len(raw)
    raw[at : at + len(patch)] = patch
    decode_or_metadata_error(bytes(raw))


@pytest.mark.parametrize("cut", [0, 1, 10, 100, -2, -1])
def test_truncations_of_a_valid_file(cut):
    raw = encode_metadata(valid_metadata())
    decode_or_metadata_error(raw[:cut])


# ---------------------------------------------------------------------------- found by fuzzing


def _with(change) -> bytes:
    doc = copy.deepcopy(VALID)
    change(doc)
    return sealed(doc)


@pytest.mark.parametrize("kind", [[1], {"a": 1}, 3, None])
def test_a_value_entry_whose_type_is_not_a_string(kind):
    """Was a TypeError (unhashable type) from ``decode_plain``; now a MetadataError."""
    data = _with(lambda doc: doc["entries"]["none"]["value"].update(type=kind))
    with pytest.raises(MetadataError, match="string 'type'"):
        decode_metadata(data)


@pytest.mark.parametrize("name", ["abc123-r0-1.data\n", "abc123\n"])
def test_a_trailing_newline_does_not_make_a_name_safe(name):
    """``re.match`` with ``$`` accepted ``"name\\n"``; names now must match in full."""

    def change(doc):
        if name.endswith(".data\n"):
            doc["files"][name] = doc["files"].pop("abc123-r0-1.data")
        else:
            doc["save_id"] = name

    with pytest.raises(MetadataError):
        decode_metadata(_with(change))


@pytest.mark.parametrize(
    "raw",
    [
        _with(lambda doc: doc["entries"]["lr"]["value"].update(value=float("nan"))),
        _with(lambda doc: doc.update(extra={"x": float("inf")})),
        _with(lambda doc: doc.update(version=True)),
        _with(lambda doc: doc.update(version=1.0)),
        seal_metadata(json.dumps(VALID, separators=(",", ":"))[:-1].encode() + b',"entries":{}}'),
    ],
    ids=["NaN-value", "Infinity-extra", "version-true", "version-1.0", "duplicate-key"],
)
def test_the_decoder_refuses_what_the_encoder_never_writes(raw):
    with pytest.raises(MetadataError):
        decode_metadata(raw)
