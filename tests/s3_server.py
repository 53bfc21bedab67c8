"""A local S3 API server (moto) for tests and benchmarks.

Pytest usage (import the fixtures into ``tests/conftest.py``)::

    from s3_server import s3_bucket, s3_server  # noqa: F401  (or tests.s3_server)

    @pytest.mark.s3
    def test_roundtrip(s3_bucket):
        fs = s3_bucket.server.filesystem()
        fs.pipe_file(s3_bucket.url("a/b.bin"), b"hello")
        assert fs.cat_file(s3_bucket.url("a/b.bin"), start=1, end=3) == b"el"

Outside pytest (benchmarks)::

    with run_s3_server() as srv:
        bucket = srv.make_bucket()
        with fsspec.open(f"s3://{bucket}/x", "wb", **srv.storage_options) as f:
            f.write(b"...")

The server listens on 127.0.0.1 on a port the kernel picks (port 0, read back
after bind, so there is no race with other processes).  By default it runs
in a child process (``mode="process"``): moto's request handling is CPU-bound
Python, and in a thread it would share the GIL with the code under test, and
moto's in-process backends would be shared with (and reset by) any
``moto.mock_aws`` used elsewhere in the same interpreter.  ``mode="thread"``
(a server thread in this process, like ``moto.server.ThreadedMotoServer``)
starts faster and is there for callers who want it.

Credentials are dummies passed explicitly through ``storage_options``; the
process environment is not modified (botocore still reads ``AWS_*`` config
such as ``AWS_PROFILE``: naming a profile that doesn't exist breaks client
creation).  Any HTTP(S)_PROXY is ignored for the loopback endpoint.  s3fs and
moto are imported lazily so that this module imports everywhere; the fixtures
skip with a reason when either is missing.  The ``s3_bucket`` fixture clears
s3fs's instance cache before and after each test and deletes its bucket.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

try:  # pytest is optional: benchmarks use run_s3_server() without it.
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

__all__ = [
    "S3Bucket",
    "S3Server",
    "missing_s3_dependencies",
    "run_s3_server",
    "s3_bucket",
    "s3_server",
]

REGION = "eu-west-1"  # not us-east-1: s3fs.mkdir(bucket) sends LocationConstraint=<region>,
# which S3 (and moto) reject for us-east-1
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
_START_TIMEOUT_S = 120.0  # only for a server that never answers; moto imports slowly when busy
_bucket_counter = itertools.count()


def missing_s3_dependencies() -> str | None:
    """Return why the S3 test server can't run here, or None if it can."""
    missing = []
    for mod in ("s3fs", "moto.server"):
        try:
            __import__(mod)
        except Exception as exc:  # ImportError, or a broken install
            missing.append(f"{mod} ({type(exc).__name__}: {exc})")
    if missing:
        return "S3 test server unavailable, cannot import: " + ", ".join(missing)
    return None


def clear_s3fs_instance_cache() -> None:
    """Forget cached s3fs.S3FileSystem instances (no-op without s3fs)."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@dataclasses.dataclass(frozen=True)
class S3Server:
    """A running local S3 endpoint."""

    endpoint_url: str
    #: kwargs for ``s3fs.S3FileSystem(**storage_options)`` / ``fsspec.open(url, **storage_options)``.
    #: A fresh deep copy on each access, so callers may mutate it.
    _storage_options: dict[str, Any] = dataclasses.field(repr=False)
    mode: str = "process"

    @property
    def storage_options(self) -> dict[str, Any]:
        return copy.deepcopy(self._storage_options)

    def filesystem(self, **overrides: Any):
        """A new, uncached ``s3fs.S3FileSystem`` for this server."""
        import s3fs

        opts = self.storage_options
        opts.update(overrides)
        opts.setdefault("skip_instance_cache", True)
        return s3fs.S3FileSystem(**opts)

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a new, empty bucket with a unique name and return its name."""
        # S3 bucket names: 3-63 chars, lowercase letters, digits, '-', '.'.
        prefix = "".join(c if c.isalnum() or c == "-" else "-" for c in prefix.lower())
        prefix = prefix.strip("-")[:30] or "test"
        name = f"{prefix}-{os.getpid()}-{next(_bucket_counter)}-{uuid.uuid4().hex[:8]}"
        fs = self.filesystem()
        fs.mkdir(name)
        return name


@dataclasses.dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on an :class:`S3Server` (what the ``s3_bucket`` fixture yields)."""

    server: S3Server
    name: str

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.server.storage_options

    def filesystem(self, **overrides: Any):
        """A new, uncached ``s3fs.S3FileSystem`` (see :meth:`S3Server.filesystem`)."""
        return self.server.filesystem(**overrides)

    @property
    def root(self) -> str:
        """``s3://<bucket>``"""
        return f"s3://{self.name}"

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts joined with '/'>``"""
        key = "/".join(p.strip("/") for p in parts if p.strip("/"))
        return f"{self.root}/{key}" if key else self.root


def _make_storage_options(endpoint_url: str) -> dict[str, Any]:
    return {
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": REGION},
        # Path-style URLs: virtual-host style would need <bucket>.127.0.0.1 to resolve.
        # proxies={}: ignore any HTTP(S)_PROXY in the environment for this loopback endpoint.
        "config_kwargs": {"s3": {"addressing_style": "path"}, "proxies": {}},
    }


# --------------------------------------------------------------------------- child process


def _make_wsgi_server(host: str):
    """Bind moto's S3 app to ``host``:0; the socket is listening when this returns."""
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class _Handler(MotoRequestHandler):
        # BaseHTTPRequestHandler.send_response adds "Server: Werkzeug/..." and moto's
        # response carries its own "Server" header.  aiohttp's strict parser (used
        # under ``python -X dev``/PYTHONASYNCIODEBUG or without its C extension)
        # rejects the duplicate with "400, Duplicate 'Server' header found".
        def send_response(self, code: int, message: str | None = None) -> None:
            self.log_request(code)
            self.send_response_only(code, message)
            self.send_header("Date", self.date_time_string())

        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass  # no per-request log lines

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = DomainDispatcherApplication(create_backend_app)
    return make_server(host, 0, app, threaded=True, request_handler=_Handler)


def _serve_child(host: str) -> None:
    """Entry point of the server child process: bind, report the port, serve."""
    server = _make_wsgi_server(host)

    def _watch_parent() -> None:
        # The parent holds our stdin open; EOF means it closed it or died.
        try:
            sys.stdin.buffer.read()
        finally:
            os._exit(0)

    threading.Thread(target=_watch_parent, daemon=True).start()
    sys.stdout.write(f"PORT {server.server_address[1]}\n")
    sys.stdout.flush()
    server.serve_forever()


@contextlib.contextmanager
def _process_server(host: str) -> Iterator[str]:
    with tempfile.TemporaryFile(mode="w+") as errlog:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-child", host],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errlog,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            port = _read_port(proc, errlog)
            yield f"http://{host}:{port}"
        finally:
            _stop_child(proc)


def _read_port(proc: subprocess.Popen, errlog) -> int:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(_START_TIMEOUT_S)
    line = result[0] if result else ""
    if line.startswith("PORT "):
        return int(line.split()[1])
    if proc.poll() is None:
        state = f"no port after {_START_TIMEOUT_S:.0f}s"
    else:
        state = f"exited with code {proc.returncode}"
    errlog.seek(0)
    raise RuntimeError(f"moto server child {state}; its stderr:\n{errlog.read()[-4000:]}")


def _stop_child(proc: subprocess.Popen) -> None:
    # Closing stdin alone would do, unless a fork()ed worker of ours inherited the pipe.
    for pipe in (proc.stdin, proc.stdout):
        with contextlib.suppress(Exception):
            pipe.close()
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- thread


@contextlib.contextmanager
def _thread_server(host: str) -> Iterator[str]:
    # Same as moto.server.ThreadedMotoServer(port=0), but with our request handler.
    server = _make_wsgi_server(host)
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --------------------------------------------------------------------------- public API


@contextlib.contextmanager
def run_s3_server(mode: str = "process", host: str = "127.0.0.1") -> Iterator[S3Server]:
    """Run a moto S3 server for the duration of the ``with`` block.

    ``mode`` is ``"process"`` (default; a child interpreter, own GIL, own moto
    state) or ``"thread"`` (a server thread in this process).
    Raises ``RuntimeError`` if s3fs or moto can't be imported.
    """
    reason = missing_s3_dependencies()
    if reason:
        raise RuntimeError(reason)
    if mode == "process":
        starter = _process_server
    elif mode == "thread":
        starter = _thread_server
    else:
        raise ValueError(f"mode must be 'process' or 'thread', not {mode!r}")
    with starter(host) as endpoint_url:
        _wait_until_ready(endpoint_url)
        clear_s3fs_instance_cache()
        try:
            yield S3Server(endpoint_url, _make_storage_options(endpoint_url), mode)
        finally:
            clear_s3fs_instance_cache()


def _wait_until_ready(endpoint_url: str) -> None:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        try:
            with opener.open(endpoint_url + "/", timeout=5) as r:
                r.read()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


if pytest is not None:

    @pytest.fixture(scope="session")
    def s3_server() -> Iterator[S3Server]:
        """Session-wide local S3 server; skips the test if s3fs/moto are missing."""
        reason = missing_s3_dependencies()
        if reason:
            pytest.skip(reason)
        with run_s3_server() as server:
            yield server

    @pytest.fixture
    def s3_bucket(s3_server: S3Server) -> Iterator[S3Bucket]:
        """A fresh, empty bucket per test; s3fs's instance cache is cleared around it."""
        clear_s3fs_instance_cache()
        bucket = S3Bucket(s3_server, s3_server.make_bucket())
        try:
            yield bucket
        finally:
            clear_s3fs_instance_cache()
            # Best effort: free the server's memory/temp files (moto keeps everything).
            with contextlib.suppress(Exception):
                bucket.filesystem().rm(bucket.name, recursive=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-child":
        _serve_child(sys.argv[2])
    else:
        with run_s3_server() as srv:
            print(f"moto S3 at {srv.endpoint_url}; storage_options={srv.storage_options}")
            print("Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
