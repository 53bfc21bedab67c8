"""Multi-rank benchmark statistics: per method, over the saves of one run."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.multirank_methods import FLOOR


def _stat(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    steady = values[1:] if len(values) > 1 else values
    return {
        "median": statistics.median(steady),
        "min": min(steady),
        "max": max(steady),
        "first": values[0],
        "n": len(steady),
    }


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Per method: each save's slowest rank, then median/min/max over saves 2..N."""
    out: dict[str, Any] = {}
    for name, m in raw["methods"].items():
        saves = [s for s in m["saves"] if "error" not in s]
        errors = [s["error"] for s in m["saves"] if "error" in s]
        keys = ("return_s", "staged_s", "commit_s", "all_committed_s", "plan_s", "lib_commit_s")
        summ = {}
        for k in keys:
            vals = [max(r[k] for r in s["per_rank"]) for s in saves if k in s["per_rank"][0]]
            if vals:
                summ[k] = _stat(vals)
        # The slowest rank's plan time includes waiting for the last rank to finish
        # staging; the fastest rank's (the last to arrive) is the exchange itself.
        vals = [
            min(r["plan_s"] for r in s["per_rank"]) for s in saves if "plan_s" in s["per_rank"][0]
        ]
        if vals:
            summ["plan_min_rank_s"] = _stat(vals)
        out[name] = {"summary": summ, "errors": errors[:1], "n_failed": len(errors)}

    def med(name: str, key: str) -> float | None:
        s = out.get(name, {}).get("summary", {}).get(key)
        return s["median"] if s else None

    floor = med(FLOOR, "all_committed_s")
    for name in out:
        c = med(name, "all_committed_s")
        out[name]["commit_vs_parallel_write"] = c / floor if c and floor else None
    for key in ("plan_s", "plan_min_rank_s"):
        ours = med("async_ckpt_async", key)
        for dcp_name in ("dcp_async", "dcp_async_cached"):
            d = med(dcp_name, key)
            out.setdefault(dcp_name, {})[f"ours_{key}_vs_this"] = ours / d if ours and d else None
    return out


def one_line(r: dict[str, Any]) -> str:
    s = r["summary"]
    parts = []
    for name, m in s.items():
        c = m.get("summary", {}).get("all_committed_s")
        p = m.get("summary", {}).get("plan_s")
        txt = f"{name} commit {c['median']:.2f}s" if c else f"{name} failed"
        if p:
            txt += f" plan {p['median'] * 1e3:.1f}ms"
        parts.append(txt)
    return "; ".join(parts)
