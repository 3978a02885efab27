"""A decode rank's pure core (kvxferd.core.decode) and a prefill rank's notice ledger
(kvxferd.core.ledger), driven with a fake clock: each notice reaches the engine once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvxferd.core.decode import Confirm, DecodeCore, DecodeEffect, Deliver, Push
from kvxferd.core.effects import Problem, ToEngine
from kvxferd.core.ledger import NoticeLedger, Report, Send
from kvxferd.protocol import Digest, ErrorCode, Expired, KVReady, Received, Release, Status, TransferResult

P0, P1 = b"prefill:0", b"other:0"
PREFILLS = {P0: "prefill", P1: "other"}


def core(**kw: object) -> DecodeCore:
    return DecodeCore(0, PREFILLS, **kw)  # type: ignore[arg-type]


def ready(rid: str, generation: str = "g1", rank: int = 0) -> KVReady:
    return KVReady(rid, rank, 4096, 0, generation)


def failed(rid: str) -> TransferResult:
    return TransferResult(rid, Status.FAILED, "rank 1 failed: no", 0)


def hand(c: DecodeCore, effects: list[DecodeEffect], engine: list[object]) -> list[DecodeEffect]:
    """What the shell does with a reachable engine: deliver, then report it delivered."""
    out: list[DecodeEffect] = []
    queue = list(effects)
    while queue:
        eff = queue.pop(0)
        out.append(eff)
        if isinstance(eff, Deliver):
            engine.append(eff.notice)
            queue[:0] = c.delivered(eff, 0.0)
    return out


def test_a_notice_reaches_the_engine_once_and_its_repeats_are_confirmed_again() -> None:
    c, engine = core(), []
    c.registered("g1", 0.0)
    out = hand(c, c.notice(P0, ready("a"), 1.0), engine)
    assert engine == [ready("a")]
    assert [e for e in out if isinstance(e, Confirm)] == [Confirm(P0, Received("a", 0, 0))]
    out = hand(c, c.notice(P0, ready("a"), 2.0), engine)  # its sender had no confirmation yet
    assert engine == [ready("a")], "a repeat is never handed on twice"
    assert out == [Confirm(P0, Received("a", 0, 0))]
    assert c.counts["notice_repeated"] == 1
    # the same request from another prefill group is another notice
    hand(c, c.notice(P1, ready("a"), 3.0), engine)
    assert len(engine) == 2


def test_notices_before_any_engine_are_held_and_handed_to_the_one_that_registers() -> None:
    c, engine = core(max_held=2), []
    assert c.notice(P0, ready("a", "old"), 0.0) == []
    assert c.notice(P0, failed("b"), 0.0) == []
    assert c.notice(P0, failed("b"), 0.5) == [], "a repeat of a held notice is held once"
    assert c.notice(P0, failed("c"), 1.0) == []  # the held memory is full: "a" goes
    assert c.counts["notices_dropped"] == 1 and len(c.held) == 2
    out = hand(c, c.registered("g2", 2.0), engine)
    assert [e.sender for e in out if isinstance(e, Push)] == [P0, P1], "every prefill rank hears the new cache"
    assert [n.request_id for n in engine] == ["b", "c"] and not c.held
    # the dropped one is not remembered: when its sender sends it again it is handed on (as stale)
    hand(c, c.notice(P0, ready("a", "old"), 3.0), engine)
    assert engine[-1].request_id == "a" and isinstance(engine[-1], TransferResult)


def test_a_kvready_of_another_registration_is_a_failure_and_its_sender_is_told_once_a_second() -> None:
    c, engine = core(), []
    c.registered("new", 0.0)  # pushes to everyone at 0.0
    out = hand(c, c.notice(P0, ready("a", "old"), 0.5), engine)
    (told,) = engine
    assert isinstance(told, TransferResult) and told.status is Status.FAILED
    assert "wrote it into registration 'old' of decode rank 0" in told.reason and "'new' now" in told.reason
    assert not [e for e in out if isinstance(e, Push)], "pushed at the registration half a second ago"
    out = hand(c, c.notice(P0, ready("b", "old"), 1.0), engine)
    assert [e for e in out if isinstance(e, Push)] == [Push(P0)]
    out = hand(c, c.notice(P0, ready("c", "old"), 1.5), engine)
    assert not [e for e in out if isinstance(e, Push)], "a flood of stale notices needs one answer a second"
    assert c.counts["stale_generation"] == 3
    hand(c, c.notice(P0, ready("d", "new"), 2.0), engine)
    assert engine[-1] == ready("d", "new")


def test_a_notice_naming_another_rank_is_dropped() -> None:
    c = core()
    c.registered("g1", 0.0)
    (p,) = c.notice(P0, ready("a", rank=3), 1.0)
    assert isinstance(p, Problem) and p.code is ErrorCode.WRONG_ROLE and not p.reply
    assert c.counts["refused_peer"] == 1


def test_an_undelivered_notice_is_held_and_tried_again_until_the_engine_takes_it() -> None:
    c, engine = core(retry_s=1.0), []
    c.registered("g1", 0.0)
    (deliver,) = c.notice(P0, ready("a"), 1.0)
    assert isinstance(deliver, Deliver)
    c.undelivered(deliver, 1.0)  # the engine does not read, or is gone
    # while it is unreachable, later notices and resends are held, untried, never handed twice
    assert c.notice(P0, ready("b"), 1.5) == [] and c.notice(P0, ready("a"), 1.6) == []
    assert len(c.held) == 2 and c.next_deadline() == 2.0 and c.on_timer(1.9) == []
    (probe,) = c.on_timer(2.0)  # one try, the oldest
    assert probe == Deliver("prefill", ready("a"), (P0,))
    c.undelivered(probe, 2.0)
    (probe,) = c.on_timer(3.0)  # (the one tried last goes behind the others)
    out = hand(c, [probe], engine)  # it took it: the rest follows, each confirmed
    assert engine == [ready("b"), ready("a")] and not c.held and c.next_deadline() is None
    assert [e.message.request_id for e in out if isinstance(e, Confirm)] == ["b", "a"]


def test_a_dead_engines_successor_hears_what_was_held_for_it_and_every_sender_is_confirmed() -> None:
    # issue 23, item 4: the engine died; its notices were undeliverable; a new engine registers
    c, engine = core(), []
    c.registered("g1", 0.0)
    (deliver,) = c.notice(P0, ready("a"), 1.0)
    c.undelivered(deliver, 1.0)
    assert c.notice(P1, failed("b"), 1.1) == []
    out = hand(c, c.registered("g2", 5.0), engine)
    (stale, told_b) = engine  # "a" was written into the dead engine's cache: a failure for this one
    assert isinstance(stale, TransferResult) and stale.status is Status.FAILED and "registration" in stale.reason
    assert told_b == failed("b")
    confirmed = {(e.sender, e.message.request_id) for e in out if isinstance(e, Confirm)}
    assert confirmed == {(P0, "a"), (P1, "b")}


def test_the_ledger_keeps_each_notice_until_its_daemon_confirms_it() -> None:
    ledger = NoticeLedger(limit=3)
    assert ledger.tell("d", ready("a"), 0.0) == [Send("d", ready("a"))]
    ledger.tell("d", failed("b"), 1.0)
    ledger.tell("e", ready("a"), 2.0)
    assert ledger.unconfirmed("d") == 2 and ledger.oldest_s(10.0) == 10.0
    assert ledger.reconnected("d") == [Send("d", ready("a")), Send("d", failed("b"))]
    assert ledger.confirmed("d", Received("a")) == [] and ledger.confirmed("d", Received("a")) is None
    assert ledger.reconnected("d") == [Send("d", failed("b"))]
    assert ledger.oldest_s(10.0) == 9.0
    ledger.tell("d", ready("c"), 3.0)
    effects = ledger.tell("d", ready("x"), 4.0)  # a fourth: the oldest is given up, loudly
    (problem,) = [e for e in effects if isinstance(e, Problem)]
    assert "no longer keeping" in problem.detail and ledger.given_up == 1 and len(ledger) == 3


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["send", "resend", "register", "retry", "lose"]), st.integers(0, 5)), max_size=50
    )
)
def test_through_any_restarts_and_resends_each_notice_reaches_the_engine_at_most_once(steps: list) -> None:
    """A prefill rank's ledger and a decode core: notices sent, sent again on reconnects, a decode
    core that starts with no engine, deliveries that fail. Every notice the ledger no longer keeps
    (confirmed) reached the engine exactly once; none reached it twice."""
    ledger, c, engine = NoticeLedger(limit=64), core(), []
    registered, sent = False, set()
    for action, n in steps:
        rid = f"r{n}"
        if action == "send":
            effects = ledger.tell("d", ready(rid, "g"), 0.0)
            sent.add(rid)
        elif action == "resend":
            effects = ledger.reconnected("d")
        elif (action == "register" and not registered) or action == "retry":
            registered = True if action == "register" else registered
            effects = []
            start = c.registered("g", 0.0) if action == "register" else c.on_timer(1e9)
            for eff in hand(c, start, engine):
                if isinstance(eff, Confirm):
                    ledger.confirmed("d", eff.message)
        else:
            continue
        for send in effects:
            if not isinstance(send, Send):
                continue
            out = c.notice(P0, send.notice, 0.0)
            if action == "resend" and n % 2 and out and isinstance(out[0], Deliver):
                c.undelivered(out[0], 0.0)  # the engine was not reachable this time
                continue
            for eff in hand(c, out, engine):
                if isinstance(eff, Confirm):
                    ledger.confirmed("d", eff.message)
    ids = [m.request_id for m in engine]
    assert len(ids) == len(set(ids)), f"handed on twice: {ids}"
    still_kept = {send.notice.request_id for send in ledger.reconnected("d")}
    assert sent - still_kept <= set(ids), "a notice its daemon confirmed reached the engine"


def test_a_verdict_about_a_gone_writer_is_its_failure_notice_handed_on_once() -> None:
    # issue 23, item 5: the barrier tells us the verdicts of prefill group "prefill", whose rank 0 is gone
    c, engine = core(), []
    c.registered("g1", 0.0)
    expired = Expired("prefill", "a", 0, (0,), 3.0, Status.FAILED, "rank 0 of group prefill stopped serving", "d")
    out = hand(c, c.writer_gone(expired, 1.0), engine)
    assert engine == [TransferResult("a", Status.FAILED, expired.reason, 0, 0)]
    assert not [e for e in out if isinstance(e, Confirm)]  # nobody to confirm to
    # the rank was only stopped: its own notice, coming later, is confirmed and not handed on
    told = Received("a", 0, 0, Status.FAILED, expired.reason)  # as its engine was told
    assert hand(c, c.notice(P0, failed("a"), 2.0), engine) == [Confirm(P0, told)]
    # a release whose writer told us first: nothing more; one it may not have: a failure
    hand(c, c.notice(P0, ready("b"), 3.0), engine)
    digest = Digest(4, 1, 4096, "x")
    assert hand(c, c.writer_gone(Release("prefill", "b", 0, digest, "d"), 3.1), engine) == []
    hand(c, c.writer_gone(Release("prefill", "c", 0, digest, "d"), 3.2), engine)
    assert engine[1] == ready("b") and (engine[2].request_id, engine[2].status) == ("c", Status.FAILED)
    assert len(engine) == 3
    assert "its process ended before it told decode rank 0" in engine[-1].reason
    (p,) = c.writer_gone(Release("stranger", "e", 0, digest, "d"), 4.0)
    assert isinstance(p, Problem)


def test_a_notice_left_unconfirmed_is_sent_again_later_and_later_until_confirmed() -> None:
    # issue 23, item 11: a notice dropped while the connection stays up (a full queue) is not lost
    ledger = NoticeLedger(limit=8, retry_s=2.0)
    ledger.tell("d", ready("a"), 0.0)
    assert ledger.next_deadline() == 2.0 and ledger.due(1.9) == []
    assert ledger.due(2.0) == [Send("d", ready("a"))]  # then 4 s later, 8, 16, 32 at most
    assert ledger.due(5.9) == [] and ledger.due(6.0) == [Send("d", ready("a"))]
    ledger.tell("d", failed("b"), 7.0)
    assert ledger.due(9.0) == [Send("d", failed("b"))] and ledger.resent == 3
    ledger.confirmed("d", Received("a"))
    ledger.confirmed("d", Received("b"))
    assert ledger.due(100.0) == [] and ledger.next_deadline() is None


def test_a_decode_daemon_remembers_as_many_notices_as_the_barrier_may_relay_for_a_dead_writer() -> None:
    # every verdict the barrier still remembers (max_keys per prefill group) may be relayed once its
    # writer is absent; one whose KVReady was handed on must be recognised, not handed on again
    from kvxferd.config import loads
    from kvxferd.runtime.decode import DecodeDaemon

    config = loads(
        "groups:\n"
        "  - {name: p, role: prefill, world_size: 1, endpoint: 'ipc:///tmp/kvx-seen-p-{rank}.sock', memory: host}\n"
        "  - {name: q, role: prefill, world_size: 1, endpoint: 'ipc:///tmp/kvx-seen-q-{rank}.sock', memory: host}\n"
        "  - {name: d, role: decode, world_size: 1, endpoint: 'ipc:///tmp/kvx-seen-d-{rank}.sock', memory: host}\n"
        "barrier: {max_keys: 5000}\n"
    )
    daemon = DecodeDaemon(config, config.group("d"), 0)
    try:
        assert daemon.core.seen.limit == 2 * 5000
    finally:
        daemon.shutdown_sockets()
    # and with a window that wide, a relayed release for a notice handed on long ago is nothing
    c, engine = core(max_seen=2 * 5000), []
    c.registered("g1", 0.0)
    for i in range(5000):
        hand(c, c.notice(P0, ready(f"r{i}"), 1.0), engine)
    digest = Digest(4, 1, 4096, "x")
    assert c.writer_gone(Release("prefill", "r0", 0, digest, "d"), 2.0) == []


def ok_result(rid: str) -> ToEngine:
    return ToEngine(TransferResult(rid, Status.OK, "", 0, 4096), b"sched")


def test_an_ok_result_waits_for_decode_to_confirm_and_is_told_as_the_engine_was() -> None:
    # issue 23, item 8: ok on prefill only if ready at decode
    ledger = NoticeLedger(limit=8, retry_s=2.0, confirm_s=10.0)
    assert ledger.tell("d", ready("a"), 0.0, then=ok_result("a")) == [Send("d", ready("a"))]
    ledger.tell("d", ready("b"), 0.0, then=ok_result("b"))
    assert ledger.holding == 2
    assert ledger.confirmed("d", Received("a")) == [Report(ok_result("a"))]
    stale = Received("b", 0, 0, Status.FAILED, "written into registration 'g1'", ErrorCode.NOT_REGISTERED.value)
    (report,) = ledger.confirmed("d", stale)  # its engine was told a failure: so is the scheduler
    assert isinstance(report, Report) and report.result.origin == b"sched"
    told = report.result.result
    assert (told.status, told.reason, told.code) == (Status.FAILED, stale.reason, "not_registered")
    assert ledger.holding == 0 and len(ledger) == 0


def test_an_ok_result_unconfirmed_in_time_is_told_failed_and_decode_hears_the_same() -> None:
    ledger = NoticeLedger(limit=8, retry_s=2.0, confirm_s=5.0)
    ledger.tell("d", ready("a"), 0.0, then=ok_result("a"))
    assert ledger.next_deadline() == 2.0
    assert ledger.due(2.0) == [Send("d", ready("a"))]  # sent again; the result still waits
    assert ledger.holding == 1
    out = ledger.due(ledger.next_deadline() or 0.0)
    reports = [e for e in out if isinstance(e, Report)]
    assert len(reports) == 1 and reports[0].result.result.code == "unavailable"
    assert "did not confirm within 5s" in reports[0].result.result.reason
    # what decode is sent from now on is that failure, at once
    (send,) = [e for e in out if isinstance(e, Send)]
    assert isinstance(send.notice, TransferResult) and send.notice.status is Status.FAILED
    assert ledger.holding == 0 and ledger.unconfirmed_results == 1
    assert ledger.confirmed("d", Received("a")) == [], "a late confirmation tells nobody twice"


def test_an_ok_result_whose_notice_the_full_ledger_gives_up_is_told_failed() -> None:
    ledger = NoticeLedger(limit=1)
    ledger.tell("d", ready("a"), 0.0, then=ok_result("a"))
    out = ledger.tell("d", failed("b"), 1.0)
    (report,) = [e for e in out if isinstance(e, Report)]
    assert report.result.result.status is Status.FAILED and report.result.result.code == "table_full"
    assert ledger.holding == 0


def test_decode_confirms_a_stale_kv_ready_as_the_failure_its_engine_was_told_each_time() -> None:
    c, engine = core(), []
    c.registered("g2", 0.0)
    out = hand(c, c.notice(P0, ready("a", "g1"), 1.0), engine)
    (confirm,) = [e for e in out if isinstance(e, Confirm)]
    assert confirm.message.status is Status.FAILED and confirm.message.code == "not_registered"
    assert "registration" in confirm.message.reason
    assert hand(c, c.notice(P0, ready("a", "g1"), 2.0), engine) == [confirm], "a repeat: confirmed the same"
    assert len(engine) == 1


def test_the_notices_seen_are_remembered_for_seen_s_then_forgotten_so_memory_stays_flat() -> None:
    c, engine = core(seen_s=100.0), []
    c.registered("g1", 0.0)
    hand(c, c.notice(P0, ready("a"), 1.0), engine)
    assert hand(c, c.notice(P0, ready("a"), 50.0), engine) == [Confirm(P0, Received("a", 0, 0))]
    assert len(engine) == 1 and c.next_deadline() is not None
    c.on_timer(102.0)
    assert len(c.seen) == 0, "remembered past seen_s"


def test_a_registration_is_named_by_its_engine_and_its_cache() -> None:
    """The same engine registering the same cache again (with a restarted daemon) keeps the
    generation, so the blocks it reserved stay valid; a new cache or a new engine does not."""
    from kvxferd.protocol import CacheLayout, Region, RegisterCache
    from kvxferd.runtime.decode import registration_name

    layout = CacheLayout(1, 8, 64)

    def cache(segment: str) -> RegisterCache:
        return RegisterCache("host", layout, (Region(0, 0, segment, 0), Region(0, 1, segment, 512)))

    first = registration_name(b"engine-a", cache("/kvx-1"))
    assert registration_name(b"engine-a", cache("/kvx-1")) == first
    assert registration_name(b"engine-a", cache("/kvx-2")) != first
    assert registration_name(b"engine-b", cache("/kvx-1")) != first


# -- several writers: a prefill group with more ranks than decode (issue 24) ------------------

W0, W1, W2 = b"wide:0", b"wide:1", b"wide:2"


def gathering(writers: int = 2, **kw: object) -> DecodeCore:
    """Decode rank 0, written by ranks 0..writers-1 of prefill group "wide" (a P > D map)."""
    return DecodeCore(0, {f"wide:{p}".encode(): "wide" for p in range(writers)}, **kw)  # type: ignore[arg-type]


def test_a_decode_rank_with_two_writers_tells_its_engine_once_both_wrote() -> None:
    c, engine = gathering(), []
    c.registered("g1", 0.0)
    assert hand(c, c.notice(W0, ready("a"), 1.0), engine) == [], "one writer of two: nothing yet"
    assert engine == [] and len(c.gathering) == 1
    out = hand(c, c.notice(W1, KVReady("a", 0, 1000, 0, "g1"), 2.0), engine)
    assert engine == [KVReady("a", 0, 4096 + 1000, 0, "g1")], "one KVReady, bytes of both"
    assert {e.sender for e in out if isinstance(e, Confirm)} == {W0, W1}, "each writer is confirmed"
    assert not c.gathering
    # a repeat from either is confirmed again, never handed on
    assert hand(c, c.notice(W0, ready("a"), 3.0), engine) == [Confirm(W0, Received("a", 0, 0))]
    assert len(engine) == 1


def test_a_failure_of_one_writer_waits_until_every_writer_stopped() -> None:
    """Writer 0 fails early; writer 1 may still be writing into the blocks: the engine must not
    hear anything (it would reuse them) before writer 1's notice says it stopped."""
    c, engine = gathering(), []
    c.registered("g1", 0.0)
    assert hand(c, c.notice(W0, failed("a"), 1.0), engine) == []
    assert engine == []
    out = hand(c, c.notice(W1, failed("a"), 2.0), engine)
    (told,) = engine
    assert isinstance(told, TransferResult) and told.status is Status.FAILED and told.reason == failed("a").reason
    assert {e.sender for e in out if isinstance(e, Confirm)} == {W0, W1}
    # a KVReady of one writer and a failure of the other: a failure
    hand(c, c.notice(W0, ready("b"), 3.0), engine)
    hand(c, c.notice(W1, failed("b"), 3.1), engine)
    assert engine[-1].request_id == "b" and engine[-1].status is Status.FAILED
    # two registrations: a failure naming both
    hand(c, c.notice(W0, ready("c", "g1"), 4.0), engine)
    hand(c, c.notice(W1, ready("c", "g0"), 4.1), engine)
    assert engine[-1].status is Status.FAILED and "different registrations" in engine[-1].reason
    assert len(engine) == 3


def test_an_absent_writer_is_spoken_for_by_the_barrier_and_only_the_others_are_confirmed() -> None:
    c, engine = gathering(3), []
    c.registered("g1", 0.0)
    hand(c, c.notice(W0, failed("a"), 1.0), engine)
    expired = Expired("wide", "a", 0, (2,), 3.0, Status.FAILED, "rank 2 of group wide stopped serving", "d", (2,))
    assert hand(c, c.writer_gone(expired, 2.0), engine) == [], "writer 1 has not said it stopped"
    out = hand(c, c.notice(W1, failed("a"), 3.0), engine)
    assert len(engine) == 1 and engine[0].status is Status.FAILED
    assert {e.sender for e in out if isinstance(e, Confirm)} == {W0, W1}, "nobody to confirm to for rank 2"
    # rank 2 was only stopped: its own notice, later, is confirmed as the engine was told
    (again,) = hand(c, c.notice(W2, failed("a"), 4.0), engine)
    assert isinstance(again, Confirm) and again.sender == W2 and again.message.status is Status.FAILED
    assert len(engine) == 1
    # the barrier speaks for one rank that is not a writer here: refused, nothing told
    digest = Digest(4, 1, 4096, "x")
    (p,) = c.writer_gone(Release("wide", "b", 0, digest, "d", (7,)), 5.0)
    assert isinstance(p, Problem) and "rank 7" in p.detail
    # a writer's own notice that came before the barrier's word wins over it
    hand(c, c.notice(W0, ready("c"), 6.0), engine)
    hand(c, c.notice(W1, ready("c"), 6.0), engine)
    hand(c, c.writer_gone(Release("wide", "c", 0, digest, "d", (1,)), 6.1), engine)
    assert engine[-1].request_id == "a", "writer 1's KVReady stands; rank 2 is still awaited"
    hand(c, c.notice(W2, ready("c"), 7.0), engine)
    assert engine[-1] == KVReady("c", 0, 3 * 4096, 0, "g1")


def test_gatherings_are_bounded_and_one_dropped_is_gathered_again_from_the_writers_resends() -> None:
    c, engine = gathering(max_gathering=2), []
    c.registered("g1", 0.0)
    for rid in ("a", "b", "c"):
        hand(c, c.notice(W0, ready(rid), 1.0), engine)
    assert len(c.gathering) == 2 and c.counts["gatherings_dropped"] == 1
    hand(c, c.notice(W1, ready("a"), 2.0), engine)
    assert engine == [], "a's gathering was dropped: writer 0's notice is still unconfirmed"
    hand(c, c.notice(W0, ready("a"), 3.0), engine)  # writer 0 sends it again (its ledger's retry)
    assert [n.request_id for n in engine] == ["a"]


@settings(max_examples=300, deadline=None)
@given(
    writers=st.integers(1, 4),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["ok", "fail", "gone", "register", "lose", "retry"]), st.integers(0, 3), st.integers(0, 3)
        ),
        max_size=60,
    ),
)
def test_with_several_writers_the_engine_hears_each_instance_once_and_only_after_every_writer(
    writers: int, steps: list
) -> None:
    """Writers' notices (repeated, in any order), the barrier's word for absent writers, an engine
    that registers late or cannot be reached for a while: the engine is told of an instance at most
    once, and only once every writer's notice (its own, or the barrier's for it) is here; a writer
    is confirmed only after the engine was told."""
    c, engine = gathering(writers), []
    said: dict[str, set[int]] = {}  # request -> writers whose notice (or the barrier's word) came
    confirmed: set[tuple[bytes, str]] = set()
    registered = False

    def carry(effects: list[DecodeEffect], lose: bool = False) -> None:
        queue = list(effects)
        while queue:
            eff = queue.pop(0)
            if isinstance(eff, Deliver):
                rid = eff.notice.request_id
                if lose:
                    c.undelivered(eff, 0.0)
                    continue
                assert len(said.get(rid, ())) == writers, f"{rid} told before every writer stopped"
                engine.append(rid)
                queue[:0] = c.delivered(eff, 0.0)
            elif isinstance(eff, Confirm):
                assert eff.message.request_id in engine, "confirmed before the engine was told"
                confirmed.add((eff.sender, eff.message.request_id))

    for action, w, n in steps:
        rid, writer = f"r{n}", w % writers
        if action in ("ok", "fail", "lose"):
            said.setdefault(rid, set()).add(writer)
            notice = ready(rid) if action == "ok" else failed(rid)
            carry(c.notice(f"wide:{writer}".encode(), notice, 0.0), lose=action == "lose")
        elif action == "gone":
            said.setdefault(rid, set()).add(writer)
            verdict = Expired("wide", rid, 0, (writer,), 1.0, Status.FAILED, "gone", "d", (writer,))
            carry(c.writer_gone(verdict, 0.0))
        elif action == "register" and not registered:
            registered = True
            carry(c.registered("g1", 0.0))
        elif action == "retry":
            carry(c.on_timer(1e9))
    assert len(engine) == len(set(engine)), f"told twice: {engine}"


def test_an_ok_result_written_into_several_decode_ranks_waits_for_every_confirmation() -> None:
    """A prefill rank writing into two decode ranks (a larger decode group) is ok only once both
    told their engines KVReady; one that told a failure makes it that failure."""
    ledger = NoticeLedger(limit=8, retry_s=2.0, confirm_s=10.0)
    sent = ledger.tell_all([("d:0", ready("a")), ("d:1", ready("a", rank=1))], 0.0, then=ok_result("a"))
    assert sent == [Send("d:0", ready("a")), Send("d:1", ready("a", rank=1))] and ledger.holding == 1
    assert ledger.confirmed("d:0", Received("a", 0)) == [], "decode rank 1 has not confirmed"
    assert ledger.confirmed("d:1", Received("a", 1)) == [Report(ok_result("a"))]
    assert ledger.holding == 0 and len(ledger) == 0
    # one of them told its engine a failure: so is the scheduler, once the other answered too
    ledger.tell_all([("d:0", ready("b")), ("d:1", ready("b", rank=1))], 1.0, then=ok_result("b"))
    stale = Received("b", 1, 0, Status.FAILED, "written into registration 'g0'", ErrorCode.NOT_REGISTERED.value)
    assert ledger.confirmed("d:1", stale) == []
    (report,) = ledger.confirmed("d:0", Received("b", 0)) or []
    assert isinstance(report, Report) and report.result.result.code == "not_registered"
    # a rank that writes into no decode rank (replicas: another one writes its heads) is ok at once
    assert ledger.tell_all([], 2.0, then=ok_result("c")) == [Report(ok_result("c"))]
    assert ledger.holding == 0


def test_a_result_told_failed_for_want_of_one_confirmation_makes_every_rank_hear_the_failure() -> None:
    ledger = NoticeLedger(limit=8, retry_s=2.0, confirm_s=5.0)
    ledger.tell_all([("d:0", ready("a")), ("d:1", ready("a", rank=1))], 0.0, then=ok_result("a"))
    ledger.confirmed("d:0", Received("a", 0))
    out = ledger.due(2.0) + ledger.due(6.0)
    reports = [e for e in out if isinstance(e, Report)]
    assert len(reports) == 1 and reports[0].result.result.code == "unavailable"
    (send,) = [e for e in out if isinstance(e, Send) and isinstance(e.notice, TransferResult)]
    assert send.link == "d:1" and send.notice.rank == 1 and send.notice.status is Status.FAILED
    assert ledger.holding == 0 and ledger.confirmed("d:1", Received("a", 1)) == []


def test_a_notice_held_longer_than_seen_s_is_still_a_repeat_when_sent_again() -> None:
    """A decode daemon restarted and its engine takes longer than ``seen_s`` to register again (a
    model loading): a notice held for it is still held when its writers send theirs again, so no
    second gathering opens for it (one that could never complete: its other writer is confirmed
    by the first, and the gathering stayed for ever)."""
    c, engine = gathering(seen_s=180.0), []
    assert c.notice(W0, ready("a"), 0.0) == [] and c.notice(W1, ready("a"), 0.0) == []
    assert len(c.held) == 1 and len(c.gathering) == 0
    c.on_timer(200.0)  # its "seen" mark would have gone by now
    assert c.notice(W0, ready("a"), 200.0) == []  # W0 sends it again, unconfirmed
    assert len(c.gathering) == 0, "a second gathering opened for a held notice"
    out = hand(c, c.registered("g1", 210.0), engine)
    assert engine == [KVReady("a", 0, 8192, 0, "g1")]
    assert {e.sender for e in out if isinstance(e, Confirm)} == {W0, W1}
    assert hand(c, c.notice(W1, ready("a"), 211.0), engine) == [Confirm(W1, Received("a", 0, 0))]
    assert len(engine) == 1 and len(c.gathering) == 0
