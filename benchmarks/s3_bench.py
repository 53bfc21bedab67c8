"""Object-storage benchmark: async_ckpt vs DCP's fsspec writer vs raw fsspec, on local S3.

Runs a moto S3 server on 127.0.0.1 (tests/s3_server.py) and, interleaved in
one run, saves and loads the same synthetic state with each method:

- ``raw``: the state's bytes as one object, ``fs.pipe_file`` / ``fs.cat_file``
  (the transfer floor through the same client and server);
- ``dcp``: torch.distributed.checkpoint save/load with its FsspecWriter/Reader;
- ``async_ckpt``: async_ckpt.save/load with FsspecWriter/Reader.

    python -m benchmarks.s3_bench --size 1GiB --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

from benchmarks.sizes import parse_size
from benchmarks.state import (
    assert_state_equal,
    build_state,
    clone_state,
    empty_like_state,
    tensor_bytes,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import run_s3_server  # noqa: E402

import async_ckpt  # noqa: E402


def _flat_bytes(state) -> bytes:
    from benchmarks.state import iter_tensors

    return b"".join(
        t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in iter_tensors(state)
    )


def bench_raw(srv, bucket, state, blob):
    fs = srv.filesystem()
    url = f"s3://{bucket}/raw-{uuid.uuid4().hex[:6]}"
    t0 = time.perf_counter()
    fs.pipe_file(url, blob)
    t1 = time.perf_counter()
    fs.invalidate_cache()
    data = fs.cat_file(url)
    t2 = time.perf_counter()
    assert len(data) == len(blob)
    return t1 - t0, t2 - t1


def bench_dcp(srv, bucket, state, blob):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    url = f"s3://{bucket}/dcp-{uuid.uuid4().hex[:6]}"
    opts = srv.storage_options
    target = empty_like_state(state)
    t0 = time.perf_counter()
    dcp.save(state, storage_writer=FsspecWriter(url, thread_count=4, **opts), no_dist=True)
    t1 = time.perf_counter()
    dcp.load(target, storage_reader=FsspecReader(url, **opts), no_dist=True)
    t2 = time.perf_counter()
    assert_state_equal(target, state)
    return t1 - t0, t2 - t1


def bench_ours(srv, bucket, state, blob):
    url = f"s3://{bucket}/ours-{uuid.uuid4().hex[:6]}"
    opts = srv.storage_options
    target = empty_like_state(state)
    t0 = time.perf_counter()
    async_ckpt.save(state, storage_writer=async_ckpt.FsspecWriter(url, storage_options=opts))
    t1 = time.perf_counter()
    async_ckpt.load(target, storage_reader=async_ckpt.FsspecReader(url, storage_options=opts))
    t2 = time.perf_counter()
    assert_state_equal(target, state)
    return t1 - t0, t2 - t1


METHODS = {"raw": bench_raw, "dcp": bench_dcp, "async_ckpt": bench_ours}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    state = build_state(parse_size(args.size))
    expected = clone_state(state)
    blob = _flat_bytes(state)
    nbytes = tensor_bytes(state)
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    with run_s3_server() as srv:
        bucket = srv.make_bucket("bench")
        for rep in range(args.repeats):
            for name, fn in METHODS.items():
                save_s, load_s = fn(srv, bucket, state, blob)
                times[name].append((save_s, load_s))
                print(
                    f"[{rep + 1}/{args.repeats}] {name}: save {save_s:.2f} s, load {load_s:.2f} s",
                    file=sys.stderr,
                )
    assert_state_equal(state, expected)
    print(f"\nS3 (moto on 127.0.0.1), state {nbytes / 2**20:.0f} MiB, median of {args.repeats}\n")
    print("| method | save s | save MB/s | load s | load MB/s | save vs raw | load vs raw |")
    print("|---|---|---|---|---|---|---|")
    med = {
        m: (statistics.median(s for s, _ in v), statistics.median(lo for _, lo in v))
        for m, v in times.items()
    }
    for name, (s, lo) in med.items():
        print(
            f"| {name} | {s:.2f} | {nbytes / s / 1e6:.0f} | {lo:.2f} | {nbytes / lo / 1e6:.0f} "
            f"| {s / med['raw'][0]:.2f}x | {lo / med['raw'][1]:.2f}x |"
        )
    ours, dcp_ = med["async_ckpt"], med["dcp"]
    print(
        f"\nasync_ckpt vs DCP throughput: save {dcp_[0] / ours[0]:.2f}x, load {dcp_[1] / ours[1]:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
