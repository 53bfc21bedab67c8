"""The object allow-list from the user's side: save-time messages, the decorator, allow_module."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import os
import pickle
import sys
import textwrap

import pytest
import torch

import async_ckpt
from async_ckpt import UnsafeObjectError
from async_ckpt.format import allow_list, objects
from async_ckpt.format.allow_list import is_allowed
from async_ckpt.format.objects import loads_object


@dataclasses.dataclass
class Config:
    lr: float = 1e-3
    layers: int = 2


class CallsAFunction:
    """Pickles as a call to a function: no allow-list entry could make that safe."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.fixture(autouse=True)
def fresh_allow_list(monkeypatch):
    """Every test starts from the built-in allow-list and leaves it as it was."""
    monkeypatch.setattr(allow_list, "_SAFE_GLOBALS", set(allow_list._SAFE_GLOBALS))
    monkeypatch.setattr(allow_list, "_ALLOWED_MODULES", set())


def _call(module: str, name: str, args: bytes = b")") -> bytes:
    """A pickle (protocol 4) that calls ``module.name`` with no arguments: what a
    hostile checkpoint would hold. ``args`` is the argument tuple's opcodes."""

    def text(s: str) -> bytes:
        raw = s.encode()
        return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + args + b"R."


_packages = itertools.count()


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """A package of the user's own on disk, with ``config`` imported and ``sneaky`` not."""
    name = f"acktest_pkg{os.getpid()}_{next(_packages)}"
    root = tmp_path / name
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "config.py").write_text(
        textwrap.dedent(
            """
            import dataclasses
            import enum
            from subprocess import Popen  # imported, not defined here
            from collections import OrderedDict

            @dataclasses.dataclass
            class Config:
                lr: float = 1e-3

                @dataclasses.dataclass
                class Inner:
                    depth: int = 1

            class Mode(enum.Enum):
                TRAIN = "train"

            def helper():
                raise AssertionError("a checkpoint called a function")
            """
        )
    )
    (root / "sub" / "specs.py").write_text(
        "import dataclasses\n\n@dataclasses.dataclass\nclass Spec:\n    width: int = 8\n"
    )
    marker = tmp_path / "imported"
    (root / "sneaky.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass Data:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    config = importlib.import_module(f"{name}.config")
    specs = importlib.import_module(f"{name}.sub.specs")
    yield name, config, specs, marker
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


# ------------------------------------------------------------------ save-time messages
def test_saving_a_class_that_is_not_allowed_says_what_to_do(ckpt_dir):
    with pytest.raises(UnsafeObjectError) as info:
        async_ckpt.save({"config": Config(), "w": torch.ones(2)}, checkpoint_id=ckpt_dir)
    message = str(info.value)
    assert message.startswith("cannot save 'config': test_allow_list.Config is not on the allow")
    assert "could not be loaded back" in message
    assert "Fix: async_ckpt.allow_class(Config)" in message
    assert "async_ckpt.allow_module('test_allow_list')" in message
    assert "refusing to load" not in message  # the load-side wording, wrong at save time
    assert not ckpt_dir.exists()
    async_ckpt.allow_class(Config)  # the one line the message gives
    async_ckpt.save({"config": Config(lr=0.5), "w": torch.ones(2)}, checkpoint_id=ckpt_dir)
    target = {"config": None, "w": torch.zeros(2)}
    async_ckpt.load(target, checkpoint_id=ckpt_dir)
    assert target["config"] == Config(lr=0.5)


def test_a_class_inside_an_allowed_container_is_named(ckpt_dir):
    with pytest.raises(UnsafeObjectError, match="this builtins.frozenset holds a test_allow_list"):
        async_ckpt.save({"s": frozenset([Config])}, checkpoint_id=ckpt_dir)


def test_an_object_that_pickles_as_a_function_call_is_not_offered_allow_class(ckpt_dir):
    with pytest.raises(UnsafeObjectError, match=r"getcwd \(a builtin_function_or_method, not a c"):
        async_ckpt.save({"c": CallsAFunction()}, checkpoint_id=ckpt_dir)
    with pytest.raises(UnsafeObjectError) as info:
        async_ckpt.save({"c": CallsAFunction()}, checkpoint_id=ckpt_dir)
    assert "allow_class" not in str(info.value) and "allow_global" not in str(info.value)


def test_the_load_side_message_is_unchanged(ckpt_dir, monkeypatch):
    async_ckpt.allow_class(Config)
    async_ckpt.save({"config": Config()}, checkpoint_id=ckpt_dir)
    monkeypatch.setattr(
        allow_list, "_SAFE_GLOBALS", set(allow_list._SAFE_GLOBALS) - {("test_allow_list", "Config")}
    )  # as in a process that did not allow it
    with pytest.raises(UnsafeObjectError) as info:
        async_ckpt.load({"config": None}, checkpoint_id=ckpt_dir)
    assert "refusing to load test_allow_list.Config from a checkpoint object entry" in str(
        info.value
    )
    assert "allow_global('test_allow_list', 'Config') before loading." in str(info.value)


# ---------------------------------------------------------------------- allow_class
def test_allow_class_is_a_decorator_returning_the_class(user_pkg):
    name, config, _, _ = user_pkg
    ns: dict = {"__name__": f"{name}.config"}
    exec(  # a decorated class, defined where pickle finds it
        "import dataclasses, async_ckpt\n"
        "@async_ckpt.allow_class\n@dataclasses.dataclass\nclass Decorated:\n    x: int = 1\n",
        ns,
    )
    cls = ns["Decorated"]
    config.Decorated = cls
    assert dataclasses.is_dataclass(cls) and cls.__name__ == "Decorated"
    assert is_allowed(f"{name}.config", "Decorated")
    assert loads_object(objects.dumps_object(cls(7))) == cls(7)
    assert async_ckpt.allow_class(Config) is Config


@pytest.mark.parametrize("thing", [os.system, eval, "pkg.Config", Config()], ids=repr)
def test_allow_class_takes_classes_only(thing):
    before = set(allow_list._SAFE_GLOBALS)
    with pytest.raises(UnsafeObjectError, match="allow_class takes a class"):
        async_ckpt.allow_class(thing)
    assert allow_list._SAFE_GLOBALS == before


# --------------------------------------------------------------------- allow_module
def test_allow_module_allows_the_classes_of_a_package(user_pkg, ckpt_dir):
    name, config, specs, _ = user_pkg
    state = {
        "config": config.Config(lr=0.1),
        "inner": config.Config.Inner(3),
        "mode": config.Mode.TRAIN,
        "spec": specs.Spec(16),
    }
    with pytest.raises(UnsafeObjectError, match=rf"allow_module\('{name}'\)"):
        async_ckpt.save(state, checkpoint_id=ckpt_dir)
    before = set(allow_list._SAFE_GLOBALS)
    async_ckpt.allow_module(name)
    async_ckpt.save(state, checkpoint_id=ckpt_dir)
    target = dict.fromkeys(state)
    async_ckpt.load(target, checkpoint_id=ckpt_dir)
    assert target == state
    assert allow_list._SAFE_GLOBALS == before  # a prefix, not one entry per class
    assert not is_allowed(name + "_evil.config", "Config")  # a prefix is whole components


def test_allow_module_takes_a_module_object_and_a_subpackage(user_pkg):
    name, config, specs, _ = user_pkg
    async_ckpt.allow_module(sys.modules[f"{name}.sub"])
    assert is_allowed(f"{name}.sub.specs", "Spec")
    assert not is_allowed(f"{name}.config", "Config")


def test_allow_module_never_allows_functions_or_imported_classes(user_pkg):
    name, config, _, _ = user_pkg
    async_ckpt.allow_module(name)
    module = f"{name}.config"
    assert loads_object(_call(module, "Config")) == config.Config()  # the payload works
    for attr in ("helper", "Popen", "OrderedDict", "dataclasses", "Config.__init__"):
        assert not is_allowed(module, attr)
        with pytest.raises(UnsafeObjectError, match=f"refusing to load {module}.{attr}"):
            loads_object(_call(module, attr, args=b"\x8c\x04true\x85"))


def test_allow_module_never_imports_a_module_a_checkpoint_names(user_pkg):
    name, _, _, marker = user_pkg
    async_ckpt.allow_module(name)
    payload = _call(f"{name}.sneaky", "Data")
    with pytest.raises(UnsafeObjectError, match="import .*sneaky first"):
        loads_object(payload)
    assert not marker.exists() and f"{name}.sneaky" not in sys.modules
    importlib.import_module(f"{name}.sneaky")  # the user imports it: now it loads
    assert type(loads_object(payload)).__name__ == "Data"


@pytest.mark.parametrize(
    "prefix",
    [
        "os",
        "subprocess",
        "builtins",
        "sys",
        "pickle",
        "importlib",
        "runpy",
        "ctypes",
        "multiprocessing.pool",
        "torch",
        "torch.nn",
        "numpy",
        "async_ckpt",
        "__main__",
        "",
        "a..b",
        "1pkg",
        "pkg.",
        3,
        None,
    ],
    ids=repr,
)
def test_allow_module_refuses_prefixes_that_are_not_the_users(prefix):
    with pytest.raises(UnsafeObjectError, match="allow_module"):
        async_ckpt.allow_module(prefix)
    assert allow_list._ALLOWED_MODULES == set()
    assert not is_allowed("os", "system") and not is_allowed("subprocess", "Popen")


def test_an_os_system_payload_stays_refused_whatever_the_user_allowed(user_pkg, tmp_path):
    name, _, _, _ = user_pkg
    async_ckpt.allow_module(name)
    async_ckpt.allow_class(Config)
    proof = tmp_path / "proof"
    payload = pickle.dumps(_Reduce(os.system, f"touch {proof}"), protocol=4)
    with pytest.raises(UnsafeObjectError, match=r"refusing to load (posix|os)\.system"):
        loads_object(payload)
    assert not proof.exists()


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)
