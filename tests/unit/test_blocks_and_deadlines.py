"""Block arithmetic and the deadline set."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from kvxferd.core.blocks import blocks_complete, blocks_needed, fingerprint, merge_runs, runs_of
from kvxferd.core.deadlines import Deadlines
from kvxferd.core.effects import Run


def test_blocks_complete_counts_the_partial_last_block_only_at_the_end() -> None:
    assert blocks_needed(33, 16) == 3
    assert [blocks_complete(t, 33, 16) for t in (0, 15, 16, 31, 32, 33)] == [0, 0, 1, 1, 2, 3]


@settings(max_examples=200, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=40, unique_by=(lambda p: p[1])))
def test_runs_cover_exactly_the_given_pairs(pairs: list[tuple[int, int]]) -> None:
    src = [p[0] for p in pairs]
    dst = [p[1] for p in pairs]
    runs = runs_of(src, dst)
    expanded = [(r.src + i, r.dst + i) for r in runs for i in range(r.length)]
    assert expanded == pairs
    for a, b in itertools.pairwise(runs):
        assert not (a.src + a.length == b.src and a.dst + a.length == b.dst), "runs are maximal"
    merged = merge_runs(runs)
    assert sorted((r.src + i, r.dst + i) for r in merged for i in range(r.length)) == sorted(pairs)


def test_merge_runs_joins_across_requests() -> None:
    assert merge_runs([Run(8, 31, 2), Run(5, 20, 2), Run(7, 22, 1)]) == (Run(5, 20, 3), Run(8, 31, 2))


def test_fingerprint_depends_on_shape_not_on_nothing() -> None:
    base = fingerprint("r", 40, [1, 2, 3], [4, 5, 6], [(1, 0, 40)], 8)
    assert base == fingerprint("r", 40, [1, 2, 3], [4, 5, 6], [(1, 0, 40)], 8)
    assert base != fingerprint("r", 40, [1, 2, 3], [4, 5, 7], [(1, 0, 40)], 8)
    assert base != fingerprint("r", 40, [1, 2, 3], [4, 5, 6], [(1, 0, 20), (2, 20, 20)], 8)
    assert base != fingerprint("r", 40, [1, 2, 3], [4, 5, 6], [(1, 0, 40)], 7)


def test_deadlines_move_cancel_and_pop_in_order() -> None:
    d = Deadlines()
    d.set("a", 5.0)
    d.set("b", 3.0)
    d.set("c", 4.0)
    d.set("b", 6.0)  # moved later: its old entry must not fire
    d.cancel("c")
    assert d.earliest() == 5.0
    assert list(d.pop_due(5.5)) == ["a"]
    assert d.earliest() == 6.0 and len(d) == 1
    assert list(d.pop_due(10.0)) == ["b"]
    assert d.earliest() is None


def test_deadlines_compact_stale_entries() -> None:
    d = Deadlines()
    for i in range(1000):
        d.set("k", float(i))
    assert len(d._heap) < 100
    assert list(d.pop_due(2000.0)) == ["k"]
