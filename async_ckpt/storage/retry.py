"""Bounded retries of a data-file write, for the storage errors a second try can cure.

A save writes each data file with one ``StorageWriter.write_file`` call, from a
writer thread of the process that runs the save (the worker process, or the
caller's process for synchronous and thread-executor saves). That call is
retried here when it fails with a *transient* error, with exponential backoff
and a bounded number of attempts; every other error fails the save at once.

Why a retry is safe: ``write_file`` writes a whole file from bytes that stay
put in memory (the staging arena or the caller's tensors) until the save ends,
the same bytes the pipeline checksums once, beside the first attempt, so a second attempt
rewrites every byte from the start (local files are opened with ``O_TRUNC``;
object stores replace the object). A failed attempt's partial file is removed before the next attempt and
after the last one, so a failed write leaves nothing of itself behind.

What counts as transient (see :func:`is_transient`):

* ``ConnectionError`` (reset, refused, aborted, broken pipe) and ``TimeoutError``:
  a network store or a network filesystem that blinked;
* an ``OSError`` whose errno is in :data:`TRANSIENT_ERRNOS`: interrupted or
  would-block calls, network errors reported as plain ``OSError``, stale NFS
  handles (the retry reopens the file by name), and ``EIO``. ``EIO`` is what
  FUSE and NFS mounts report for a dropped connection. The known hazard of
  retrying after ``EIO`` ("fsyncgate": a second ``fsync`` of the same dirty
  pages reports success although they were dropped) does not apply, because a
  retry rewrites every page through a new descriptor; on a dying local disk the
  retries only delay the failure by the bounded backoff (about 1.5 s by default).

Never retried: full or read-only storage and refused permissions (``ENOSPC``,
``EDQUOT``, ``EROFS``, ``EACCES``, ``EPERM``, ``EFBIG``...), any other ``OSError``
without a listed errno, async_ckpt's own errors, and every non-``OSError``
exception: trying again cannot fix them, and they must reach the caller at once.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..errors import CheckpointError, SaveFailedError
from .base import StorageWriter

log = logging.getLogger("async_ckpt")

T = TypeVar("T")


def _errnos(*names: str) -> frozenset[int]:
    return frozenset(getattr(errno, n) for n in names if hasattr(errno, n))


# errno values a later attempt can cure.
TRANSIENT_ERRNOS = _errnos(
    "EAGAIN",
    "EWOULDBLOCK",
    "EINTR",
    "ETIMEDOUT",
    "ECONNRESET",
    "ECONNABORTED",
    "ECONNREFUSED",
    "EPIPE",
    "ENETDOWN",
    "ENETUNREACH",
    "ENETRESET",
    "EHOSTDOWN",
    "EHOSTUNREACH",
    "ESTALE",
    "EIO",
)

# errno values that are never retried, even on an exception class that otherwise is
# (listed for the reader and the tests: anything outside TRANSIENT_ERRNOS is permanent).
PERMANENT_ERRNOS = _errnos(
    "ENOSPC",
    "EDQUOT",
    "EROFS",
    "EACCES",
    "EPERM",
    "EFBIG",
    "ENAMETOOLONG",
    "ELOOP",
    "EISDIR",
    "ENOTDIR",
    "EEXIST",
    "ENOENT",
    "EBADF",
    "EINVAL",
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a storage error that retrying the same write can cure."""
    if isinstance(exc, CheckpointError) or not isinstance(exc, OSError):
        return False
    if exc.errno in PERMANENT_ERRNOS:
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return exc.errno in TRANSIENT_ERRNOS


def _env_number(name: str, default: float, kind: type, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise CheckpointError(
            f"environment variable {name}={raw!r} must be a {kind.__name__} of at least "
            f"{minimum}; fix or unset it"
        )
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient write error is retried.

    ``attempts`` counts the first try (1 disables retries). The wait before
    retry ``n`` (1-based) is ``initial_delay_s * 2**(n-1)``, capped at
    ``max_delay_s``, times a random factor in [0.5, 1] so that ranks hitting
    the same store do not retry in lockstep. Environment overrides, read when
    a save writes: ``ASYNC_CKPT_WRITE_ATTEMPTS``,
    ``ASYNC_CKPT_WRITE_RETRY_DELAY_S``, ``ASYNC_CKPT_WRITE_RETRY_MAX_DELAY_S``.
    """

    attempts: int = 5
    initial_delay_s: float = 0.1
    max_delay_s: float = 5.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The defaults, with any ``ASYNC_CKPT_WRITE_*`` environment overrides applied."""
        return cls(
            attempts=int(_env_number("ASYNC_CKPT_WRITE_ATTEMPTS", cls.attempts, int, 1)),
            initial_delay_s=_env_number(
                "ASYNC_CKPT_WRITE_RETRY_DELAY_S", cls.initial_delay_s, float, 0.0
            ),
            max_delay_s=_env_number(
                "ASYNC_CKPT_WRITE_RETRY_MAX_DELAY_S", cls.max_delay_s, float, 0.0
            ),
        )

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the second attempt)."""
        base = min(self.max_delay_s, self.initial_delay_s * 2 ** (retry - 1))
        return base * random.uniform(0.5, 1.0)


def call_with_retry(
    fn: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy,
    cleanup: Callable[[], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, retried on transient errors; ``cleanup()`` runs after each failed attempt.

    A permanent error is raised as it is. When every attempt failed with a
    transient error, raises :class:`SaveFailedError` naming ``what`` and the
    number of attempts (its ``attempts`` attribute), chained to the last error.
    """
    started = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if cleanup is not None:
                try:
                    cleanup()
                except Exception as cleanup_exc:  # never hide the write's own error
                    log.warning("cleaning up after a failed %s failed: %s", what, cleanup_exc)
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                error = SaveFailedError(
                    f"{what} failed {attempt} time(s) in {time.monotonic() - started:.1f} s "
                    f"with transient storage errors, the last: {type(exc).__name__}: {exc}. "
                    "The storage is unreachable or overloaded; check it and save again "
                    "(ASYNC_CKPT_WRITE_ATTEMPTS sets how many attempts a write gets)."
                )
                error.attempts = attempt  # type: ignore[attr-defined]
                raise error from exc
            wait = policy.delay(attempt)
            log.warning(
                "%s failed (%s: %s); attempt %d of %d in %.2f s",
                what,
                type(exc).__name__,
                exc,
                attempt + 1,
                policy.attempts,
                wait,
            )
            sleep(wait)
    raise AssertionError("unreachable: RetryPolicy.attempts is at least 1")


def write_with_retry(
    writer: StorageWriter,
    name: str,
    segments: Sequence[memoryview],
    *,
    policy: RetryPolicy | None = None,
) -> None:
    """``writer.write_file(name, segments)`` with transient errors retried (module docstring).

    Called from the save's writer threads, one call per data file. A failed
    attempt's partial file is removed with ``writer.abort([name])``.
    """
    call_with_retry(
        lambda: writer.write_file(name, segments),
        what=f"writing data file {name!r} of checkpoint {writer.checkpoint_id!r}",
        policy=policy or RetryPolicy.from_env(),
        cleanup=lambda: writer.abort([name]),
    )
