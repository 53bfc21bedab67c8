"""The storage backends that detection chooses from: built-in ones and plugins.

A backend is a :class:`StorageBackend` record. Detection tries, in order: the
local backend (plain paths, ``file://``), backends registered at run time with
:func:`register_backend`, backends installed as plugins through the entry-point
group :data:`ENTRY_POINT_GROUP`, and last the fsspec backend, which takes any
URL fsspec knows. A plugin for ``toy://`` therefore wins over fsspec, but
never over the local backend for plain paths.

An entry point names a ``StorageBackend`` or a callable returning one::

    [project.entry-points."async_ckpt.storage"]
    toy = "toy_storage:BACKEND"

A plugin that fails to load is skipped with a warning naming it; the other
backends are still found.
"""

from __future__ import annotations

import sys
import threading
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from .base import StorageReader, StorageRoot, StorageWriter
from .fsspec_backend import FsspecReader, FsspecRoot, FsspecWriter
from .local import FileSystemReader, FileSystemRoot, FileSystemWriter

ENTRY_POINT_GROUP = "async_ckpt.storage"


@dataclass(frozen=True)
class StorageBackend:
    """One storage backend: the classes that write, read and list its checkpoints.

    A backend handles the ids its writer's ``validate_checkpoint_id`` accepts
    (its reader decides for reads the same way). ``root`` lists and deletes the
    checkpoints under a root for ``CheckpointManager``; None: the manager
    cannot use this backend, plain save and load can.
    """

    name: str
    writer: type[StorageWriter]
    reader: type[StorageReader]
    root: type[StorageRoot] | None = None

    def __post_init__(self) -> None:
        for role, value, base in (
            ("writer", self.writer, StorageWriter),
            ("reader", self.reader, StorageReader),
            ("root", self.root or StorageRoot, StorageRoot),
        ):
            if not (isinstance(value, type) and issubclass(value, base)):
                raise TypeError(
                    f"storage backend {self.name!r}: {role} must be a {base.__name__} "
                    f"subclass, not {value!r}"
                )


LOCAL = StorageBackend("local", FileSystemWriter, FileSystemReader, FileSystemRoot)
FSSPEC = StorageBackend("fsspec", FsspecWriter, FsspecReader, FsspecRoot)

_lock = threading.RLock()  # reentrant: a plugin module may register while it loads
_registered: list[StorageBackend] = []
# Plugins found on one sys.path: entry points are looked up again when it changes.
_plugins: tuple[tuple[str, ...], list[StorageBackend]] | None = None


def register_backend(backend: StorageBackend) -> None:
    """Add ``backend`` to detection, after the local backend and before fsspec.

    One registered earlier under the same name is replaced.
    """
    if not isinstance(backend, StorageBackend):
        raise TypeError(f"register_backend takes a StorageBackend, not {backend!r}")
    with _lock:
        _registered[:] = [b for b in _registered if b.name != backend.name] + [backend]


def backends() -> list[StorageBackend]:
    """Every backend in the order detection tries them."""
    with _lock:
        return [LOCAL, *_registered, *_plugin_backends(), FSSPEC]


def _plugin_backends() -> list[StorageBackend]:
    global _plugins
    key = tuple(sys.path)
    with _lock:
        if _plugins is None or _plugins[0] != key:
            _plugins = (key, _load_plugins())
        return _plugins[1]


def _load_plugins() -> list[StorageBackend]:
    found = []
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        try:
            found.append(_load(point))
        except Exception as exc:  # a broken plugin must not hide the other backends
            warnings.warn(
                f"ignoring storage backend plugin {point.name!r} ({point.value}) of entry-point "
                f"group {ENTRY_POINT_GROUP!r}: {type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
    return found


def _load(point: EntryPoint) -> StorageBackend:
    target = point.load()
    backend = target() if callable(target) else target
    if not isinstance(backend, StorageBackend):
        raise TypeError(f"{point.value} is neither a StorageBackend nor a callable returning one")
    return backend
