"""Fast S3 transfers for the fsspec backend: concurrent multipart uploads straight
from staging memory, and ranged downloads straight into the destination.

s3fs's buffered file object uploads one part at a time through a BytesIO copy,
and whole-object reads hold 2-3x the object in memory. Here each part's body
is a seekable read-only view of the caller's buffer (botocore needs seek for
retries and checksums), several parts are in flight at once, and the object
becomes visible only when the upload completes.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from typing import Any

MIN_PART = 5 * 1024 * 1024  # S3's minimum for every part but the last
DEFAULT_PART = 16 * 1024 * 1024
MAX_PARTS = 10_000
DEFAULT_CONCURRENCY = 4


class MemoryviewReader(io.RawIOBase):
    """A seekable, read-only file over a memoryview (an upload body without a copy)."""

    def __init__(self, view: memoryview) -> None:
        self._view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._view)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, min(len(self._view), base + offset))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        n = min(len(out), len(self._view) - self._pos)
        out[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        end = (
            len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        )
        data = bytes(self._view[self._pos : end])
        self._pos = end
        return data


def is_s3(fs: Any) -> bool:
    """Whether ``fs`` is an s3fs filesystem (which this module can drive directly)."""
    return hasattr(fs, "_call_s3") and hasattr(fs, "split_path")


def part_size_for(total: int, requested: int = DEFAULT_PART) -> int:
    """A part size that keeps the upload within S3's 10,000-part limit."""
    return max(requested, MIN_PART, -(-total // MAX_PARTS))


def _parts(segments: Sequence[memoryview], part_size: int) -> list[list[memoryview]]:
    """Cut the concatenation of ``segments`` into parts of ``part_size`` bytes (views only)."""
    parts: list[list[memoryview]] = [[]]
    room = part_size
    for seg in segments:
        view = seg.cast("B") if seg.format != "B" else seg
        pos = 0
        while pos < len(view):
            take = min(room, len(view) - pos)
            parts[-1].append(view[pos : pos + take])
            pos += take
            room -= take
            if room == 0:
                parts.append([])
                room = part_size
    return [p for p in parts if p]


class _ChainReader(MemoryviewReader):
    """A part made of several views; joined once, only when a part spans segments."""

    def __init__(self, views: list[memoryview]) -> None:
        super().__init__(views[0] if len(views) == 1 else memoryview(b"".join(views)))


async def _upload(
    fs: Any, path: str, segments: Sequence[memoryview], part_size: int, concurrency: int
) -> None:
    bucket, key, _ = fs.split_path(path)
    total = sum(s.nbytes for s in segments)
    parts = _parts(segments, part_size_for(total, part_size))
    if len(parts) <= 1:
        body = _ChainReader(parts[0]) if parts else MemoryviewReader(memoryview(b""))
        await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=body)
        return
    upload = await fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    upload_id = upload["UploadId"]
    gate = asyncio.Semaphore(concurrency)

    async def send(number: int, views: list[memoryview]) -> dict[str, Any]:
        async with gate:
            reply = await fs._call_s3(
                "upload_part",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=_ChainReader(views),
            )
        return {"PartNumber": number, "ETag": reply["ETag"]}

    try:
        done = await asyncio.gather(*(send(n + 1, p) for n, p in enumerate(parts)))
        await fs._call_s3(
            "complete_multipart_upload",
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": sorted(done, key=lambda p: p["PartNumber"])},
        )
    except BaseException:
        await fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def upload(
    fs: Any,
    path: str,
    segments: Sequence[memoryview],
    *,
    part_size: int = DEFAULT_PART,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> None:
    """Upload ``segments`` back to back as one S3 object; invisible until complete."""
    from fsspec.asyn import sync

    sync(fs.loop, _upload, fs, path, segments, part_size, concurrency)
    fs.invalidate_cache(path)


async def _download(
    fs: Any, path: str, offset: int, dest: memoryview, part: int, concurrency: int
) -> int:
    bucket, key, _ = fs.split_path(path)
    gate = asyncio.Semaphore(concurrency)

    async def fetch(start: int, end: int) -> int:
        async with gate:
            reply = await fs._call_s3(
                "get_object",
                Bucket=bucket,
                Key=key,
                Range=f"bytes={offset + start}-{offset + end - 1}",
            )
            body = reply["Body"]
            got = 0
            try:
                while start + got < end:
                    chunk = await body.read(min(8 * 1024 * 1024, end - start - got))
                    if not chunk:
                        break
                    dest[start + got : start + got + len(chunk)] = chunk
                    got += len(chunk)
            finally:
                body.close()
            return got

    ranges = [(s, min(s + part, len(dest))) for s in range(0, len(dest), part)]
    sizes = await asyncio.gather(*(fetch(s, e) for s, e in ranges))
    return sum(sizes)


def download_into(
    fs: Any,
    path: str,
    offset: int,
    dest: memoryview,
    *,
    part_size: int = DEFAULT_PART,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> int:
    """Fill ``dest`` from ``path`` at ``offset`` with parallel ranged GETs; returns bytes read."""
    from fsspec.asyn import sync

    view = dest.cast("B") if dest.format != "B" else dest
    if len(view) == 0:
        return 0
    return sync(fs.loop, _download, fs, path, offset, view, part_size, concurrency)
