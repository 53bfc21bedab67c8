"""Human-readable summaries: a checkpoint's key tree, and the steps under a manager root."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from ..format.dcp_translate import is_translated_dcp
from ..format.metadata import Metadata, ObjectEntry, TensorEntry, ValueEntry
from ..format.objects import decode_plain
from ..manager.root import StepInfo, disk_bytes, step_dir_name
from ..state.leaves import LeafKind


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def _path_order(path: tuple) -> tuple:
    """Sort key of a key path: list indices numerically, ints before strings."""
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in path)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def entry_kind(entry: Any) -> LeafKind:
    """The kind of leaf an entry stores (a DTensor's pieces are stored as one tensor)."""
    if isinstance(entry, TensorEntry):
        return LeafKind.NDARRAY if entry.numpy else LeafKind.TENSOR
    return LeafKind.VALUE if isinstance(entry, ValueEntry) else LeafKind.OBJECT


def entry_columns(entry: Any) -> list[str]:
    """The columns after the name: kind, dtype or type, shape or value, bytes, chunks."""
    kind = entry_kind(entry).value
    if isinstance(entry, TensorEntry):
        nbytes = sum(c.nbytes for c in entry.chunks)
        return [
            kind,
            entry.dtype,
            str(list(entry.shape)),
            human_bytes(nbytes),
            _plural(len(entry.chunks), "chunk"),
        ]
    if isinstance(entry, ValueEntry):
        text = repr(decode_plain(entry.value))
        text = text if len(text) <= 40 else text[:37] + "..."
        return [kind, entry.value.get("type", "?"), text, "", ""]
    return [kind, entry.type_name, "", human_bytes(entry.nbytes), ""]


def _table(rows: Sequence[tuple[str, list[str]]]) -> list[str]:
    """Left-aligned columns; empty trailing columns are dropped."""
    widths: list[int] = []
    for name, cols in rows:
        for i, text in enumerate([name, *cols]):
            if i >= len(widths):
                widths.append(0)
            widths[i] = max(widths[i], len(text))
    lines = []
    for name, cols in rows:
        cells = [name, *cols]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip())
    return lines


def tree_lines(meta: Metadata, checkpoint_id: str) -> list[str]:
    """The ``inspect`` report: header, one line per container and leaf, totals."""
    if is_translated_dcp(meta):
        about = (
            f"  torch.distributed.checkpoint (DCP {meta.extra.get('dcp_version') or '?'}), "
            f"written by {_plural(meta.world_size, 'rank')}; no checksums"
        )
    else:
        about = (
            f"  format v{meta.version}, save id {meta.save_id}, written by "
            f"{_plural(meta.world_size, 'rank')}, checksum block {human_bytes(meta.block_size)}"
        )
    lines = [f"checkpoint {checkpoint_id}", about, ""]
    rows: list[tuple[str, list[str]]] = []
    shown: tuple = ()
    for entry in sorted(meta.entries.values(), key=lambda e: _path_order(e.path)):
        parents = entry.path[:-1]
        common = 0
        while common < min(len(shown), len(parents)) and shown[common] == parents[common]:
            common += 1
        for depth in range(common, len(parents)):
            kind = meta.containers.get(".".join(str(p) for p in parents[: depth + 1]), "dict")
            rows.append(("  " * depth + str(parents[depth]), [f"({kind})"]))
        shown = parents
        rows.append(("  " * len(parents) + str(entry.path[-1]), entry_columns(entry)))
    lines += _table(rows)
    t = totals(meta)
    lines += [
        "",
        f"totals: {_plural(t['tensors'], 'tensor')} ({human_bytes(t['tensor_bytes'])} in "
        f"{_plural(t['chunks'], 'chunk')}), {_plural(t['values'], 'value')}, "
        f"{_plural(t['objects'], 'object')} ({human_bytes(t['object_bytes'])}); "
        f"{_plural(len(meta.files), 'data file')}, {human_bytes(meta.total_bytes)}",
    ]
    info = meta.incremental
    if info is not None and "base" in info:
        lines.append(
            f"incremental: {human_bytes(meta.new_bytes)} new, "
            f"{human_bytes(info.get('shared_bytes', 0))} in "
            f"{_plural(info.get('shared_files', 0), 'file')} shared with {info['base']}"
        )
    elif info is not None:
        lines.append("incremental: no base (every byte written), digests recorded")
    return lines


def totals(meta: Metadata) -> dict[str, int]:
    """Counts and byte sums over the entries."""
    tensors = [e for e in meta.entries.values() if isinstance(e, TensorEntry)]
    objects = [e for e in meta.entries.values() if isinstance(e, ObjectEntry)]
    return {
        "tensors": len(tensors),
        "chunks": sum(len(e.chunks) for e in tensors),
        "tensor_bytes": sum(c.nbytes for e in tensors for c in e.chunks),
        "values": sum(isinstance(e, ValueEntry) for e in meta.entries.values()),
        "objects": len(objects),
        "object_bytes": sum(e.nbytes for e in objects),
        "files": len(meta.files),
        "file_bytes": meta.total_bytes,
        "new_file_bytes": meta.new_bytes,
    }


def summary(meta: Metadata, checkpoint_id: str) -> dict[str, Any]:
    """The ``inspect --json`` document."""
    entries: dict[str, Any] = {}
    for key, entry in sorted(meta.entries.items()):
        kind = entry_kind(entry).value
        if isinstance(entry, TensorEntry):
            entries[key] = {
                "kind": kind,
                "dtype": entry.dtype,
                "shape": list(entry.shape),
                "bytes": sum(c.nbytes for c in entry.chunks),
                "chunks": len(entry.chunks),
            }
        elif isinstance(entry, ValueEntry):
            entries[key] = {"kind": kind, "type": entry.value.get("type")}
        else:
            entries[key] = {"kind": kind, "type": entry.type_name, "bytes": entry.nbytes}
    return {
        "checkpoint_id": checkpoint_id,
        "format_version": meta.version,
        "save_id": meta.save_id,
        "world_size": meta.world_size,
        "files": dict(sorted(meta.files.items())),
        "entries": entries,
        "totals": totals(meta),
    }


def metrics_text(metrics: Mapping[str, Any] | None) -> str:
    """``{"loss": 0.1234567, "eval": {"acc": 0.9}}`` -> ``"eval.acc=0.9 loss=0.123457"``."""
    return " ".join(_metric_parts("", metrics or {}))


def _metric_parts(prefix: str, metrics: Mapping[str, Any]) -> list[str]:
    parts = []
    for key, value in sorted(metrics.items()):
        if isinstance(value, Mapping):
            parts += _metric_parts(f"{prefix}{key}.", value)
        elif isinstance(value, float):
            parts.append(f"{prefix}{key}={value:.6g}")
        else:
            parts.append(f"{prefix}{key}={value}")
    return parts


def steps_lines(
    root: str,
    infos: Sequence[StepInfo],
    metrics: Mapping[int, Mapping[str, Any] | None] | None = None,
) -> list[str]:
    """The ``ls`` report: one line per step directory, then a summary.

    ``metrics`` (step -> the metrics it was saved with; ``None``: unreadable)
    adds a last column when any step has metrics.
    """
    if not infos:
        return [f"no checkpoints under {root}"]
    metrics = metrics or {}
    # a column when some step has metrics, or some step's could not be read ("?")
    shown = any(
        info.step in metrics and metrics[info.step] != {} for info in infos if info.committed
    )
    rows = [("step", ["status", "size", "modified", *(["metrics"] if shown else [])])]
    for info in infos:
        stamp = (
            datetime.datetime.fromtimestamp(info.mtime).strftime("%Y-%m-%d %H:%M:%S")
            if info.mtime is not None
            else "?"
        )
        status = "committed" if info.committed else "incomplete"
        cols = [status, human_bytes(info.size), stamp]
        if shown and info.committed:
            found = metrics.get(info.step, {})
            cols.append("?" if found is None else metrics_text(found))
        rows.append((step_dir_name(info.step), cols))
    committed = [i.step for i in infos if i.committed]
    latest = f"step {committed[-1]}" if committed else "none"
    return [
        *_table(rows),
        "",
        f"{len(committed)} committed, {len(infos) - len(committed)} incomplete, "
        f"{human_bytes(disk_bytes(infos))} in total; latest committed: {latest}",
    ]
