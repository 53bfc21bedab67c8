"""One exception hierarchy, rooted at an ordinary Exception."""

from __future__ import annotations

import inspect

import async_ckpt
from async_ckpt import errors


def _error_classes() -> list[type]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == errors.__name__
    ]


def test_every_error_derives_from_checkpoint_error():
    classes = _error_classes()
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, errors.CheckpointError), cls
        assert issubclass(cls, Exception), cls


def test_checkpoint_error_is_caught_by_except_exception():
    assert errors.CheckpointError.__bases__ == (Exception,)
    try:
        raise errors.ChecksumMismatchError("boom")
    except Exception as exc:  # noqa: BLE001 - the point of the test
        caught = exc
    assert isinstance(caught, errors.CorruptCheckpointError)


def test_errors_double_as_the_builtin_they_refine():
    assert issubclass(errors.RankMismatchError, AssertionError)
    assert issubclass(errors.StorageDetectionError, RuntimeError)
    assert issubclass(errors.KeyMismatchError, KeyError)
    assert issubclass(errors.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(errors.CheckpointExistsError, FileExistsError)
    assert issubclass(errors.MissingBackendError, ImportError)
    assert issubclass(errors.MetadataError, errors.CorruptCheckpointError)


def test_every_error_is_exported_from_the_package():
    for cls in _error_classes():
        assert getattr(async_ckpt, cls.__name__) is cls
        assert cls.__name__ in async_ckpt.__all__


def test_key_mismatch_error_prints_its_message_not_a_repr():
    err = errors.KeyMismatchError("keys differ: 'a'", missing=["a"], unexpected=[])
    assert str(err) == "keys differ: 'a'"
    assert err.missing == ["a"] and err.unexpected == []
