"""The barrier service's pure state: admission, keyed agreement, one ending per instance, expiry, bounds."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvxferd.core import BarrierState, Problem, ToRank
from kvxferd.errors import LocalProtocolError
from kvxferd.protocol import (
    STARTUP_KEY,
    Ack,
    Admit,
    Admitted,
    Arrive,
    Digest,
    Diverged,
    ErrorCode,
    Expired,
    Hello,
    Release,
    Status,
    Terms,
    Withdraw,
    encode,
)
from kvxferd.protocol.fields import MAX_TEXT

D = Digest(4, 2, 1024, "aa")
T = Terms(40, 3, 7, "3 blocks #a", "3 blocks #b", "ipc:///d-{rank}", "auto")


def barrier(world: int = 3, **kw: float) -> BarrierState:
    kw.setdefault("max_wait_s", 120.0)
    b = BarrierState(timeout_s=10.0, **kw)  # type: ignore[arg-type]
    for r in range(world):
        assert b.hello(Hello("g", r, world, "prefill"), 0.0) == [ToRank("g", r, Ack("hello 0"))]
    return b


def admit_all(b: BarrierState, world: int, key: str = "k", instance: int = 0, now: float = 0.0) -> None:
    out = []
    for r in range(world):
        out += b.handle(Admit("g", key, instance, r, T), now)
    assert out == [ToRank("g", r, Admitted("g", key, instance)) for r in range(world)]


def test_nothing_is_admitted_until_every_rank_admitted_with_equal_terms() -> None:
    b = barrier()
    assert b.handle(Admit("g", "k", 0, 2, T), 0.0) == []
    assert b.handle(Admit("g", "k", 0, 0, T), 0.1) == []
    out = b.handle(Admit("g", "k", 0, 1, T), 0.2)
    assert out == [ToRank("g", r, Admitted("g", "k", 0)) for r in range(3)]
    assert b.sizes()["open"] == 1  # the completion round is open now
    # a repeated admission is harmless, and answered (the rank may have lost the first answer)
    assert b.handle(Admit("g", "k", 0, 1, T), 0.3) == [ToRank("g", 1, Admitted("g", "k", 0))]


def test_release_only_when_every_admitted_rank_arrived_with_the_same_digest() -> None:
    b = barrier()
    admit_all(b, 3)
    assert b.handle(Arrive("g", "k", 0, 2, D), 1.0) == []
    assert b.handle(Arrive("g", "k", 0, 0, D), 1.1) == []
    out = b.handle(Arrive("g", "k", 0, 1, D), 1.2)
    assert out == [ToRank("g", r, Release("g", "k", 0, D, T.peer)) for r in range(3)]
    assert b.sizes()["open"] == 0
    # the verdict is remembered a while: a word that crossed it gets it again, no key opens
    assert b.handle(Withdraw("g", "k", 0, 1, Status.ABORTED, "late"), 2.0) == [ToRank("g", 1, out[1].message)]
    assert b.next_deadline() == 12.0
    b.on_timer(12.0)
    assert b.sizes() == {"groups": 1, "open": 0, "ended": 0, "retelling": 0} and b.next_deadline() is None


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("num_tokens", 44),
        ("dst_blocks", "3 blocks #c"),
        ("dst_generations", "2 names #d"),
        ("src_blocks", "3 blocks #z"),
        ("peer", "ipc:///elsewhere-{rank}"),
        ("transport", "rdma"),
        ("slot", 4),
        ("step", 8),
    ],
)
def test_admission_divergence_names_the_field_and_the_ranks(field: str, other: object) -> None:
    b = barrier(3)
    odd = Terms(**{**{n: getattr(T, n) for n in Terms.FIELDS}, field: other})
    b.handle(Admit("g", "k", 0, 0, T), 0.0)
    b.handle(Admit("g", "k", 0, 1, odd), 0.0)
    out = b.handle(Admit("g", "k", 0, 2, T), 0.0)
    verdicts = [e.message for e in out]
    assert len(verdicts) == 3 and all(v == verdicts[0] for v in verdicts)
    (v,) = set(verdicts)
    assert isinstance(v, Diverged) and v.status is Status.FAILED
    assert f"disagree on the cache_info: {field} (ranks [0, 2]: {getattr(T, field)}; rank 1: {other})" in v.reason
    assert "nothing was written" in v.reason
    assert v.peer == T.peer
    assert b.sizes()["open"] == 0  # the instance ended: no completion round


def test_a_withdrawal_replaces_an_admission_and_ends_the_instance_as_aborted() -> None:
    b = barrier(2)
    b.handle(Admit("g", "k", 0, 0, T), 0.0)
    assert b.handle(Withdraw("g", "k", 0, 0, Status.ABORTED, "client cancelled"), 0.1) == []
    out = b.handle(Withdraw("g", "k", 0, 1, Status.ABORTED, "client cancelled"), 0.2)
    (v,) = {e.message for e in out}
    assert isinstance(v, Diverged) and (v.status, v.reason) == (Status.ABORTED, "aborted: client cancelled")
    assert v.peer == T.peer  # named by rank 0's admission, so every rank can tell its decode rank


def test_a_failed_withdrawal_wins_over_an_abort_so_a_refusing_rank_knows_the_status() -> None:
    b = barrier(3)
    admit_all(b, 3)
    b.handle(Withdraw("g", "k", 0, 0, Status.ABORTED, "client cancelled"), 0.0)
    b.handle(Arrive("g", "k", 0, 1, D), 0.0)
    out = b.handle(Withdraw("g", "k", 0, 2, Status.FAILED, "peer gone"), 0.0)
    (v,) = {e.message for e in out}
    assert isinstance(v, Diverged) and v.status is Status.FAILED
    assert v.reason == "rank 2 failed: peer gone"
    assert [w.status for w in v.views] == [Status.ABORTED, Status.OK, Status.FAILED]


def test_different_digests_diverge_with_every_ranks_view() -> None:
    b = barrier(2)
    admit_all(b, 2)
    other = Digest(4, 2, 2048, "aa")
    b.handle(Arrive("g", "k", 0, 0, D), 0.0)
    out = b.handle(Arrive("g", "k", 0, 1, other), 0.0)
    verdict = out[0].message
    assert isinstance(verdict, Diverged) and verdict.status is Status.FAILED
    assert [v.digest for v in verdict.views] == [D, other]
    assert "2048 B" in verdict.reason and "1024 B" in verdict.reason


def test_an_arrival_into_an_admission_round_means_a_lost_admission_and_completes_it() -> None:
    # the service restarted after admitting: rank 1 had its Admitted and arrives, rank 0 lost its
    # Admitted and admits again, rank 2 arrives too
    b = barrier(3)
    assert b.handle(Admit("g", "k", 0, 0, T), 0.0) == []
    assert b.handle(Arrive("g", "k", 0, 1, D), 0.1) == [ToRank("g", 0, Admitted("g", "k", 0))]
    assert b.handle(Admit("g", "k", 0, 2, T), 0.2) == [ToRank("g", 2, Admitted("g", "k", 0))]
    assert b.handle(Arrive("g", "k", 0, 2, D), 0.3) == []
    out = b.handle(Arrive("g", "k", 0, 0, D), 0.4)
    assert out == [ToRank("g", r, Release("g", "k", 0, D, T.peer)) for r in range(3)]


def test_a_reopened_round_keeps_withdrawals_and_refuses_changed_words() -> None:
    b = barrier(2)
    assert b.handle(Withdraw("g", "k", 0, 0, Status.FAILED, "write failed"), 0.0) == []
    out = b.handle(Arrive("g", "k", 0, 1, D), 0.1)  # the withdrawal was of the completion round
    (v,) = {e.message for e in out}
    assert isinstance(v, Diverged) and v.status is Status.FAILED and "write failed" in v.reason
    assert [e.rank for e in out] == [0, 1]
    b2 = barrier(2)
    b2.handle(Arrive("g", "k", 0, 0, D), 0.0)
    other = Terms(41, 3, 7, "3 blocks #a", "3 blocks #b", "ipc:///d-{rank}", "auto")
    assert b2.handle(Admit("g", "k", 0, 1, T), 0.1) == [ToRank("g", 1, Admitted("g", "k", 0))]
    (p,) = b2.handle(Admit("g", "k", 0, 1, other), 0.2)  # admitting other terms is not a repeat
    assert isinstance(p, Problem) and p.code is ErrorCode.CONFLICT and "admits in the completion round" in p.detail


def test_a_withdrawal_of_an_admitted_rank_reopens_the_completion_round_not_the_admission() -> None:
    # after a restart, Admits sent before the old service answered reach the new one; ranks 0 and 1
    # had been admitted and are writing. Rank 2 was admitted too and aborts: its word must not end
    # the instance while the others write, it waits for their words of the completion round.
    b = barrier(3)
    assert b.handle(Admit("g", "k", 0, 0, T), 0.0) == []
    assert b.handle(Admit("g", "k", 0, 1, T), 0.0) == []
    out = b.handle(Withdraw("g", "k", 0, 2, Status.ABORTED, "client cancelled", admitted=True), 0.1)
    assert out == [ToRank("g", 0, Admitted("g", "k", 0)), ToRank("g", 1, Admitted("g", "k", 0))]
    assert b.handle(Arrive("g", "k", 0, 0, D), 0.2) == []
    out = b.handle(Withdraw("g", "k", 0, 1, Status.ABORTED, "client cancelled", admitted=True), 0.3)
    (v,) = {e.message for e in out}
    assert isinstance(v, Diverged) and v.status is Status.ABORTED and [e.rank for e in out] == [0, 1, 2]


def test_every_ack_of_a_hello_names_the_services_epoch() -> None:
    old, new = BarrierState(epoch="a1"), BarrierState(epoch="b2")
    assert old.hello(Hello("g", 0, 2, "prefill"), 0.0) == [ToRank("g", 0, Ack("hello a1"))]
    assert new.hello(Hello("g", 0, 2, "prefill"), 0.0) == [ToRank("g", 0, Ack("hello b2"))]


def _serving(alive_s: float = 3.0) -> BarrierState:
    b = BarrierState(timeout_s=10.0, alive_s=alive_s)
    b.hello(Hello("g", 0, 2, "prefill", serving="fp-a"), 0.0)
    b.hello(Hello("g", 1, 2, "prefill", serving="fp-a"), 0.0)
    return b


def test_a_rank_starting_while_its_group_serves_joins_at_once() -> None:
    b = _serving()
    b.hello(Hello("g", 1, 2, "prefill"), 1.0)  # rank 1 restarted: not serving yet
    mine = Digest(0, 0, 0, "fp-a")
    out = b.handle(Arrive("g", STARTUP_KEY, 0, 1, mine), 1.0)
    assert out == [ToRank("g", 1, Release("g", STARTUP_KEY, 0, mine))]
    assert b.sizes()["open"] == 0  # no round was opened for the others to join


def test_a_rank_that_reached_a_new_service_before_its_group_s_heartbeat_joins_once_heard() -> None:
    # issue 23, item 3: the service and prefill rank 1 restarted together; rank 1 arrives at the
    # start-up key before rank 0's first heartbeat reached the new service
    b = BarrierState(timeout_s=10.0, epoch="new")
    b.hello(Hello("g", 1, 2, "prefill"), 0.0)
    mine = Digest(0, 0, 0, "fp-a")
    assert b.handle(Arrive("g", STARTUP_KEY, 0, 1, mine), 0.1) == []  # no live rank known yet
    out = b.hello(Hello("g", 0, 2, "prefill", serving="fp-a"), 0.2)
    assert out == [ToRank("g", 1, Release("g", STARTUP_KEY, 0, mine)), ToRank("g", 0, Ack("hello new"))]
    assert b.sizes()["open"] == 0 and b.on_timer(20.0) == []  # nothing left to expire
    # a joiner with another configuration is told so, as when it arrives after the heartbeat
    b = BarrierState(timeout_s=10.0)
    b.hello(Hello("g", 1, 2, "prefill"), 0.0)
    b.handle(Arrive("g", STARTUP_KEY, 0, 1, Digest(0, 0, 0, "fp-b")), 0.1)
    (told, _) = b.hello(Hello("g", 0, 2, "prefill", serving="fp-a"), 0.2)
    assert told.rank == 1 and isinstance(told.message, Diverged) and "ranks [0]" in told.message.reason


def test_a_joiner_hears_every_verdict_still_remembered_for_its_group() -> None:
    b = _serving()
    for r in (0, 1):
        b.handle(Admit("g", "k", 0, r, T), 0.5)
    for r in (0, 1):
        b.handle(Arrive("g", "k", 0, r, D), 0.6)
    b.handle(Admit("g", "gone", 0, 0, T), 0.5)
    expired = b.on_timer(10.6)  # rank 1 died before it admitted "gone"
    assert {type(e.message) for e in expired} == {Expired}
    b.hello(Hello("g", 0, 2, "prefill", serving="fp-a"), 10.7)
    mine = Digest(0, 0, 0, "fp-a")
    out = b.handle(Arrive("g", STARTUP_KEY, 0, 1, mine), 10.8)  # rank 1's successor starts
    assert out[0] == ToRank("g", 1, Release("g", STARTUP_KEY, 0, mine))
    told = {(type(e.message).__name__, e.message.key) for e in out[1:]}
    assert told == {("Release", "k"), ("Expired", "gone")} and {e.rank for e in out[1:]} == {1}
    assert all(e.message.peer == T.peer for e in out[1:])


def test_a_restarted_rank_ends_the_rounds_its_predecessor_held() -> None:
    b = _serving()
    b.handle(Admit("g", "a", 0, 0, T), 0.5)  # waits for rank 1's word
    b.handle(Admit("g", "b", 0, 1, T), 0.5)  # rank 1 (the old process) spoke; waits for rank 0
    b.hello(Hello("g", 0, 2, "prefill", serving="fp-a"), 1.0)
    # rank 1's new process says Hello as starting: what its predecessor held ends at once
    out = b.hello(Hello("g", 1, 2, "prefill"), 1.0)
    assert out[-1] == ToRank("g", 1, Ack("hello 0"))
    ended = {e.message.key: e.message for e in out[:-1] if isinstance(e.message, Expired)}
    assert set(ended) == {"a", "b"} and {e.rank for e in out[:-1]} == {0, 1}
    assert all("rank 1 of group g restarted before reporting" in v.reason for v in ended.values())
    assert b.sizes()["open"] == 0
    # and its join repeats them to it, among the verdicts remembered
    out = b.handle(Arrive("g", STARTUP_KEY, 0, 1, Digest(0, 0, 0, "fp-a")), 1.1)
    assert {e.message.key for e in out[1:]} == {"a", "b"} and {e.rank for e in out} == {1}


def test_a_whole_group_restarting_within_alive_s_cold_starts_even_with_a_new_config() -> None:
    b = _serving()  # both served with fp-a until t=0; both restart with fp-b
    b.hello(Hello("g", 0, 2, "prefill"), 1.0)
    b.hello(Hello("g", 1, 2, "prefill"), 1.0)
    new = Digest(0, 0, 0, "fp-b")
    assert b.handle(Arrive("g", STARTUP_KEY, 0, 0, new), 1.1) == []  # no live rank: a cold start
    out = b.handle(Arrive("g", STARTUP_KEY, 0, 1, new), 1.2)
    assert out == [ToRank("g", r, Release("g", STARTUP_KEY, 0, new)) for r in range(2)]


def test_rounds_waiting_for_a_rank_whose_heartbeats_stopped_end_at_once() -> None:
    b = _serving(alive_s=3.0)  # both ranks serving since t=0
    assert b.handle(Admit("g", "k", 0, 0, T), 1.0) == []
    b.hello(Hello("g", 0, 2, "prefill", serving="fp-a"), 2.5)  # rank 0 beats on; rank 1 falls silent
    assert b.next_deadline() == pytest.approx(3.001)
    out = b.on_timer(3.001)
    (v,) = {e.message for e in out}
    assert isinstance(v, Expired) and v.missing == (1,) and [e.rank for e in out] == [0, 1]
    assert "rank 1 of group g stopped serving (no heartbeat)" in v.reason
    # while it is stopped, a new round waiting for it ends at the first word
    out = b.handle(Admit("g", "k2", 0, 0, T), 3.5)
    assert [e.rank for e in out] == [0, 1] and all(isinstance(e.message, Expired) for e in out)
    assert "stopped serving" in out[0].message.reason
    # its next heartbeat ends that: rounds wait for it again
    b.hello(Hello("g", 1, 2, "prefill", serving="fp-a"), 4.0)
    assert b.handle(Admit("g", "k3", 0, 0, T), 4.1) == []
    out = b.handle(Admit("g", "k3", 0, 1, T), 4.2)
    assert {type(e.message) for e in out} == {Admitted}


def test_the_ranks_taken_as_stopped_are_named_for_operators_until_heard_again() -> None:
    b = _serving(alive_s=3.0)
    b.handle(Admit("g", "k", 0, 0, T), 1.0)
    b.hello(Hello("g", 0, 2, "prefill", serving="fp-a"), 2.5)
    assert b.stopped() == []
    b.on_timer(3.001)
    assert b.stopped() == ["g:1"]
    b.hello(Hello("g", 1, 2, "prefill", serving="fp-a"), 4.0)
    assert b.stopped() == []


def test_after_a_stall_of_the_service_the_first_words_of_each_rank_count_as_heartbeats() -> None:
    # the service was stopped for 20 s; what the ranks sent meanwhile is read before any timer
    b = _serving(alive_s=3.0)
    assert b.handle(Admit("g", "k", 0, 0, T), 20.0) == []
    assert b.handle(Admit("g", "j", 0, 1, T), 20.0) == []
    assert b.on_timer(20.0) == []  # nobody stopped: both were just heard
    assert b.sizes()["open"] == 2


def test_a_group_restarting_within_alive_s_is_not_failed_by_its_old_heartbeats() -> None:
    b = _serving(alive_s=3.0)  # both ranks served until t=0, then the whole group restarts
    mine = Digest(0, 0, 0, "fp-a")
    b.hello(Hello("g", 0, 2, "prefill"), 3.5)
    assert b.handle(Arrive("g", STARTUP_KEY, 0, 0, mine), 3.5) == []  # rank 1 is still starting
    assert b.on_timer(3.6) == []  # the old records are stale now: the start-up round still waits
    out = b.handle(Arrive("g", STARTUP_KEY, 0, 1, mine), 4.0)
    assert out == [ToRank("g", r, Release("g", STARTUP_KEY, 0, mine)) for r in range(2)]


def test_a_rank_joining_with_another_config_is_told_which_ranks_differ() -> None:
    b = _serving()
    (e,) = b.handle(Arrive("g", STARTUP_KEY, 0, 1, Digest(0, 0, 0, "fp-b")), 1.0)
    assert e.rank == 1 and isinstance(e.message, Diverged) and e.message.status is Status.FAILED
    assert "ranks [0]" in e.message.reason and "another configuration" in e.message.reason


def test_ranks_not_heard_within_alive_s_do_not_count_so_a_cold_start_waits_for_all() -> None:
    b = _serving(alive_s=3.0)
    mine = Digest(0, 0, 0, "fp-a")
    assert b.handle(Arrive("g", STARTUP_KEY, 0, 1, mine), 10.0) == []  # rank 0 silent since t=0
    assert b.live("g", 10.0) == {}
    out = b.handle(Arrive("g", STARTUP_KEY, 0, 0, mine), 10.5)
    assert out == [ToRank("g", r, Release("g", STARTUP_KEY, 0, mine)) for r in range(2)]


def test_expiry_names_missing_ranks_tells_everyone_and_answers_stragglers() -> None:
    b = barrier(3)
    b.handle(Admit("g", "k", 0, 0, T), 1.0)
    b.handle(Withdraw("g", "k", 0, 2, Status.ABORTED, "x"), 2.0)
    assert b.next_deadline() == 11.0
    assert b.on_timer(10.9) == []
    out = b.on_timer(11.0)
    (v,) = {e.message for e in out}
    assert [e.rank for e in out] == [0, 1, 2]
    assert isinstance(v, Expired) and v.missing == (1,) and v.status is Status.ABORTED
    assert v.reason == "aborted: x (rank 1 of group g did not report within 10s (admission))"
    assert v.peer == T.peer
    # the straggler gets the same verdict at once, and no new key opens
    assert b.handle(Admit("g", "k", 0, 1, T), 12.0) == [ToRank("g", 1, v)]
    assert b.sizes() == {"groups": 1, "open": 0, "ended": 1, "retelling": 0}
    b.on_timer(21.0)  # remembered for another timeout, then forgotten
    assert b.sizes()["ended"] == 0


def test_a_new_instance_of_an_expired_id_starts_clean() -> None:
    b = barrier(2)
    b.handle(Admit("g", "k", 0, 0, T), 0.0)
    b.on_timer(10.0)  # instance 0 expired and is remembered
    admit_all(b, 2, instance=1, now=10.5)
    b.handle(Arrive("g", "k", 1, 0, D), 11.0)
    out = b.handle(Arrive("g", "k", 1, 1, D), 11.0)
    assert {e.message for e in out} == {Release("g", "k", 1, D, T.peer)}


def test_a_named_barrier_is_one_round_of_arrivals_with_its_own_timeout() -> None:
    b = barrier(2)
    b.handle(Arrive("g", "ready", 0, 0, D, 60.0), 0.0)
    assert b.next_deadline() == 60.0
    (verdict, _) = b.on_timer(60.0)
    assert isinstance(verdict.message, Expired) and verdict.message.missing == (1,)
    # a start-up verdict is not remembered: a rank arriving later is a new try, not told the old
    # one's expiry (it would exit, be started again and hear it again, for as long as remembered)
    assert b.handle(Arrive("g", "ready", 0, 1, D), 100.0) == []
    assert b.sizes()["ended"] == 0 and b.sizes()["open"] == 1
    (p,) = b.handle(Admit("g", "ready", 0, 0, T), 130.0)
    assert p.code is ErrorCode.BAD_MESSAGE and b.sizes()["open"] == 1  # only an arrival names it


def test_repeating_a_word_is_harmless_changing_it_is_refused() -> None:
    b = barrier(2)
    admit_all(b, 2)
    b.handle(Arrive("g", "k", 0, 0, D), 0.0)
    assert b.handle(Arrive("g", "k", 0, 0, D), 0.0) == []
    (p,) = b.handle(Withdraw("g", "k", 0, 0, Status.FAILED, "oops"), 0.0)
    assert isinstance(p, Problem) and p.code is ErrorCode.CONFLICT and "already said" in p.detail
    b.handle(Admit("g", "j", 0, 0, T), 0.0)
    (p,) = b.handle(Admit("g", "j", 0, 0, Terms(41, 3, 7, "a", "b", "p", "auto")), 0.0)
    assert p.code is ErrorCode.CONFLICT
    b.handle(Withdraw("g", "j", 0, 1, Status.FAILED, "refused"), 0.0)  # rank 0 admitted, rank 1 withdrew: ends
    assert b.sizes()["open"] == 1


def test_long_reasons_make_a_verdict_that_still_fits_the_protocol() -> None:
    b = barrier(3)
    for r in range(3):
        out = b.handle(Withdraw("g", "k", 0, r, Status.FAILED, "x" * MAX_TEXT), 0.0)
    (v,) = {e.message for e in out}
    assert len(v.reason) <= MAX_TEXT and "cut from" in v.reason
    assert encode(v)


def test_unknown_group_conflicting_size_and_rank_outside_the_group() -> None:
    b = barrier(2)
    (p,) = b.handle(Arrive("other", "k", 0, 0, D), 0.0)
    assert p.code is ErrorCode.NOT_REGISTERED and "send Hello first" in p.detail
    (p,) = b.hello(Hello("g", 0, 4, "prefill"), 0.0)
    assert p.code is ErrorCode.CONFLICT and "world size 2" in p.detail
    (p,) = b.handle(Admit("g", "k", 0, 3, T), 0.0)
    assert p.code is ErrorCode.BAD_MESSAGE


def test_open_keys_are_bounded() -> None:
    b = barrier(2, max_keys=2)
    b.handle(Admit("g", "a", 0, 0, T), 0.0)
    b.handle(Admit("g", "a", 1, 0, T), 0.0)
    (p,) = b.handle(Admit("g", "c", 0, 0, T), 0.0)
    assert p.code is ErrorCode.TABLE_FULL


def test_one_group_filling_its_keys_does_not_starve_another() -> None:
    b = barrier(2, max_keys=2)
    b.hello(Hello("h", 0, 1, "prefill"), 0.0)
    for key in ("a", "b"):
        b.handle(Admit("g", key, 0, 0, T), 0.0)
    (p,) = b.handle(Admit("g", "c", 0, 0, T), 0.0)
    assert p.code is ErrorCode.TABLE_FULL and "group 'g'" in p.detail
    (ok,) = b.handle(Admit("h", "c", 0, 0, T), 0.0)  # a one-rank group is released at once
    assert isinstance(ok.message, Admitted)
    b.on_timer(10.0)  # g's keys expire and free its share
    assert [e.message for e in b.handle(Admit("g", "d", 0, 0, T), 10.0)] == []
    assert b.sizes()["open"] == 1


@pytest.mark.parametrize("asked", [float("inf"), float("nan"), 1e300, float(2**63 - 1), -1.0])
def test_an_arrival_timeout_out_of_range_is_refused_at_the_edge(asked: float) -> None:
    with pytest.raises(LocalProtocolError, match="timeout_s"):
        Arrive("g", "k", 0, 0, D, asked)


@pytest.mark.parametrize(("asked", "deadline"), [(86400.0, 60.0), (30.0, 30.0), (0.0, 10.0)])
def test_a_rank_cannot_keep_a_key_open_longer_than_the_cap(asked: float, deadline: float) -> None:
    b = BarrierState(timeout_s=10.0, max_wait_s=60.0)
    b.hello(Hello("g", 0, 2, "prefill"), 0.0)
    b.handle(Arrive("g", "k", 0, 0, D, asked), 0.0)
    assert b.next_deadline() == deadline


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_groups_and_keys_are_independent(order: tuple[int, ...]) -> None:
    b = barrier(3)
    for r in (0, 1):
        b.hello(Hello("h", r, 2, "prefill"), 0.0)
    out = []
    for r in order:
        out += b.handle(Admit("g", "same-key", 0, r, T), 0.0)
        if r < 2:
            out += b.handle(Admit("h", "same-key", 0, r, T), 0.0)
    assert sorted((e.group, e.rank) for e in out) == [("g", 0), ("g", 1), ("g", 2), ("h", 0), ("h", 1)]


def test_what_one_rank_withdrew_from_alone_is_bounded_and_the_oldest_ends_first() -> None:
    # issue 23, item 14: rank 0 refuses cache_infos rank 1 never gets (cap: 32 keys / (4 x 2) = 4)
    b = barrier(2, max_keys=32)
    for i in range(4):
        assert b.handle(Withdraw("g", f"r{i}", 0, 0, Status.FAILED, "refused: bad blocks"), 1.0 + i) == []
    out = b.handle(Withdraw("g", "r4", 0, 0, Status.FAILED, "refused: bad blocks"), 5.0)
    (v,) = {e.message for e in out}
    assert [e.rank for e in out] == [0, 1] and isinstance(v, Expired) and v.key == "r0"
    assert v.status is Status.FAILED and v.missing == (1,)
    assert v.reason == (
        "rank 0 failed: refused: bad blocks (rank 1 of group g was not waited for: "
        "rank 0 withdrew alone from 4 newer keys (admission))"
    )
    for i in range(5, 200):
        b.handle(Withdraw("g", f"r{i}", 0, 0, Status.FAILED, "refused"), 5.0)
    assert b.sizes()["open"] == 4  # never more than its share, however many it refuses
    # a key another rank spoke in is no longer held alone, and the legitimate ones still open
    b.handle(Withdraw("g", "r199", 0, 1, Status.FAILED, "refused"), 5.1)
    admit_all(b, 2, key="legit", now=5.2)
    assert b.sizes()["open"] == 4
    # what ended so: rank 1, getting its cache_info late, hears that verdict at once
    (late,) = b.handle(Admit("g", "r195", 0, 1, T), 6.0)
    assert isinstance(late.message, Expired) and late.message.key == "r195" and late.rank == 1


def _with_decode() -> BarrierState:
    """A serving prefill group "g" of 2 whose requests name decode group "d" (2 ranks)."""
    b = BarrierState(timeout_s=10.0, alive_s=3.0, decode_of={"d": "d", "ipc:///d-{rank}": "d"})
    for r in (0, 1):
        b.hello(Hello("g", r, 2, "prefill", serving="fp"), 0.0)
        b.hello(Hello("d", r, 2, "decode", serving="fq"), 0.0)
    return b


def test_the_decode_rank_of_a_prefill_rank_that_died_hears_its_verdicts_from_the_service() -> None:
    # issue 23, item 5: prefill rank 1 dies and never comes back
    b = _with_decode()
    for r in (0, 1):
        b.handle(Admit("g", "done", 0, r, T), 0.5)
        b.handle(Arrive("g", "done", 0, r, D), 0.6)  # released: rank 1 may have died before telling decode
    b.handle(Admit("g", "open", 0, 0, T), 1.0)
    b.handle(Admit("g", "open", 0, 1, T), 1.0)  # admitted; rank 1 dies while writing
    for r in (0, 1):
        b.hello(Hello("g", 0, 2, "prefill", serving="fp"), 3.0)
        b.hello(Hello("d", r, 2, "decode", serving="fq"), 3.0)
    out = b.on_timer(4.001)  # rank 1 last heard at 1.0
    to_decode = [(e.rank, type(e.message).__name__, e.message.key) for e in out if e.group == "d"]
    assert sorted(to_decode) == [(1, "Expired", "open"), (1, "Release", "done")]  # rank 1's decode rank only
    # while it is absent, what ends later is told to its decode rank as well
    out = b.handle(Admit("g", "later", 0, 0, T), 4.1)
    assert [(e.group, e.rank) for e in out] == [("g", 0), ("g", 1), ("d", 1)]
    # once it serves again (a new process joined), its own rank tells decode itself
    b.hello(Hello("g", 1, 2, "prefill", serving="fp"), 5.0)
    b.handle(Admit("g", "k", 0, 0, T), 5.1)
    out = b.handle(Withdraw("g", "k", 0, 1, Status.FAILED, "refused"), 5.2)
    assert {e.group for e in out} == {"g"}


def test_a_restarted_prefill_rank_s_decode_rank_hears_what_its_predecessor_held() -> None:
    b = _with_decode()
    b.handle(Admit("g", "held", 0, 1, T), 0.5)
    out = b.hello(Hello("g", 1, 2, "prefill"), 1.0)  # a new process, still starting
    to_decode = [e for e in out if e.group == "d"]
    assert [(e.rank, e.message.key) for e in to_decode] == [(1, "held")] and isinstance(to_decode[0].message, Expired)


def test_a_restarted_service_counts_a_rank_it_never_heard_as_absent_and_tells_its_decode_rank() -> None:
    # the service and prefill rank 1 died together; rank 1 does not come back (soak: kill-barrier-prefill)
    b = BarrierState(timeout_s=10.0, alive_s=3.0, decode_of={"d": "d"})
    for r in (0, 1):
        b.hello(Hello("d", r, 2, "decode", serving="fq"), 0.0)
    b.hello(Hello("g", 0, 2, "prefill", serving="fp"), 0.0)
    assert b.handle(Arrive("g", "k", 0, 0, D, peer="d"), 0.1) == []  # rank 0 says its arrival again
    assert b.next_deadline() == 3.0
    # rank 1 never heard: absent from now on, and silent, so the round waiting for it ends now
    out = b.on_timer(3.0)
    assert [(e.group, e.rank) for e in out] == [("g", 0), ("g", 1), ("d", 1)]
    assert isinstance(out[-1].message, Expired) and out[-1].message.peer == "d"
    assert "rank 1 of group g not heard since the barrier service started" in out[-1].message.reason
    assert b.stopped() == ["g:1"]


def test_words_a_rank_sent_before_it_restarted_end_when_its_new_process_starts_even_unheard() -> None:
    # found by the property: the service restarted, rank 1's old process said a word to the new run
    # and died before any heartbeat of it; its new process must not conflict with that word
    b = BarrierState(timeout_s=10.0)
    b.hello(Hello("g", 0, 2, "prefill", serving="fp"), 0.0)
    assert b.handle(Withdraw("g", "r1", 0, 1, Status.ABORTED, "client cancelled"), 0.1) == []
    out = b.hello(Hello("g", 1, 2, "prefill"), 0.3)  # the new process starts
    (verdict,) = {e.message for e in out if isinstance(e.message, Expired)}
    assert verdict.key == "r1" and verdict.status is Status.ABORTED
    assert "rank 1 of group g restarted before" in verdict.reason
    # its Admit (the cache_info reached the new process) hears that verdict, no conflict
    (e,) = b.handle(Admit("g", "r1", 0, 1, T), 0.4)
    assert e == ToRank("g", 1, verdict)


def test_a_restarted_service_recalls_its_predecessors_verdicts_and_answers_words_with_them() -> None:
    # issue 23, item 6: a rank's new process whose cache_info comes after the service restarted
    # must hear the group's verdict, not open the key anew and decide it alone
    old = barrier(2)
    old.handle(Admit("g", "k", 0, 0, T), 1.0)
    (expired,) = {e.message for e in old.on_timer(11.0)}
    admit_all(old, 2, "ok", now=11.0)
    for r in range(2):
        old.handle(Arrive("g", "ok", 0, r, D), 11.5)
    taken = old.take_journal()
    decided = [v for v in taken if isinstance(v, (Release, Diverged, Expired))]
    assert [type(v) for v in decided] == [Expired, Release] and decided[0] == expired
    assert [type(e) for e in taken] == [Admit, Expired, Admit, Admit, Arrive, Arrive, Release], "in order"
    assert old.take_journal() == [], "each entry is handed to the journal once"
    new = barrier(2)  # (a new run: its state starts empty)
    assert new.recall(decided[1], 9.9, 100.0) and new.recall(expired, 2.0, 100.0)  # oldest first
    assert not new.recall(expired, 2.0, 100.0), "known already"
    assert not new.recall(Release("g", "old", 0, D), 10.0, 100.0), "older than timeout_s: gone"
    assert new.handle(Admit("g", "k", 0, 1, T), 100.5) == [ToRank("g", 1, expired)]
    assert new.handle(Arrive("g", "ok", 0, 0, D), 100.5) == [ToRank("g", 0, decided[1])]
    assert new.sizes() == {"groups": 1, "open": 0, "ended": 2, "retelling": 0}
    assert [type(e) for e in new.take_journal()] == [Admit, Arrive], "the words, not the recalled verdicts"
    new.on_timer(101.5)  # each is remembered for what was left of its timeout_s
    assert new.sizes()["ended"] == 1
    new.on_timer(108.0)
    assert new.sizes()["ended"] == 0


def test_a_round_whose_ranks_all_died_around_a_restart_is_recalled_and_its_decode_ranks_hear_it() -> None:
    """Found by the property (seed 2026): both ranks admitted, rank 1 arrived, rank 0 died before
    arriving, then the service restarted while rank 1 was stopped and draining, and rank 1 exited
    at its drain deadline without saying anything to the new run. Nobody was left to say the
    round's words again: the new run must recall them, or no decode rank ever hears of the key."""
    groups, decode_of = {"g": 2, "d": 2}, {"dq": "d"}
    old = BarrierState(timeout_s=10.0, alive_s=1.0, groups=groups, decode_of=decode_of)
    terms = replace(T, peer="dq")
    for r in range(2):
        old.handle(Admit("g", "k", 0, r, terms), 0.1)
    old.handle(Arrive("g", "k", 0, 1, D, peer="dq"), 0.2)
    journal = old.take_journal()
    assert [type(e) for e in journal] == [Admit, Admit, Arrive]
    new = BarrierState(timeout_s=10.0, alive_s=1.0, groups=groups, decode_of=decode_of)
    now = 5.0
    assert all(new.recall(e, now - 0.1, now) for e in journal)
    assert new.sizes()["open"] == 1 and new.take_journal() == []
    assert not new.recall(Admit("g", "late", 0, 0, terms), 10.0, now), "older than timeout_s: gone"
    new.hello(Hello("d", 0, 2, "decode", "fp"), now)  # the decode group serves; no prefill rank does
    new.hello(Hello("d", 1, 2, "decode", "fp"), now)
    out = new.on_timer(now + 1.0)  # alive_s on: neither prefill rank was heard, the round ends
    (v,) = {replace(e.message, absent=()) for e in out}
    assert isinstance(v, Expired) and v.status is Status.FAILED and v.missing == (0,)
    assert {(e.group, e.rank, e.message.absent) for e in out if e.group == "d"} == {("d", 0, (0,)), ("d", 1, (1,))}


def test_a_recalled_round_keeps_its_deadline_and_a_rank_that_says_its_word_again_completes_it() -> None:
    old = barrier(2)
    admit_all(old, 2, "k", now=1.0)
    old.handle(Arrive("g", "k", 0, 0, D), 2.0)
    new, now = barrier(2), 5.0  # (the old run's clock and the new one's agree here)
    assert all(new.recall(e, now - (2.0 if isinstance(e, Arrive) else 1.0), now) for e in old.take_journal())
    assert new.next_deadline() == pytest.approx(1.0 + 10.0)  # the completion round's, opened at 1.0
    (release, *_) = {e.message for e in new.handle(Arrive("g", "k", 0, 1, D), 5.5)}
    assert isinstance(release, Release)
    assert new.handle(Arrive("g", "k", 0, 0, D), 5.6) == [ToRank("g", 0, release)]  # said again


def test_a_service_that_knows_its_groups_takes_a_word_before_any_hello_and_decode_hears_the_end() -> None:
    # found by the property: a service restarted while both ranks of a group died; one's exiting
    # withdrawal reached it before any Hello ("group unknown") and nobody ever told decode
    b = BarrierState(timeout_s=10.0, alive_s=1.0, groups={"g": 2, "d": 2}, decode_of={"dq": "d"})
    out = b.handle(Withdraw("g", "k", 0, 1, Status.FAILED, "exiting", True, "dq"), 0.0)
    assert out == [] and b.sizes()["open"] == 1
    out = b.on_timer(1.0)  # alive_s on, rank 0 was never heard: absent and silent, the round ends
    (v,) = {replace(e.message, absent=()) for e in out}
    assert isinstance(v, Expired) and v.status is Status.FAILED and v.missing == (0,)
    assert sorted((e.group, e.rank) for e in out) == [("d", 0), ("g", 0), ("g", 1)]
    # rank 1 (heard only by its word) falls silent too: its decode rank hears what is remembered
    assert [(e.group, e.rank, e.message) for e in b.on_timer(1.1)] == [("d", 1, replace(v, absent=(1,)))]


def test_every_decode_group_a_divergent_cache_info_named_hears_the_verdict() -> None:
    # found by the property: rank 0's cache_info named another decode group than rank 1's; each rank
    # tells only the decode rank its own names, so the other group's ranks must hear it from here
    b = BarrierState(timeout_s=10.0, groups={"g": 2, "d": 2, "e": 2}, decode_of={"dq": "d", "eq": "e"})
    b.handle(Admit("g", "k", 0, 0, replace(T, peer="eq")), 0.0)
    out = b.handle(Admit("g", "k", 0, 1, replace(T, peer="dq")), 0.1)
    (v,) = {replace(e.message, absent=()) for e in out}
    assert isinstance(v, Diverged) and v.peer == "eq"
    # the verdict's own peer too: decode rank e:1's writer (rank 1) named "dq", so tells only d:1
    told = sorted((e.group, e.rank) for e in out)
    assert told == [("d", 0), ("d", 1), ("e", 0), ("e", 1), ("g", 0), ("g", 1)]
    # a word naming yet another peer after the verdict: that group hears it too
    b2 = BarrierState(timeout_s=10.0, groups={"g": 2, "d": 2, "e": 2}, decode_of={"dq": "d", "eq": "e"})
    b2.handle(Admit("g", "k", 0, 0, replace(T, peer="eq")), 0.0)
    (expired,) = {e.message for e in b2.on_timer(10.0) if e.group == "g"}
    out = b2.handle(Admit("g", "k", 0, 1, replace(T, peer="dq")), 11.0)
    assert out == [
        ToRank("g", 1, expired),
        ToRank("d", 0, replace(expired, absent=(0,))),  # every writer of each decode rank: none wrote
        ToRank("d", 1, replace(expired, absent=(1,))),
        ToRank("e", 0, replace(expired, absent=(0,))),  # (e:1's writer named "dq": it never tells e:1)
        ToRank("e", 1, replace(expired, absent=(1,))),
    ]


def test_a_decode_rank_with_several_writers_hears_which_of_them_are_absent() -> None:
    """Prefill group "g" of 4 writes into decode group "d" of 2 (ranks 0, 1 into decode 0; 2, 3
    into decode 1). Rank 3 dies: only decode rank 1 hears, naming rank 3, so it knows its other
    writer (rank 2) is still to be heard from before it may tell its engine."""
    targets = {("g", "d"): {0: (0,), 1: (0,), 2: (1,), 3: (1,)}}
    b = BarrierState(timeout_s=10.0, alive_s=3.0, groups={"g": 4, "d": 2}, decode_of={"dq": "d"}, targets=targets)
    for r in range(4):
        b.hello(Hello("g", r, 4, "prefill", serving="fp"), 0.0)
    for d in range(2):
        b.hello(Hello("d", d, 2, "decode", serving="fq"), 0.0)
    for r in range(4):
        b.handle(Admit("g", "k", 0, r, replace(T, peer="dq")), 0.5)
    for r in range(3):
        b.hello(Hello("g", r, 4, "prefill", serving="fp"), 3.0)
    for d in range(2):
        b.hello(Hello("d", d, 2, "decode", serving="fq"), 3.0)
    out = b.on_timer(3.6)  # rank 3 last heard at 0.5
    to_decode = [(e.rank, e.message.absent) for e in out if e.group == "d"]
    assert to_decode == [(1, (3,))]
    # the other decode group named by a divergent cache_info hears it for every writer of each rank
    two = {0: (0,), 1: (0,)}  # prefill "g" of 2 into decode groups of 1
    b2 = BarrierState(
        timeout_s=10.0, groups={"g": 2, "d": 1, "e": 1}, decode_of={"dq": "d", "eq": "e"},
        targets={("g", "d"): two, ("g", "e"): two},
    )  # fmt: skip
    b2.handle(Admit("g", "k", 0, 0, replace(T, peer="eq")), 0.0)
    out = b2.handle(Admit("g", "k", 0, 1, replace(T, peer="dq")), 0.1)
    # (the verdict names "eq", but rank 1 named "dq" and tells only "d": both hear it from here)
    told = [(e.group, e.rank, e.message.absent) for e in out if e.group != "g"]
    assert told == [("d", 0, (0, 1)), ("e", 0, (0, 1))]


def test_a_rank_starting_anew_after_a_service_restart_has_its_decode_rank_told_what_it_held() -> None:
    """Found by the property (seed 1295674083): the service and prefill rank 1 died together; the
    new service heard rank 1's old Admit again (journal) and then rank 1's new process starting,
    which waits at the start-up barrier and hears no verdict. Its decode rank must hear from here
    how the predecessor's round ended (and what the run recalled), or it never does."""
    b = BarrierState(timeout_s=10.0, alive_s=3.0, groups={"g": 2, "d": 2}, decode_of={"dq": "d"})
    terms = replace(T, peer="dq")
    assert b.recall(Admit("g", "k", 0, 1, terms), 0.5, 1.0)  # the predecessor's word, read back
    assert b.recall(Release("g", "old", 0, D, "dq"), 0.5, 1.0)  # a verdict this run recalled
    out = b.hello(Hello("g", 1, 2, "prefill"), 1.1)  # its new process starts
    to_decode = {(e.rank, e.message.key, type(e.message).__name__, e.message.absent) for e in out if e.group == "d"}
    assert to_decode == {(1, "k", "Expired", (1,)), (1, "old", "Release", (1,))}
    # once it serves, it tells its decode rank itself: the service no longer speaks for it
    b.hello(Hello("g", 1, 2, "prefill", serving="fp"), 2.0)
    assert b.stopped() == [] and b.recall(Release("g", "new", 0, D, "dq"), 0.1, 2.1)
    b.hello(Hello("g", 0, 2, "prefill", serving="fp"), 2.2)
    out = b.handle(Admit("g", "k3", 0, 0, terms), 2.3) + b.handle(Admit("g", "k3", 0, 1, terms), 2.3)
    assert {e.group for e in out} == {"g"}


def test_a_serving_fingerprint_as_long_as_a_hello_allows_cannot_break_the_service() -> None:
    """A Hello's ``serving`` may be as long as a name; a joiner's verdict carries every live rank's
    as a Digest fingerprint, which must take it (it raised inside the core: the service exited)."""
    long = "f" * 256
    b = BarrierState(timeout_s=10.0, alive_s=3.0)
    b.hello(Hello("g", 0, 2, "prefill", serving=long), 0.0)
    b.hello(Hello("g", 1, 2, "prefill"), 1.0)
    (told,) = b.handle(Arrive("g", STARTUP_KEY, 0, 1, Digest(0, 0, 0, "fp-b")), 1.0)
    assert isinstance(told.message, Diverged) and "ranks [0]" in told.message.reason


@pytest.mark.parametrize("word", ["admit", "withdraw"])
def test_only_an_arrival_may_name_the_start_up_key(word: str) -> None:
    """The start-up round's key is the service's own: an admission or withdrawal naming it (no
    request may be called that, so it comes from a buggy or stale key holder) is refused, and
    opens nothing that a rank joining later would find half-forgotten."""
    b = barrier(2)
    msg = Admit("g", STARTUP_KEY, 0, 0, T) if word == "admit" else Withdraw("g", STARTUP_KEY, 0, 0, Status.FAILED, "x")
    (problem,) = b.handle(msg, 0.0)
    assert isinstance(problem, Problem) and problem.code is ErrorCode.BAD_MESSAGE and STARTUP_KEY in problem.detail
    assert b.sizes()["open"] == 0


def test_a_decode_rank_starting_anew_hears_again_what_it_was_told_for_its_absent_writers() -> None:
    """Prefill rank 1 died holding requests; the service told its decode rank 1 how they ended (as
    rank 1's failures). Decode rank 1's process then died too, with what it was told, before its
    engine heard it; rank 1 never came back, so nobody would ever tell the new decode process:
    its engine's blocks would stay reserved. A decode rank saying it starts hears them again."""
    b = BarrierState(timeout_s=10.0, alive_s=3.0, groups={"g": 2, "d": 2}, decode_of={"dq": "d"})
    for r in range(2):
        b.hello(Hello("g", r, 2, "prefill", serving="fp"), 0.0)
        b.hello(Hello("d", r, 2, "decode", serving="fq"), 0.0)
    terms = replace(T, peer="dq")
    b.handle(Admit("g", "k", 0, 0, terms), 0.5)
    b.handle(Admit("g", "k", 0, 1, terms), 0.5)
    b.hello(Hello("g", 1, 2, "prefill"), 1.0)  # rank 1's new process... which dies starting
    out = b.hello(Hello("d", 1, 2, "decode"), 2.0)
    told = [(e.group, e.rank, e.message.key, e.message.absent) for e in out if not isinstance(e.message, Ack)]
    assert ("d", 1, "k", (1,)) in told
    assert not [t for t in told if t[0] == "d" and t[1] != 1]  # only the rank that starts anew
    # once rank 1 serves again (a new process, holding nothing of it), a decode rank 1 starting
    # anew still hears what the service told its predecessor, and only that
    b.hello(Hello("g", 1, 2, "prefill", serving="fp"), 3.0)
    again = [(e.rank, e.message.key, e.message.absent) for e in b.hello(Hello("d", 1, 2, "decode"), 4.0)
             if not isinstance(e.message, Ack)]  # fmt: skip
    assert again == [(1, "k", (1,))]
    assert [e.message for e in b.hello(Hello("d", 0, 2, "decode"), 4.0)] == [Ack("hello 0")]  # (told nothing)


def _released(b: BarrierState, keys: list[str], now: float) -> None:
    terms = replace(T, peer="dq")
    for k in keys:
        for r in range(2):
            b.handle(Admit("g", k, 0, r, terms), now)
        for r in range(2):
            b.handle(Arrive("g", k, 0, r, D), now)


def test_a_rank_made_absent_hands_on_its_groups_verdicts_a_part_at_a_time() -> None:
    """A restart may re-tell every verdict its group remembers (up to max_keys): one message must
    not cost that much at once. The first part goes at once; the rest at the next runs of the
    timers, due at once, with words answered in between; each verdict reaches the decode rank
    once a telling (a rank saying it starts again starts it over), and the joiner that replaces
    the rank gets every one too, the same way."""
    b = BarrierState(timeout_s=10.0, alive_s=3.0, groups={"g": 2, "d": 2}, decode_of={"dq": "d"})
    b.retell_batch = 10
    for r in range(2):
        b.hello(Hello("g", r, 2, "prefill", serving="fp"), 0.0)
        b.hello(Hello("d", r, 2, "decode", serving="fq"), 0.0)
    keys = [f"k{i}" for i in range(25)]
    _released(b, keys, 0.5)
    out = b.hello(Hello("g", 1, 2, "prefill"), 1.0)  # rank 1's new process
    told = [e.message.key for e in out if isinstance(e.message, Release)]
    assert len(told) == 10 and all(e.group == "d" and e.rank == 1 for e in out if isinstance(e.message, Release))
    assert b.sizes()["retelling"] == 15 and b.next_deadline() == 1.0
    # the same rank saying it starts again and again queues nothing more: its re-telling starts
    # over (one a target), the first part again each time
    for _ in range(5):
        again = [e.message.key for e in b.hello(Hello("g", 1, 2, "prefill"), 1.005) if isinstance(e.message, Release)]
        assert again == keys[:10] and b.sizes()["retelling"] == 15
    # a word in between is answered as ever (here: nothing yet), and hands on no part: one
    # message costs at most the part of a re-telling it queues itself
    assert b.handle(Admit("g", "new", 0, 0, T), 1.01) == []
    while b.sizes()["retelling"]:
        part = [e for e in b.on_timer(1.02) if isinstance(e.message, Release)]
        assert 0 < len(part) <= 10 and all((e.group, e.rank) == ("d", 1) for e in part)
        assert all(e.message.absent == (1,) for e in part)
        told += [e.message.key for e in part]
    assert told == keys  # each once, oldest first
    # the new process joins: the start-up verdict, then every remembered verdict, a part at a time
    first = b.handle(Arrive("g", STARTUP_KEY, 0, 1, Digest(0, 0, 0, "fp")), 1.5)
    assert first[0] == ToRank("g", 1, Release("g", STARTUP_KEY, 0, Digest(0, 0, 0, "fp")))
    learned = [e.message.key for e in first[1:] if (e.group, e.rank) == ("g", 1)]
    assert len(learned) == 10
    while b.sizes()["retelling"]:
        learned += [e.message.key for e in b.on_timer(1.6) if (e.group, e.rank) == ("g", 1)]
    assert learned == keys
    assert (b.next_deadline() or 99.0) > 1.6 and not b.retelling  # nothing left to hand on


def test_a_decode_rank_down_when_told_hears_it_again_once_its_writers_all_came_back() -> None:
    """Both prefill ranks died holding a request; the service told their decode rank, which was
    down and never read it. Both ranks came back together (a cold start: nobody joins, so nobody
    is sent the group's verdicts), and serve: no writer is absent any more. Before, a decode
    process starting anew heard nothing (only verdicts of writers absent now), and its engine's
    block stayed reserved for ever. What the service itself told a decode rank is remembered
    and said again to its new process."""
    b = BarrierState(timeout_s=10.0, alive_s=3.0, groups={"g": 2, "d": 1}, decode_of={"dq": "d"},
                     targets={("g", "d"): {0: (0,), 1: (0,)}})  # fmt: skip
    for r in range(2):
        b.hello(Hello("g", r, 2, "prefill", serving="fp"), 0.0)
    b.hello(Hello("d", 0, 1, "decode", serving="fq"), 0.0)
    terms = replace(T, peer="dq")
    for r in range(2):
        b.handle(Admit("g", "k", 0, r, terms), 0.5)
    out = b.on_timer(4.0)  # neither rank heard since 0.0: both stopped, the round expires
    assert [(e.group, e.rank, e.message.absent) for e in out if e.group == "d"] == [("d", 0, (0, 1))]
    for r in range(2):
        b.hello(Hello("g", r, 2, "prefill"), 5.0)  # new processes, starting together
    fp = Digest(0, 0, 0, "fp")
    b.handle(Arrive("g", STARTUP_KEY, 0, 0, fp), 5.1)
    started = b.handle(Arrive("g", STARTUP_KEY, 0, 1, fp), 5.2)
    assert [e.message.key for e in started] == [STARTUP_KEY] * 2  # a cold start: the start-up verdict only
    for r in range(2):
        b.hello(Hello("g", r, 2, "prefill", serving="fp"), 5.3)
    told = [e.message for e in b.hello(Hello("d", 0, 1, "decode"), 6.0) if not isinstance(e.message, Ack)]
    assert [(type(m), m.key, m.absent) for m in told] == [(Expired, "k", (0, 1))]
