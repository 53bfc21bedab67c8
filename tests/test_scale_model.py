"""Smoke test of benchmarks/scale_model.py (docs/scale.md): two gloo ranks, few tensors.

The claim the document rests on, checked for real: once the plan is cached,
a save's planning traffic is one fixed-size digest per peer, the same for 4
tensors as for 24, while the first save's chunk lists and DCP's local plans
grow with the tensors.
"""

from __future__ import annotations

import dist_utils  # noqa: F401  (puts the repository root, and so ``benchmarks``, on sys.path)
import pytest

from benchmarks import scale_model

pytestmark = pytest.mark.multiprocess

WORLD = 2


def _row(rows: list[dict], method: str, save: str) -> dict:
    return next(r for r in rows if r["method"] == method and r["save"] == save)


@pytest.fixture(scope="module")
def measured() -> dict[int, list[dict]]:
    out = {}
    for items, methods in ((4, ("ours", "dcp")), (24, ("ours", "dcp"))):
        # under pytest-timeout's 300 s, so that a hang fails with the ranks' stacks
        per_rank = scale_model.measure(WORLD, items, steady=1, methods=methods, timeout=200)
        out[items] = scale_model.rows(WORLD, items, per_rank)
    return out


def test_byte_counts_are_positive(measured: dict[int, list[dict]]) -> None:
    for rows in measured.values():
        for row in rows:
            assert row["plan_in_coord"] > 0 and row["plan_in_other"] > 0, row
            assert row["commit_in_coord"] > 0 and row["commit_in_other"] > 0, row
            assert row["plan_s_max"] > 0 and row["save_s_max"] > 0, row
    table = scale_model.table(measured[4])
    assert "| 2 | ours | steady |" in table


def test_cached_plan_traffic_does_not_grow_with_tensors(measured: dict[int, list[dict]]) -> None:
    few, many = measured[4], measured[24]
    for rows in (few, many):
        steady = _row(rows, "ours", "steady")
        assert steady["plan_calls"] == 1  # the digest all-to-all alone
        # two 16-byte fingerprints to each of the other WORLD - 1 ranks, and back
        assert steady["plan_in_coord"] == steady["plan_out_other"] == 32 * (WORLD - 1)
    for key in ("plan_in_coord", "plan_in_other", "plan_out_other"):
        assert _row(few, "ours", "steady")[key] == _row(many, "ours", "steady")[key], key
    # the counts are sensitive to the state: the first save's chunk lists and DCP's
    # local plans (sent every save without plan caching) grow with the tensors
    assert (
        _row(many, "ours", "first")["plan_in_coord"] > _row(few, "ours", "first")["plan_in_coord"]
    )
    for save in ("first", "steady"):
        assert _row(many, "dcp", save)["plan_in_coord"] > _row(few, "dcp", save)["plan_in_coord"]
        assert (
            _row(few, "dcp", save)["plan_in_coord"] > _row(few, "ours", "steady")["plan_in_coord"]
        )
