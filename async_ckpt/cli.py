"""The ``async-ckpt`` command: inspect, verify, list and convert checkpoints.

Exit status: 0 on success, 1 when a checkpoint is broken or an operation
failed, 2 for a usage error or missing input. Expected errors print one line
on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    MissingBackendError,
    StorageDetectionError,
)
from .format.dcp_translate import is_translated_dcp
from .format.metadata import Metadata
from .manager import StepStore
from .storage.base import checkpoint_metadata
from .storage.detect import detect_reader

PROG = "async-ckpt"
EXIT_OK, EXIT_BROKEN, EXIT_USAGE = 0, 1, 2


def _out(line: str = "") -> None:
    print(line, file=sys.stdout)


def _err(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _read_metadata(checkpoint_id: str) -> Metadata:
    """The checkpoint's decoded metadata: each command decodes it once, here, and passes it on.

    A manager root (step directories, no metadata) gets a message that points to ``ls``.
    """
    reader = detect_reader(checkpoint_id)
    try:
        return checkpoint_metadata(reader)
    except (IncompleteCheckpointError, CheckpointNotFoundError) as exc:
        if os.path.isdir(checkpoint_id) and StepStore(checkpoint_id).scan():
            raise CheckpointNotFoundError(
                f"{checkpoint_id!r} holds step directories, not a checkpoint: it is a "
                f"manager root. List it with `{PROG} ls {checkpoint_id}` and pass one step."
            ) from exc
        raise
    finally:
        reader.close()


def cmd_inspect(args: argparse.Namespace) -> int:
    from .tools.report import summary, tree_lines

    meta = _read_metadata(args.checkpoint_id)
    if args.json:
        _out(json.dumps(summary(meta, args.checkpoint_id), indent=2))
    else:
        for line in tree_lines(meta, args.checkpoint_id):
            _out(line)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from .tools.report import human_bytes
    from .tools.verify import verify_checkpoint

    meta = _read_metadata(args.checkpoint_id)
    report = verify_checkpoint(args.checkpoint_id, metadata=meta, progress=not args.quiet)
    for problem in report.problems:
        keys = "" if repr(problem.key) in problem.message else f" (holds {problem.key})"
        _err(problem.message + keys)
    if not report.ok:
        _err(
            f"{args.checkpoint_id} is damaged: {len(report.problems)} problem(s); "
            "restore from an earlier checkpoint"
        )
        return EXIT_BROKEN
    if is_translated_dcp(meta):
        _out(
            f"ok: {args.checkpoint_id}: torch.distributed.checkpoint, {report.entries} entries, "
            f"{report.chunks} chunks, {human_bytes(report.bytes)} read and decoded; it stores no "
            "checksums, so there were none to verify"
        )
        return EXIT_OK
    _out(
        f"ok: {args.checkpoint_id}: {report.entries} entries, {report.chunks} chunks, "
        f"{human_bytes(report.bytes)} verified"
    )
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    from .tools.report import steps_lines

    store = StepStore(args.root)
    if not store.exists():
        raise CheckpointNotFoundError(f"no checkpoint root at {args.root!r}")
    infos = store.infos()
    metrics: dict[int, dict | None] = {}
    for info in infos:
        if info.committed:
            try:
                metrics[info.step] = store.metrics(info.step) or {}
            except (CheckpointError, OSError):  # damaged or unreadable: "?", `verify` tells more
                metrics[info.step] = None
    for line in steps_lines(args.root, infos, metrics):
        _out(line)
    return EXIT_OK


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def cmd_memory(args: argparse.Namespace) -> int:
    from .manager.memory_store import clear_memory_root, default_memory_root, memory_contents

    root = args.memory_root or default_memory_root(args.root.rstrip("/") or "/")
    if args.clear:
        found = clear_memory_root(root)
        _out(f"removed {root}" if found else f"no memory tier at {root}")
        return EXIT_OK
    rows = memory_contents(root)
    if not rows:
        _out(f"no memory tier at {root}")
        return EXIT_OK
    _out(f"memory tier at {root} (this node):")
    for world, holder, steps, size in rows:
        shown = ", ".join(str(s) for s in steps) or "none committed"
        _out(f"  {world}/{holder}: steps {shown}, {_size(size)}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from .tools import convert

    if args.from_format == "dcp":
        meta = convert.from_dcp(args.source, args.dest, overwrite=args.force)
        _out(f"saved {args.dest}: {len(meta.entries)} entries from DCP checkpoint {args.source}")
        return EXIT_OK
    meta = _read_metadata(args.source)
    if args.to == "torch":  # torch.save pickles one object: the whole state is in memory
        done = convert.to_torch(args.source, args.dest, overwrite=args.force, metadata=meta)
    else:  # streamed entry by entry
        done = convert.to_safetensors(
            args.source, args.dest, overwrite=args.force, metadata=meta, progress=not args.quiet
        )
    _out(f"wrote {args.dest}: {done.tensors} tensors, {done.others} other leaves")
    if done.skipped:
        shown = ", ".join(done.skipped[:10]) + (" ..." if len(done.skipped) > 10 else "")
        _out(f"left out {len(done.skipped)} non-tensor leaves (safetensors holds tensors): {shown}")
    return EXIT_OK


def _apply_storage_options(args: argparse.Namespace) -> None:
    """Hand ``--storage-option`` to fsspec as defaults for the protocols of the ids given.

    fsspec merges ``fsspec.config.conf[protocol]`` into every filesystem it
    opens for that protocol, so every command and tool sees them.
    """
    if not args.storage_option:
        return
    import fsspec.config

    options: dict[str, object] = {}
    for item in args.storage_option:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CheckpointError(f"--storage-option {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    ids = [getattr(args, name, None) for name in ("checkpoint_id", "root", "source", "dest")]
    protocols = {str(i).split("://", 1)[0] for i in ids if i and "://" in str(i)}
    if not protocols:
        raise CheckpointError(
            "--storage-option applies to fsspec URLs (s3://...), and none was given"
        )
    for protocol in protocols:
        fsspec.config.conf.setdefault(protocol, {}).update(options)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("async_ckpt")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, verify, list and convert async_ckpt checkpoints.",
        epilog="Exit status: 0 ok, 1 broken checkpoint or failed operation, 2 usage error "
        "or missing input. Checkpoint ids are local paths or fsspec URLs (s3://, gs://, ...).",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the traceback of unexpected errors"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--storage-option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec storage option for object-store ids (endpoint_url=..., anon=true); "
        "repeatable; VALUE is read as JSON where it parses (true, 3), else as text",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="show a checkpoint's keys: shape, dtype, bytes, chunks")
    p.add_argument("checkpoint_id", metavar="ID")
    p.add_argument("--json", action="store_true", help="print a JSON document instead")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="re-read every chunk and check every checksum")
    p.add_argument("checkpoint_id", metavar="ID")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "ls", help="list the steps under a CheckpointManager root, with their metrics"
    )
    p.add_argument("root", metavar="ROOT")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "memory",
        help="list (or --clear) a CheckpointManager root's memory tier on this node",
    )
    p.add_argument("root", metavar="ROOT", help="the manager's storage root")
    p.add_argument(
        "--memory-root", help="the memory_root the manager was given (default: derived from ROOT)"
    )
    p.add_argument(
        "--clear", action="store_true", help="delete it: every rank's snapshots on this node"
    )
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser(
        "convert",
        help="convert to torch.save / safetensors, or from torch.distributed.checkpoint",
        description="ID --to torch OUT.pt | ID --to safetensors OUT.safetensors | "
        "DCP_DIR --from dcp OUT_ID. DCP checkpoints are read without running code from them.",
    )
    p.add_argument("source", metavar="SOURCE", help="checkpoint id (or DCP directory)")
    p.add_argument("dest", metavar="DEST", help="output file (or checkpoint id)")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["torch", "safetensors"], help="output format")
    direction.add_argument(
        "--from", dest="from_format", choices=["dcp"], help="input format of SOURCE"
    )
    p.add_argument("--force", action="store_true", help="replace DEST if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        _apply_storage_options(args)
        return args.func(args)
    except (
        CheckpointNotFoundError,
        CheckpointExistsError,
        StorageDetectionError,
        MissingBackendError,
        FileNotFoundError,
    ) as exc:
        _err(str(exc))
        return EXIT_USAGE
    except (CheckpointError, OSError) as exc:
        _err(str(exc))
        return EXIT_BROKEN
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as exc:  # a storage library's own error (credentials, network), or a bug
        if args.traceback:
            raise
        _err(f"{type(exc).__name__}: {exc} (run with --traceback for details)")
        return EXIT_BROKEN


if __name__ == "__main__":
    sys.exit(main())
