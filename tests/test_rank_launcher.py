"""The rank launcher fails fast and says where: a dead rank at once, a hung one with its stacks."""

from __future__ import annotations

import faulthandler
import os
import threading

import pytest
from dist_utils import run_ranks

pytestmark = pytest.mark.multiprocess


def _rank_one_dies(rank: int, world: int) -> int:
    if rank == 1:
        os._exit(7)  # no report, no exception: as a segfault or the OOM killer leaves it
    return rank


def _rank_one_crashes(rank: int, world: int) -> int:
    if rank == 1:
        faulthandler._sigsegv()  # a real segmentation fault, as a bad native call gives
    return rank


def _rank_one_blocks_forever(rank: int, world: int) -> int:
    if rank == 1:
        threading.Event().wait()  # the frame the hang report must show
    return rank


def test_a_rank_that_dies_silently_fails_the_run_long_before_the_timeout() -> None:
    with pytest.raises(RuntimeError, match=r"died without reporting \(rank 1: exit code 7\)"):
        # rank 0 reports and exits; were the death not noticed, this would wait 200 s
        run_ranks(_rank_one_dies, 2, timeout=200)


def test_a_rank_that_crashes_fails_the_run_with_the_stack_of_the_crash() -> None:
    with pytest.raises(RuntimeError) as raised:
        run_ranks(_rank_one_crashes, 2, timeout=200)
    report = str(raised.value)
    assert "rank 1: exit code -11" in report
    assert "Segmentation fault" in report and "_rank_one_crashes" in report


def test_a_hung_rank_fails_the_run_with_its_stacks() -> None:
    with pytest.raises(TimeoutError) as raised:
        run_ranks(_rank_one_blocks_forever, 2, timeout=20)
    report = str(raised.value)
    assert "ranks [1] did not report within 20 s" in report
    assert "--- rank 1 (alive) ---" in report
    assert "_rank_one_blocks_forever" in report


def test_ranks_that_report_give_their_results_in_rank_order() -> None:
    assert run_ranks(_identity, 3) == [0, 1, 2]


def _identity(rank: int, world: int) -> int:
    return rank
