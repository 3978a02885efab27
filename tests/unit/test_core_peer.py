"""The peer link state machine (kvxferd.core.peer), driven with a fake clock."""

from __future__ import annotations

from itertools import count, pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from kvxferd.core import Run, Write
from kvxferd.core.peer import (
    TRANSITIONS,
    Ask,
    Close,
    Drop,
    Fail,
    LinkEffect,
    LinkEvent,
    LinkSettings,
    LinkState,
    Note,
    PeerLink,
    Start,
    Warm,
)
from kvxferd.protocol import CacheLayout, PeerInfo, Region

LAYOUT = CacheLayout(2, 8, 64)
SETTINGS = LinkSettings("decode 'd' rank 0", answer_s=10.0, retry_s=0.5, idle_s=100.0)
_ids = count(1)


def info(tag: str = "seg") -> PeerInfo:
    regions = tuple(Region(layer, kv, f"/{tag}", (layer * 2 + kv) * 512) for layer in range(2) for kv in (0, 1))
    return PeerInfo("d", 0, "host", "host", LAYOUT, regions, {}, f"g-{tag}")


def write(generation: str = "") -> Write:
    wid = next(_ids)
    return Write(wid, "d", "auto", (0,), (Run(0, 0, 1),), ((f"r{wid}", 0),), 128, generation=generation)


def kinds(effects: list[LinkEffect]) -> list[type]:
    return [type(e) for e in effects if not isinstance(e, Note)]


def posted(effects: list[LinkEffect]) -> list[int]:
    return [w.write_id for e in effects if isinstance(e, Start) for w in e.writes]


def failed(effects: list[LinkEffect]) -> list[int]:
    return [w.write_id for e in effects if isinstance(e, Fail) for w in e.writes]


def new_link(now: float = 0.0) -> PeerLink:
    return PeerLink(SETTINGS, now)


# -- the table --------------------------------------------------------------------------------


def test_every_state_is_reachable_and_closed_is_final():
    seen, frontier = {LinkState.IDLE}, [LinkState.IDLE]
    while frontier:
        for target in TRANSITIONS[frontier.pop()].values():
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(LinkState)
    assert TRANSITIONS[LinkState.CLOSED] == {}


def test_a_question_out_is_the_only_time_writes_queue():
    # A state with a deadline (ASKING, BACKOFF) is the only kind a DEADLINE event leaves.
    with_deadline = {s for s, row in TRANSITIONS.items() if LinkEvent.DEADLINE in row}
    assert with_deadline == {LinkState.ASKING, LinkState.BACKOFF}
    assert all(LinkEvent.IDLE_OUT not in TRANSITIONS[s] for s in with_deadline)


# -- asking ------------------------------------------------------------------------------------


def test_writes_queue_behind_one_question_and_go_in_order_when_answered():
    link, a, b = new_link(), write(), write()
    assert kinds(link.want(a, 1.0)) == [Ask]
    assert link.state is LinkState.ASKING and link.deadline == 11.0
    assert kinds(link.want(b, 2.0)) == []  # one question is enough
    effects = link.answered(info(), None, 3.0)
    assert posted(effects) == [a.write_id, b.write_id]
    assert link.state is LinkState.READY and link.deadline is None and link.waiting == []
    c = write()
    assert posted(link.want(c, 4.0)) == [c.write_id]


def test_no_answer_fails_every_queued_write_at_the_deadline_and_the_next_write_asks_afresh():
    link, a, b = new_link(), write(), write()
    link.want(a, 0.0)
    link.want(b, 5.0)
    assert link.next_deadline() == 10.0
    assert link.on_timer(9.99) == []
    effects = link.on_timer(10.0)
    assert failed(effects) == [a.write_id, b.write_id]
    reason = next(e.reason for e in effects if isinstance(e, Fail))
    assert "decode 'd' rank 0" in reason and "10s" in reason
    assert link.state is LinkState.IDLE and link.waiting == []
    assert kinds(link.want(write(), 20.0)) == [Ask]
    assert link.deadline == 30.0


def test_a_warm_link_asks_again_when_unanswered_with_a_doubling_backoff_until_it_idles_out():
    """A question lost on the way (the peer's ROUTER dropped it while it still held the old session
    under the same name) must not leave a link warmed at registration silent until a write needs it:
    it asks again, ever less often, and gives up as an unused link would."""
    link, a = new_link(), write()
    assert kinds(link.want(None, 0.0)) == [Ask]
    link.want(a, 1.0)  # last used at 1.0
    effects = link.on_timer(10.0)  # unanswered: the queued write fails now, as on any deadline
    assert failed(effects) == [a.write_id]
    assert link.state is LinkState.BACKOFF and link.retry_at == 10.5 and link.deadline == 20.5
    assert kinds(link.on_timer(10.5)) == [Ask] and link.state is LinkState.ASKING
    link.on_timer(20.5)
    assert link.retry_at == 21.5  # doubled
    asks, now = 2, 21.5
    while link.state is not LinkState.CLOSED:
        due = link.next_deadline()
        assert due is not None
        now = due
        asks += kinds(link.on_timer(now)).count(Ask)
    assert now <= 1.0 + SETTINGS.idle_s + SETTINGS.answer_s
    assert 4 <= asks <= 10  # doubling: a handful of questions in idle_s, not one per retry_s
    # an answer resets the backoff
    link = new_link()
    link.want(None, 0.0)
    link.on_timer(10.0)
    link.on_timer(10.5)
    link.on_timer(20.5)
    link.on_timer(21.5)
    link.answered(info(), None, 22.0)
    assert link.misses == 0


def test_a_warm_link_unanswered_for_ever_keeps_its_backoff_at_answer_s():
    link = PeerLink(LinkSettings("decode 'd' rank 0", answer_s=10.0, retry_s=0.5, idle_s=1e9), 0.0)
    link.want(None, 0.0)
    for _ in range(2400):  # a miss every other event: 2**1200 as a float overflows
        due = link.next_deadline()
        assert due is not None
        link.on_timer(due)
    assert link.state in (LinkState.ASKING, LinkState.BACKOFF)
    assert link.retry_at is None or link.deadline - link.retry_at == 10.0


def test_a_warm_link_told_no_cache_yet_asks_ever_less_often_after_the_first_deadline():
    """A prefill engine registered long before its decode peer's: the warm link asks every
    retry_s within the first answer_s (a peer about to register is found at once), then backs off."""
    link = new_link()
    link.want(None, 0.0)
    link.not_registered(0.0)
    asked, now = [0.0], 0.0
    while link.state is not LinkState.CLOSED:
        due = link.next_deadline()
        assert due is not None
        now = due
        if kinds(link.on_timer(now)) == [Ask]:
            asked.append(now)
            link.not_registered(now)  # the peer answers at once: no cache registered yet
    first = [t for t in asked if t < SETTINGS.answer_s]
    assert len(first) == 20  # every retry_s (0.5) within the first 10 s, as before
    gaps = [b - a for a, b in pairwise(asked) if a >= SETTINGS.answer_s]
    assert gaps and gaps[-1] >= 4 * SETTINGS.retry_s  # later windows ask less and less often
    assert len(asked) < 120  # ~20 a window at first, fewer after (not 200 in idle_s)
    assert now <= SETTINGS.idle_s + SETTINGS.answer_s


def test_a_write_to_a_warm_link_backing_off_asks_at_once():
    link, a = new_link(), write()
    link.want(None, 0.0)
    for t in (10.0, 10.5, 20.5, 21.5, 31.5):  # unanswered three times: the next question at 33.5
        link.on_timer(t)
    assert link.state is LinkState.BACKOFF and link.retry_at == 33.5
    assert kinds(link.want(a, 32.0)) == [Ask]  # not 1.5 s later
    assert link.state is LinkState.ASKING and link.deadline == 42.0 and link.misses == 0
    assert posted(link.answered(info(), None, 32.1)) == [a.write_id]


def test_a_write_waiting_on_a_warm_link_is_asked_for_every_retry_s_whatever_its_backoff():
    """A write that joins a question already out on a warm link whose earlier questions went
    unanswered: "no cache yet" brings the next question after retry_s, not after the warm link's
    backoff (which could put it past the deadline: the write would fail with "did not answer"
    although the peer answered, and never be asked for again)."""
    link, a = new_link(), write()
    link.want(None, 0.0)
    while link.misses < 5:  # unanswered five times: the warm link's backoff is 16 s now (capped at 10)
        due = link.next_deadline()
        assert due is not None
        link.on_timer(due)
    while link.state is not LinkState.ASKING:
        link.on_timer(link.next_deadline())
    now = link.retry_at or link.deadline - SETTINGS.answer_s
    link.want(a, now + 0.001)  # joins the question out
    assert link.not_registered(now + 0.002) == []
    assert link.retry_at == now + 0.002 + SETTINGS.retry_s
    again = link.retry_at
    assert kinds(link.on_timer(again)) == [Ask]
    assert posted(link.answered(info(), None, again + 0.01)) == [a.write_id]


def test_a_link_that_gave_up_starts_its_backoff_over():
    """Questions missed before a link gave up (refused, a PeerInfo that does not fit, a cold
    deadline) say nothing about the next ones: "no cache yet" is asked again after retry_s."""
    link = new_link()
    link.want(None, 0.0)
    for t in (10.0, 10.5, 20.5, 21.5):
        link.on_timer(t)
    assert link.misses == 2 and link.state is LinkState.ASKING
    link.refused("no such thing", 22.0)
    assert link.state is LinkState.IDLE and link.misses == 0
    link.want(write(), 23.0)
    link.not_registered(23.1)
    assert link.retry_at == 23.1 + SETTINGS.retry_s


def test_a_connection_that_comes_back_cuts_a_warm_links_backoff_short():
    """A warm link backing off after unanswered questions asks at once when the peer's connection
    comes back: that is when its answer has become likely, not a backoff later."""
    link = new_link()
    link.want(None, 0.0)
    for t in (10.0, 10.5, 20.5, 21.5, 31.5):  # unanswered three times: the next question at 33.5
        link.on_timer(t)
    assert link.state is LinkState.BACKOFF and link.retry_at == 33.5
    assert kinds(link.reconnected(32.0)) == [Ask]
    assert link.state is LinkState.ASKING and link.deadline == 42.0 and link.misses == 0
    # a link backing off after "no cache yet" within its first deadline keeps its cadence
    link = new_link()
    link.want(write(), 0.0)
    link.not_registered(0.1)
    assert link.reconnected(0.2) == [] and link.retry_at == 0.6


def test_a_cold_link_unanswered_stays_quiet_until_a_write_asks():
    link = new_link()
    link.want(write(), 0.0)
    link.on_timer(10.0)
    assert link.state is LinkState.IDLE and link.retry_at is None


def test_not_registered_retries_within_the_first_deadline():
    link, a = new_link(), write()
    link.want(a, 0.0)
    assert link.not_registered(1.0) == []
    assert link.state is LinkState.BACKOFF and link.next_deadline() == 1.5
    assert link.on_timer(1.4) == []
    assert kinds(link.on_timer(1.5)) == [Ask]
    assert link.state is LinkState.ASKING
    link.not_registered(9.8)
    assert link.next_deadline() == 10.0  # the retry would come after the deadline: the deadline wins
    ended = link.on_timer(10.0)
    assert failed(ended) == [a.write_id]
    reasons = [e.reason for e in ended if isinstance(e, Fail)]
    assert "had no cache registered" in reasons[0], reasons  # it answered: not "did not answer"
    b = write()
    link.want(b, 11.0)  # a new question: silence this time
    assert "did not answer" in next(e.reason for e in link.on_timer(21.0) if isinstance(e, Fail))


def test_a_query_that_cannot_be_sent_is_retried():
    link = new_link()
    link.want(write(), 0.0)
    assert link.blocked(0.0) == []
    assert link.state is LinkState.BACKOFF
    assert kinds(link.on_timer(0.5)) == [Ask]


def test_a_refusal_fails_the_queue_but_an_error_while_ready_changes_nothing():
    link, a = new_link(), write()
    link.want(a, 0.0)
    effects = link.refused("no such group", 1.0)
    assert failed(effects) == [a.write_id] and "no such group" in effects[-1].reason  # type: ignore[union-attr]
    assert link.state is LinkState.IDLE
    link.want(write(), 2.0)
    link.answered(info(), None, 2.0)
    effects = link.refused("unknown request", 3.0)
    assert kinds(effects) == [] and link.state is LinkState.READY and link.info == info()


def test_a_peer_info_that_does_not_match_the_config_forgets_the_peer():
    link, a = new_link(), write()
    link.want(a, 0.0)
    effects = link.answered(info(), "its cache is gpu memory; the config says host", 1.0)
    assert failed(effects) == [a.write_id] and Drop in kinds(effects)
    assert link.state is LinkState.IDLE and link.info is None
    # the same while ready: the peer changed under us into something the config does not allow
    link.want(write(), 2.0)
    link.answered(info(), None, 2.0)
    link.answered(info("other"), "answered as 'x' rank 0", 3.0)
    assert link.state is LinkState.IDLE and link.info is None


# -- a peer that changes ------------------------------------------------------------------------


def test_a_failed_write_makes_the_next_write_ask_again_and_drop_the_old_transports():
    link, a = new_link(), write()
    link.want(a, 0.0)
    link.answered(info(), None, 0.0)
    link.posted(0.0)
    link.completed(True, 1.0)
    assert link.state is LinkState.STALE
    b = write()
    effects = link.want(b, 2.0)
    assert kinds(effects) == [Drop, Ask] and link.info is None and link.waiting == [b]
    assert posted(link.answered(info("new"), None, 3.0)) == [b.write_id]
    assert link.info == info("new")


def test_a_refused_write_says_nothing_about_the_peer():
    link, a = new_link(), write()
    link.want(a, 0.0)
    link.answered(info(), None, 0.0)
    link.posted(0.0)
    assert link.completed(False, 1.0) == []
    assert link.state is LinkState.READY


def test_a_pushed_new_cache_replaces_the_old_one_and_drops_its_transports():
    link = new_link()
    link.want(None, 0.0)  # warm: open as soon as known
    assert kinds(link.answered(info(), None, 1.0)) == [Warm]
    assert kinds(link.answered(info(), None, 2.0)) == [Warm]  # the same cache again: nothing to drop
    effects = link.answered(info("new"), None, 3.0)
    assert kinds(effects) == [Drop, Warm] and link.info == info("new")


def test_a_push_to_a_link_that_never_asked_is_taken():
    link = new_link()
    assert kinds(link.answered(info(), None, 0.0)) == []
    assert link.state is LinkState.READY
    a = write()
    assert posted(link.want(a, 1.0)) == [a.write_id]


def test_answers_nobody_asked_for_are_ignored_not_raised():
    link = new_link()
    assert kinds(link.not_registered(0.0)) == [] and link.state is LinkState.IDLE
    assert kinds(link.blocked(0.0)) == [] and link.state is LinkState.IDLE
    assert any(isinstance(e, Note) for e in link.not_registered(0.0))


# -- idleness ------------------------------------------------------------------------------------


def test_an_unused_link_closes_but_not_while_a_write_is_in_flight():
    link, a = new_link(), write()
    link.want(a, 0.0)
    link.answered(info(), None, 1.0)
    link.posted(1.0)
    assert link.next_deadline() is None  # in flight: never idle
    assert link.on_timer(1000.0) == []
    link.completed(False, 50.0)
    assert link.next_deadline() == 150.0
    assert link.on_timer(149.0) == []
    effects = link.on_timer(150.0)
    assert kinds(effects) == [Close] and link.state is LinkState.CLOSED
    assert link.next_deadline() is None
    assert kinds(link.want(write(), 151.0)) == []  # closed is final: the shell opens a new link


def test_use_keeps_a_link_open():
    link = new_link()
    link.want(None, 0.0)
    link.answered(info(), None, 0.0)
    for t in (60.0, 120.0, 180.0):
        assert link.on_timer(t) == []
        link.want(write(), t)
    assert link.next_deadline() == 280.0


# -- any sequence ---------------------------------------------------------------------------------

EVENTS = (
    *("want", "want_seg", "want_new", "warm"),  # a write naming no registration, the first, the second
    *("info", "new_info", "bad", "not_reg", "refused", "blocked", "done", "fail"),
)
ACTIONS = st.lists(
    st.tuples(st.sampled_from(EVENTS), st.floats(min_value=0.0, max_value=30.0, allow_nan=False)),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(ACTIONS)
def test_any_sequence_ends_every_write_once_and_the_link_closes_when_left_alone(actions):
    link, now = new_link(), 0.0
    wanted: list[int] = []
    ended: list[int] = []  # posted or failed: each write the link released
    live: set[int] = set()  # posted, not completed

    def carry(effects: list[LinkEffect]) -> None:
        for e in effects:
            if isinstance(e, Start):
                for w in e.writes:
                    # a write goes only into the registration its blocks were reserved in
                    assert w.generation in ("", e.info.generation), (w, e.info.generation)
                    ended.append(w.write_id)
                    live.add(w.write_id)
                    link.posted(now)
            elif isinstance(e, Fail):
                ended.extend(w.write_id for w in e.writes)
        # the invariants of every state
        assert (link.state in (LinkState.ASKING, LinkState.BACKOFF)) == (link.deadline is not None)
        assert not link.waiting or link.state in (LinkState.ASKING, LinkState.BACKOFF)
        assert link.state not in (LinkState.READY, LinkState.STALE) or link.info is not None
        # asked again for a write naming another registration, the one known stays until the answer
        assert link.info is None or link.state is not LinkState.IDLE
        assert link.state is not LinkState.CLOSED or link.next_deadline() is None

    for action, advance in actions:
        while (due := link.next_deadline()) is not None and due <= now + advance:
            now = max(now, due)
            carry(link.on_timer(now))
        now += advance
        if link.state is LinkState.CLOSED:
            link = new_link(now)  # what the shell does: a new link for the next write
        if action.startswith("want"):
            w = write({"want": "", "want_seg": "g-seg", "want_new": "g-new"}[action])
            wanted.append(w.write_id)
            carry(link.want(w, now))
        elif action == "warm":
            carry(link.want(None, now))
        elif action in ("info", "new_info", "bad"):
            problem = "mismatch" if action == "bad" else None
            carry(link.answered(info("new" if action == "new_info" else "seg"), problem, now))
        elif action == "not_reg":
            carry(link.not_registered(now))
        elif action == "refused":
            carry(link.refused("no", now))
        elif action == "blocked":
            carry(link.blocked(now))
        elif action in ("done", "fail") and live:
            wid = min(live)
            live.discard(wid)
            carry(link.completed(action == "fail", now))

    # Left alone (every posted write completes, nobody answers): every write has ended exactly
    # once, and the link closes within answer_s + idle_s.
    for _ in sorted(live):
        carry(link.completed(False, now))
    live.clear()
    start = now
    while (due := link.next_deadline()) is not None:
        now = max(now, due)
        carry(link.on_timer(now))
    assert sorted(ended) == sorted(wanted)
    assert link.state is LinkState.CLOSED
    assert now - start <= SETTINGS.answer_s + SETTINGS.idle_s


def test_a_connection_that_comes_back_makes_the_peer_asked_again_before_the_next_write():
    """Issue 23, item 8: the decode daemon may have restarted with a new registration: no write may
    go into the old one. A ready link goes stale; the next write asks first."""
    link, a = new_link(), write()
    link.want(a, 0.0)
    link.answered(info(), None, 0.5)
    assert link.state is LinkState.READY
    assert kinds(link.reconnected(1.0)) == [] and link.state is LinkState.STALE
    b = write()
    assert kinds(link.want(b, 2.0)) == [Drop, Ask] and link.waiting == [b]
    assert posted(link.answered(info("new"), None, 2.5)) == [b.write_id]
    fresh = new_link()
    assert fresh.reconnected(0.0) == [] and fresh.state is LinkState.IDLE  # nothing known: nothing stale


def test_a_write_goes_only_into_the_registration_its_blocks_were_reserved_in():
    """Issue 23: a cache_info names the decode registration its blocks were reserved in. A write
    naming another than the one known asks the peer first (it may have registered since); it goes
    if the answer is that registration, and fails, naming both, if not."""
    link, a = new_link(), write("g-seg")
    link.want(a, 0.0)
    assert posted(link.answered(info("seg"), None, 0.5)) == [a.write_id]
    # reserved in a registration this link has not heard of yet: ask, then write into it
    b = write("g-new")
    assert kinds(link.want(b, 1.0)) == [Ask] and link.state is LinkState.ASKING
    c = write()  # names none: waits behind the question, then goes into whatever is current
    assert kinds(link.want(c, 1.1)) == []
    effects = link.answered(info("new"), None, 1.5)
    assert kinds(effects) == [Drop, Start] and posted(effects) == [b.write_id, c.write_id]
    # reserved in the old registration, after the engine registered the new one: it fails
    d, e = write("g-seg"), write("g-new")
    assert kinds(link.want(d, 2.0)) == [Ask]
    link.want(e, 2.1)
    effects = link.answered(info("new"), None, 2.5)
    assert posted(effects) == [e.write_id] and failed(effects) == [d.write_id]
    (why,) = [x.reason for x in effects if isinstance(x, Fail)]
    assert "reserved in registration 'g-seg'" in why and "holds registration 'g-new' now" in why
    assert link.state is LinkState.READY and link.waiting == []
