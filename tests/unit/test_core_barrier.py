"""The barrier service's pure state: keyed agreement, verdicts, expiry, bounds."""

from __future__ import annotations

import pytest

from kvxferd.core import BarrierState, Problem, ToRank
from kvxferd.protocol import Ack, Arrive, Digest, Diverged, ErrorCode, Expired, Hello, Release, Status, Withdraw

D = Digest(4, 2, 1024, "aa")


def barrier(world: int = 3, **kw: float) -> BarrierState:
    b = BarrierState(timeout_s=10.0, **kw)  # type: ignore[arg-type]
    for r in range(world):
        assert b.hello(Hello("g", r, world, "prefill")) == [ToRank("g", r, Ack("hello"))]
    return b


def test_release_only_when_every_rank_arrived_with_the_same_digest() -> None:
    b = barrier()
    assert b.handle(Arrive("g", "k", 2, D), 0.0) == []
    assert b.handle(Arrive("g", "k", 0, D), 0.1) == []
    out = b.handle(Arrive("g", "k", 1, D), 0.2)
    assert out == [ToRank("g", r, Release("g", "k", D)) for r in range(3)]
    assert b.sizes()["open"] == 0 and b.next_deadline() is None


def test_different_digests_diverge_with_every_ranks_view() -> None:
    b = barrier(2)
    other = Digest(4, 2, 2048, "aa")
    b.handle(Arrive("g", "k", 0, D), 0.0)
    out = b.handle(Arrive("g", "k", 1, other), 0.0)
    assert all(isinstance(e.message, Diverged) for e in out) and len(out) == 2
    verdict = out[0].message
    assert [v.digest for v in verdict.views] == [D, other]
    assert verdict.status is Status.FAILED
    assert "2048 B" in verdict.describe() and "1024 B" in verdict.describe()


def test_a_withdrawal_diverges_once_all_spoke_and_aborted_wins_the_status() -> None:
    b = barrier(3)
    b.handle(Arrive("g", "k", 0, D), 0.0)
    b.handle(Withdraw("g", "k", 1, Status.FAILED, "timed out"), 0.0)
    out = b.handle(Withdraw("g", "k", 2, Status.ABORTED, "client cancelled"), 0.0)
    verdict = out[0].message
    assert isinstance(verdict, Diverged) and verdict.status is Status.ABORTED
    assert [v.status for v in verdict.views] == [Status.OK, Status.FAILED, Status.ABORTED]


def test_expiry_names_missing_ranks_tells_everyone_and_answers_stragglers() -> None:
    b = barrier(3)
    b.handle(Arrive("g", "k", 0, D), 1.0)
    b.handle(Withdraw("g", "k", 2, Status.ABORTED, "x"), 2.0)
    assert b.next_deadline() == 11.0
    assert b.on_timer(10.9) == []
    out = b.on_timer(11.0)
    assert out == [ToRank("g", r, Expired("g", "k", (1,), 10.0)) for r in range(3)]
    # the straggler gets the same verdict at once, and no new key opens
    assert b.handle(Arrive("g", "k", 1, D), 12.0) == [ToRank("g", 1, Expired("g", "k", (1,), 10.0))]
    assert b.sizes() == {"groups": 1, "open": 0, "expired": 1}
    b.on_timer(21.0)  # remembered for another timeout, then forgotten
    assert b.sizes()["expired"] == 0


def test_a_named_barrier_may_set_its_own_timeout() -> None:
    b = barrier(2)
    b.handle(Arrive("g", "ready", 0, D, 60.0), 0.0)
    assert b.next_deadline() == 60.0
    (verdict, _) = b.on_timer(60.0)
    assert verdict.message == Expired("g", "ready", (1,), 60.0)
    assert b.handle(Arrive("g", "ready", 1, D), 100.0) == [ToRank("g", 1, Expired("g", "ready", (1,), 60.0))]
    b.on_timer(120.0)
    assert b.sizes()["expired"] == 0


def test_repeating_a_word_is_harmless_changing_it_is_refused() -> None:
    b = barrier(2)
    b.handle(Arrive("g", "k", 0, D), 0.0)
    assert b.handle(Arrive("g", "k", 0, D), 0.0) == []
    (p,) = b.handle(Withdraw("g", "k", 0, Status.FAILED, "oops"), 0.0)
    assert isinstance(p, Problem) and p.code is ErrorCode.CONFLICT and "already said" in p.detail


def test_unknown_group_conflicting_size_and_rank_outside_the_group() -> None:
    b = barrier(2)
    (p,) = b.handle(Arrive("other", "k", 0, D), 0.0)
    assert p.code is ErrorCode.NOT_REGISTERED and "send Hello first" in p.detail
    (p,) = b.hello(Hello("g", 0, 4, "prefill"))
    assert p.code is ErrorCode.CONFLICT and "world size 2" in p.detail
    (p,) = b.handle(Arrive("g", "k", 3, D), 0.0)
    assert p.code is ErrorCode.BAD_MESSAGE


def test_open_keys_are_bounded() -> None:
    b = barrier(2, max_keys=2)
    b.handle(Arrive("g", "a", 0, D), 0.0)
    b.handle(Arrive("g", "b", 0, D), 0.0)
    (p,) = b.handle(Arrive("g", "c", 0, D), 0.0)
    assert p.code is ErrorCode.TABLE_FULL


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_groups_and_keys_are_independent(order: tuple[int, ...]) -> None:
    b = barrier(3)
    for r in (0, 1):
        b.hello(Hello("h", r, 2, "prefill"))
    out = []
    for r in order:
        out += b.handle(Arrive("g", "same-key", r, D), 0.0)
        if r < 2:
            out += b.handle(Arrive("h", "same-key", r, D), 0.0)
    assert sorted((e.group, e.rank) for e in out) == [("g", 0), ("g", 1), ("g", 2), ("h", 0), ("h", 1)]
