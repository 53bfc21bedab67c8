"""Reading a local checkpoint directory: :class:`FileSystemReader`."""

from __future__ import annotations

import os
import stat
import threading

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError
from ..format.decode import MAX_METADATA_BYTES
from ..format.names import METADATA_FILE, is_safe_file_name
from .base import StorageReader
from .dcp_options import checkpoint_id_or_path
from .direct import PIECE
from .local_paths import _OPEN_READ, _local_path, _read_regular_file


class FileSystemReader(StorageReader):
    """Reads a checkpoint directory with positioned reads straight into tensor memory."""

    def __init__(
        self,
        checkpoint_id: str | os.PathLike | None = None,
        *,
        path: str | os.PathLike | None = None,
    ) -> None:
        checkpoint_id = checkpoint_id_or_path(checkpoint_id, path)  # ``path=``: DCP's keyword
        self.checkpoint_id = os.fspath(checkpoint_id)
        self.path = _local_path(checkpoint_id)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        from .local import FileSystemWriter  # local.py imports this module

        return FileSystemWriter.validate_checkpoint_id(checkpoint_id)

    def read_metadata(self) -> bytes:
        meta = self.path / METADATA_FILE
        try:
            fd = os.open(meta, _OPEN_READ)
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_a_checkpoint() from None
        except OSError as exc:  # ELOOP: metadata.json is a symlink
            raise CorruptCheckpointError(
                f"cannot open {meta}: {exc}; checkpoint files must be regular files"
            ) from exc
        return _read_regular_file(meta, MAX_METADATA_BYTES, fd)

    def _not_a_checkpoint(self) -> Exception:
        """Why there is no committed checkpoint here, for what users point a load at."""
        cid = self.checkpoint_id
        if self.path.is_file():
            return CheckpointNotFoundError(
                f"{cid!r} is a file, not an async_ckpt checkpoint (a directory): probably a "
                "torch.save file. Read it with torch.load, or convert it once with "
                "async_ckpt.save(torch.load(path), checkpoint_id=NEW_DIR)."
            )
        if not self.path.is_dir():
            return CheckpointNotFoundError(
                f"no checkpoint at {cid!r}: the directory does not exist"
            )
        steps = sorted(
            child.name
            for child in self.path.iterdir()
            if child.is_dir() and (child / METADATA_FILE).is_file()
        )
        if steps:
            return CheckpointNotFoundError(
                f"{cid!r} is not a checkpoint but a directory of {len(steps)} checkpoints "
                f"(a CheckpointManager root?): {steps[:5]}{' ...' if len(steps) > 5 else ''}. "
                f"Load one of them (checkpoint_id={str(self.path / steps[-1])!r}), or "
                "CheckpointManager(root).restore(state) for the newest step."
            )
        return IncompleteCheckpointError(
            f"checkpoint {cid!r} is incomplete: it has no {METADATA_FILE}, "
            "so its save never committed (crashed or still running). Load an earlier "
            "checkpoint; this one holds no usable data."
        )

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                if not is_safe_file_name(name):
                    raise CorruptCheckpointError(f"refusing data file name {name!r}")
                try:
                    fd = os.open(self.path / name, _OPEN_READ)
                except FileNotFoundError as exc:
                    raise CorruptCheckpointError(
                        f"data file {name!r} of checkpoint {self.checkpoint_id!r} is missing; "
                        "the checkpoint is damaged"
                    ) from exc
                except OSError as exc:
                    raise CorruptCheckpointError(
                        f"cannot open data file {name!r} of {self.checkpoint_id!r}: {exc} "
                        "(data files must be regular files, not symlinks)"
                    ) from exc
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise CorruptCheckpointError(
                        f"data file {name!r} of {self.checkpoint_id!r} is not a regular file"
                    )
                self._fds[name] = fd
            return fd

    def read_into(self, name: str, offset: int, dest: memoryview) -> None:
        fd = self._fd(name)
        view = dest.cast("B") if dest.format != "B" else dest
        pos = 0
        while pos < len(view):
            got = os.preadv(fd, [view[pos : pos + PIECE]], offset + pos)
            if got == 0:
                raise CorruptCheckpointError(
                    f"data file {name!r} of {self.checkpoint_id!r} is truncated: expected "
                    f"{len(view)} bytes at offset {offset}, the file ends at {offset + pos}"
                )
            pos += got

    def file_size(self, name: str) -> int | None:
        return os.fstat(self._fd(name)).st_size

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
