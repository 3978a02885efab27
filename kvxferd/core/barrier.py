"""Pure state of the barrier service: agreement per (group, key, instance), never per count.

Theory of operation
-------------------
Ranks announce themselves with ``Hello``, which must agree with the group's
size (known from the config, or fixed by the first Hello of a group it does
not name). A
request instance is agreed on in two rounds, each needing one word from every
rank of the group:

* **admission**: ``Admit`` (the rank holds the cache_info; its terms) or
  ``Withdraw`` (refused, aborted...). All admitted with equal terms: every rank
  gets ``Admitted`` and the completion round opens. Otherwise the instance
  ends with ``Diverged``; nothing was written, because no rank writes before
  ``Admitted``.
* **completion**: ``Arrive`` (its digest) or ``Withdraw``. All arrived with
  equal digests: ``Release``; otherwise ``Diverged``.

A key whose first word is an ``Arrive`` is a *named* barrier (start-up): one
round of arrivals. A round still open ``timeout_s`` after it opened ends with
``Expired`` naming the silent ranks, sent to every rank so the slow ones stop
too. Every final verdict but a start-up round's is remembered for
``remember_s`` (at least ``timeout_s``; the daemon passes pending_s +
verdict_s, as long as ranks remember their endings), so a straggler (a rank
that got its cache_info after the expiry, or a withdrawal that crossed the
verdict) gets the same verdict at once instead of opening the key anew. Every final verdict carries the status
and reason every rank reports (:mod:`kvxferd.core.verdicts`), and the decode
peer named at admission, so a rank that never held the cache_info can still
tell its decode rank.

In the admission round a Withdraw may replace the rank's Admit (an abort that
came after the cache_info). Otherwise repeating a word is harmless and
changing it is refused. Tables are bounded (``max_keys`` open keys and as many
remembered verdicts), and one rank cannot fill them: keys it opened with a
withdrawal that no other rank spoke in are bounded per rank (the oldest ends
at once, failed, when another comes: it could not succeed anyway).

Joining and restarts. A serving rank says ``Hello(serving=fingerprint)`` every
heartbeat; ranks heard from within ``alive_s`` are the group's live ones. The
start-up key (:data:`STARTUP_KEY`) is for a cold start: a rank arriving at it
while other ranks of its group are live joins at once (``Release`` if their
configs agree, ``Diverged`` naming them if not) instead of waiting for ranks
that are not starting; a joiner is also sent every verdict still remembered,
since it may replace a rank that died before it could report them. Ranks that
reached the start-up round before any live rank was heard (the service and a
rank restarted together) join as soon as one is. A rank
that served and says Hello as starting again is a new process: the group's
open rounds end at once (its predecessor held them). A serving
rank not heard from within ``alive_s`` has *stopped*: the rounds waiting for
it end at once as ``Expired`` (naming it), and so do rounds that open while it
is stopped, instead of waiting out ``timeout_s``; its next heartbeat ends that.
A rank that stopped or restarted is *absent* until it serves again: it may
have died before telling its decode rank how its requests ended, so that
decode rank (of the group a verdict's ``peer`` names) is sent every verdict of
its group still remembered, and every later one while it is absent; the decode
daemon hands each on as a failure, once. So a decode engine hears of every
request whose prefill writer died within ``alive_s`` of the death, whether or
not it comes back. What the service tells a decode rank itself is remembered
with its verdict and said again to that rank's next process (the one told may
have been down, or died holding it), writers serving again or not. Every
``Ack`` of a Hello names the service's ``epoch``; a rank that sees a new one
knows the service restarted and announces its open words again: its
``Admit``, ``Arrive`` or ``Withdraw``. A key reopened that way cannot tell
which round it lost; a word only an admitted rank says (an ``Arrive``, or a
``Withdraw`` with ``admitted``) makes it the completion round, an ``Admit``
into that is a repeat (answered with ``Admitted``: its first answer may have
been lost with the old service).

Verdicts and open rounds outlive a restart: the shell journals every word of
a request's key and every final verdict before it sends anything they caused
(:meth:`BarrierState.take_journal`), and a service that starts recalls the
verdicts younger than ``remember_s`` and then the words younger than
``timeout_s`` of keys no verdict ended (:meth:`BarrierState.recall`). So a
rank's word about a key decided before the restart hears that verdict, and a
round whose ranks all died or exited around the restart (nobody is left to say
its words again) is still open here: it ends when its deadline passes, or at
once for the ranks this run never hears serve, and the decode ranks of absent
writers hear that verdict, as for any round.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field, replace

from kvxferd.core import verdicts
from kvxferd.core.deadlines import Deadlines
from kvxferd.core.effects import BarrierEffect, Problem, ToRank
from kvxferd.core.memory import Memory
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
    Message,
    RankView,
    Release,
    Status,
    Terms,
    Withdraw,
)

RoundKey = tuple[str, str, int]  # (group, barrier key, instance): one round's name
#: what the journal holds: a rank's word about a request's key, or a final verdict
Journaled = Admit | Arrive | Withdraw | Release | Diverged | Expired


class Round(enum.Enum):
    ADMISSION = "admission"
    COMPLETION = "completion"
    NAMED = "named barrier"


#: a serving rank not heard from for this many of its heartbeats counts as stopped (the service's
#: ``alive_s`` is this times ``timeouts.heartbeat_s``)
ALIVE_BEATS = 3


#: remembered verdicts handed on per call when a rank becomes absent, joins, or a decode rank
#: starts anew: each such event may re-tell every verdict its group remembers (up to ``max_keys``,
#: ~0.5 s of work at 65,536). The message that queues it hands on the first part, each run of the
#: timers one more (due at once while any is left), so the service reads and answers words
#: between the parts, and no message costs more than one part
RETELL_BATCH = 512


@dataclass(slots=True)
class _Retell:
    """Remembered verdicts of prefill group ``group`` still to hand on, in order: to the decode
    ranks that ``ranks`` (absent) write into (only decode rank ``only``, if named); with
    ``joiner``, to that rank of ``group`` as they are (it replaces a rank that may have died
    before telling its decode rank how they ended); with ``relayed``, what the service itself
    told decode rank ``only`` before (any group), again."""

    group: str
    keys: list[RoundKey]
    ranks: list[int] = field(default_factory=list)
    only: tuple[str, int] | None = None
    joiner: int | None = None
    relayed: bool = False  # the service's own words to decode rank ``only`` (any group), again
    at: int = 0  # keys[:at] handed on


@dataclass(slots=True)
class _Open:
    group: str
    key: str
    instance: int
    opened: float
    timeout_s: float
    round: Round
    words: dict[int, RankView] = field(default_factory=dict)
    terms: Terms | None = None  # what every rank admitted, once admitted
    peer: str = ""  # the decode peer template named at admission
    others: set[str] = field(default_factory=set)  # other peers named by other ranks' words (a divergence)


class BarrierState:
    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        max_keys: int = 65536,
        max_groups: int = 256,
        max_wait_s: float = 0.0,
        epoch: str = "0",
        alive_s: float = 3.0,
        max_alone: int = 4096,
        decode_of: dict[str, str] | None = None,
        groups: dict[str, int] | None = None,
        remember_s: float = 0.0,
        targets: dict[tuple[str, str], dict[int, tuple[int, ...]]] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        #: how long a final verdict is remembered: at least a round's timeout, and as long as the
        #: ranks remember their endings (pending_s + verdict_s), so a repeated cache_info that a
        #: rank's new process takes as new still hears the group's verdict
        self.remember_s = max(timeout_s, remember_s)
        self.epoch = epoch  # names this run of the service in every Ack of a Hello
        self.alive_s = alive_s  # a serving rank heard from within this long counts as live
        self.max_keys = max_keys  # open keys per group: one group cannot crowd out another
        self.max_wait_s = max(max_wait_s, timeout_s)  # the longest a rank may ask a key to stay open
        self.max_groups = max_groups
        #: keys one rank opened with a withdrawal that no other rank spoke in yet, per rank: a rank
        #: refusing what its peers never get (a scheduler skipping ranks) holds at most this many
        #: (and at most a quarter of its group's keys shared by all ranks)
        self.max_alone = max_alone
        self._alone: dict[tuple[str, int], dict[RoundKey, None]] = {}  # insertion order: oldest first
        #: what a verdict's ``peer`` may say -> the decode group it names (from the config)
        self.decode_of = dict(decode_of or {})
        #: (prefill group, decode group) -> prefill rank -> the decode ranks it writes into (the
        #: rank map, from the config; a pair not listed: rank r writes decode rank r only)
        self.targets = dict(targets or {})
        #: ranks whose process ended (stopped serving, or a new one started) and that have not
        #: served again: the decode rank they write hears their verdicts from here
        self._absent: set[tuple[str, int]] = set()
        #: when ranks this run never heard serve count as absent (alive_s after it first ran: a
        #: service restarted with a rank that died meanwhile, or never came back, never hears it)
        self._sweep_at: float | None = None
        self._swept = False
        #: remembered verdicts being handed on a part at a time (see RETELL_BATCH), oldest first,
        #: by target (prefill group, decode rank starting anew, joiner): at most one each, so
        #: within groups x ranks, of at most max_keys keys each
        self._retells: dict[tuple[str, tuple[str, int] | None, int | None, bool], _Retell] = {}
        self._retell_due = 0.0  # when the call that left parts to hand on ran
        #: what the service itself told decode ranks (a verdict, for absent or diverged writers):
        #: round -> decode rank -> the writers it spoke for; said again to a decode rank that
        #: starts anew (its predecessor may have been down when told, or died holding it)
        self._relays: Memory[RoundKey, dict[tuple[str, int], tuple[int, ...]]] = Memory(
            limit=max_keys, ttl_s=self.remember_s
        )
        self._recalling = False  # (a recall's effects are not sent: nothing of them was told)
        self._queued = False  # the call running queued a re-telling (its first part goes with it)
        self.retell_batch = RETELL_BATCH
        #: group -> world size: the config's, known from the start (a restarted service takes a
        #: word of a rank whose process is about to exit before any rank of its group said Hello)
        self._groups: dict[str, int] = dict(groups or {})
        self._open: dict[RoundKey, _Open] = {}
        self._open_in: Counter[str] = Counter()  # group -> its open keys
        self._ended: Memory[RoundKey, Release | Diverged | Expired] = Memory(limit=max_keys, ttl_s=self.remember_s)
        self._deadlines: Deadlines[RoundKey] = Deadlines()  # one per open key
        #: (group, rank) -> (its last serving Hello, its config fingerprint); bounded by groups x ranks
        self._serving: dict[tuple[str, int], tuple[float, str]] = {}
        #: serving ranks whose heartbeats stopped: rounds waiting for them end at once
        self._stopped: set[tuple[str, int]] = set()
        #: ranks this run heard anything from (a Hello of any kind, or a word)
        self._heard: set[tuple[str, int]] = set()
        #: words of requests' keys and final verdicts not yet taken by the shell's journal, in the
        #: order they happened (take_journal)
        self.journal: list[Journaled] = []

    def handle(self, msg: Message, now: float) -> list[BarrierEffect]:
        """One message from a rank: what it causes, and the first part of a re-telling it queues
        (the rest at the next runs of the timers, due at once: :meth:`on_timer`). A message that
        queues none hands on nothing: one message costs at most one part."""
        self._queued = False
        out = self._handle(msg, now)
        return out + self._hand_on(now) if self._queued else out

    def _handle(self, msg: Message, now: float) -> list[BarrierEffect]:
        self._start_sweep(now)
        if isinstance(msg, Hello):
            return self._hello(msg, now)
        if isinstance(msg, (Admit, Arrive, Withdraw)) and msg.key != STARTUP_KEY:
            self.journal.append(msg)  # (a straggler's word too: its key's verdict comes first on recall)
            # any word of a serving rank says it runs (after a stall of this service, its words
            # and heartbeats of that time are read in arrival order: the first of them counts)
            gr = (msg.group, msg.rank)
            known = self._serving.get(gr)
            if known is not None:
                self._serving[gr] = (now, known[1])
                self._stopped.discard(gr)
            elif gr not in self._heard and msg.group in self._groups and msg.rank < self._groups[msg.group]:
                # a rank serving before this run started, heard before its first heartbeat: it
                # serves (its config is checked at its heartbeat), and is taken as stopped if it
                # falls silent, like any serving rank (it may die before it ever says Hello)
                self._serving[gr] = (now, "")
                self._heard.add(gr)
                self._stopped.discard(gr)
                waited = self._joined(msg.group, now)  # (ranks waiting in a start-up round join)
                if waited:
                    return waited + self._handle(msg, now)
        if isinstance(msg, (Admit, Withdraw)) and msg.key == STARTUP_KEY:
            why = f"key {STARTUP_KEY!r} is the start-up round's: {type(msg).__name__} may not name it"
            return [Problem(ErrorCode.BAD_MESSAGE, why)]
        if isinstance(msg, Admit):
            view = RankView(msg.rank, Status.OK, terms=msg.terms)
            return self._word((msg.group, msg.key, msg.instance), view, now, self.timeout_s)
        if isinstance(msg, Arrive):
            if msg.key == STARTUP_KEY:
                joined = self._join(msg.group, msg.rank, msg.instance, msg.digest, now)
                if joined is not None:
                    return joined
            view = RankView(msg.rank, Status.OK, digest=msg.digest)
            wait = min(msg.timeout_s, self.max_wait_s) or self.timeout_s
            return self._word((msg.group, msg.key, msg.instance), view, now, wait, peer=msg.peer)
        if isinstance(msg, Withdraw):
            view = RankView(msg.rank, msg.status, reason=msg.reason)
            return self._word((msg.group, msg.key, msg.instance), view, now, self.timeout_s, msg.admitted, msg.peer)
        return [Problem(ErrorCode.WRONG_ROLE, f"the barrier service does not accept {type(msg).__name__}")]

    def _start_sweep(self, now: float) -> None:
        """This run heard its first word: ranks it has not heard serve within ``alive_s`` from now
        count as absent (see on_timer; without decode groups there is nobody to tell)."""
        if self._sweep_at is None and not self._swept and self.decode_of:
            self._sweep_at = now + self.alive_s

    def hello(self, msg: Hello, now: float) -> list[BarrierEffect]:
        self._queued = False
        out = self._hello(msg, now)
        return out + self._hand_on(now) if self._queued else out

    def _hello(self, msg: Hello, now: float) -> list[BarrierEffect]:
        self._start_sweep(now)
        size = self._groups.get(msg.group)
        if size is None:
            if len(self._groups) >= self.max_groups:
                return [Problem(ErrorCode.TABLE_FULL, f"group {msg.group!r} refused: {self.max_groups} groups known")]
            self._groups[msg.group] = msg.world_size
        elif size != msg.world_size:
            detail = f"group {msg.group!r} has world size {size}; rank {msg.rank} announced {msg.world_size}"
            return [Problem(ErrorCode.CONFLICT, detail, msg.group)]
        self._heard.add((msg.group, msg.rank))  # (a group it took: bounded by groups x ranks)
        effects: list[BarrierEffect] = []
        if msg.serving:
            new = (msg.group, msg.rank) not in self._serving or (msg.group, msg.rank) in self._stopped
            self._serving[(msg.group, msg.rank)] = (now, msg.serving)
            self._absent.discard((msg.group, msg.rank))
            if new:
                effects += self._joined(msg.group, now)
        elif self._serving.pop((msg.group, msg.rank), None) is not None:
            # a rank that served says it is starting: a new process, which holds none of what
            # its predecessor did, so the group's open rounds cannot complete
            waiting = [k for k, e in self._open.items() if e.group == msg.group and e.key != STARTUP_KEY]
            for k in waiting:
                self._deadlines.cancel(k)
                effects += self._expire(k, now, gone=[msg.rank], how="restarted before reporting")
            self._absent.add((msg.group, msg.rank))
            effects += self._retell_absent(msg.group, [msg.rank], now)
        else:
            # a rank this run never heard serve is starting: words of it in open rounds are its
            # predecessor's (sent to this run before it died), which the new process does not hold;
            # and that predecessor may have died before telling its decode rank how they (and what
            # this run recalled) ended, while the new process hears no verdict until it serves (it
            # waits at the start-up barrier): absent until then, its decode rank hears them from here
            self._absent.add((msg.group, msg.rank))
            effects += self._retell_absent(msg.group, [msg.rank], now)
            spoke = [
                k
                for k, e in self._open.items()
                if e.group == msg.group and e.key != STARTUP_KEY and msg.rank in e.words
            ]
            for k in spoke:
                self._deadlines.cancel(k)
                effects += self._expire(k, now, gone=[msg.rank], how="restarted before the round ended")
        self._stopped.discard((msg.group, msg.rank))
        if msg.role == "decode" and not msg.serving:
            effects += self._retell(msg.group, msg.rank, now)
        return [*effects, ToRank(msg.group, msg.rank, Ack(f"hello {self.epoch}"))]

    def live(self, group: str, now: float) -> dict[int, str]:
        """Ranks of ``group`` that said they serve within ``alive_s``, with their fingerprints."""
        return {r: fp for (g, r), (seen, fp) in self._serving.items() if g == group and now - seen <= self.alive_s}

    def _join(self, group: str, rank: int, instance: int, digest: Digest, now: float) -> list[BarrierEffect] | None:
        """A rank arriving at the start-up key while others of its group serve: its verdict now
        (None: no other rank is live, a cold start, the named round as usual)."""
        size = self._groups.get(group)
        if size is None or rank >= size:
            return None
        live = {r: fp for r, fp in self.live(group, now).items() if r != rank}
        if not live:
            return None
        mine = digest.fingerprint
        if all(fp == mine for fp in live.values() if fp):  # ("": heard by a word, not yet a heartbeat)
            # the joiner replaces a rank that may have died holding requests: every verdict still
            # remembered, so it can tell its decode rank about the ones its predecessor could not
            joined: list[BarrierEffect] = [ToRank(group, rank, Release(group, STARTUP_KEY, instance, digest))]
            return joined + self._queue(_Retell(group, self._remembered(), joiner=rank), now)
        others = {r: RankView(r, Status.OK, digest=Digest(0, 0, 0, fp)) for r, fp in live.items()}
        others[rank] = RankView(rank, Status.OK, digest=digest)
        odd = sorted(r for r, fp in live.items() if fp and fp != mine)
        reason = (
            f"ranks {odd} of group {group!r} serve with another configuration than rank {rank}; "
            "a rank joining a running group must use its configuration"
        )
        views = tuple(others[r] for r in sorted(others))
        verdict = Diverged(group, STARTUP_KEY, instance, Status.FAILED, reason, views)
        return [ToRank(group, rank, verdict)]

    def _remembered(self) -> list[RoundKey]:
        """The keys of every remembered verdict, oldest first (each re-telling takes those of its
        group as it goes)."""
        return self._ended.keys()

    def _retell_absent(self, group: str, ranks: list[int], now: float) -> list[BarrierEffect]:
        """``ranks`` of ``group`` became absent: their decode ranks hear every verdict of the group
        still remembered (see :meth:`_tell_decode`), the first part now."""
        return self._queue(_Retell(group, self._remembered(), ranks=ranks), now)

    def _retell(self, decode: str, rank: int, now: float) -> list[BarrierEffect]:
        """Decode rank ``rank`` of ``decode`` is a new process: what the service told its
        predecessor went with it (held for an engine, or half gathered), or never reached it (it
        was down), and nobody else will say it again: the writers it spoke for may be serving
        again by now, as new processes that hold nothing of it. It hears every such word once
        more (its decode daemon hands on at most one notice per writer and request)."""
        # (the verdicts of writers absent now were told it when they became absent, or are being
        # told from the queue still: either way they are among what it was told, or will be)
        return self._queue(_Retell("", self._relays.keys(), only=(decode, rank), relayed=True), now)

    def _relay(self, told: list[BarrierEffect], now: float) -> list[BarrierEffect]:
        """Remember ``told``, the service's own words to decode ranks (see ``_relays``); not what a
        recall computes (it is not sent)."""
        if self._recalling:
            return told
        for eff in told:
            if isinstance(eff, ToRank) and isinstance(eff.message, (Release, Diverged, Expired)):
                m = eff.message
                k = (m.group, m.key, m.instance)
                known = self._relays.get(k)
                if known is None:
                    known = {}
                    self._relays.put(k, known, now)
                known[(eff.group, eff.rank)] = tuple(sorted({*known.get((eff.group, eff.rank), ()), *m.absent}))
        return told

    def _queue(self, job: _Retell, now: float) -> list[BarrierEffect]:
        """Hand on ``job``'s verdicts after those queued already: a part with the call that queued
        it, then one at each run of the timers. A re-telling to the same ranks queued already
        starts over as this one, naming the absent ranks of both: one per target, so the queue
        stays within groups x ranks."""
        if job.keys:
            self._queued = True
            if not self._retells:
                self._retell_due = now
            target = (job.group, job.only, job.joiner, job.relayed)
            old = self._retells.get(target)
            if old is not None and job.joiner is None:
                job.ranks = sorted({*old.ranks, *job.ranks})
            self._retells[target] = job
        return []

    def _parts(self, now: float) -> list[BarrierEffect]:
        return self._hand_on(now) if self._retells else []

    @property
    def retelling(self) -> bool:
        """Remembered verdicts are being handed on: the next part is due at once."""
        return bool(self._retells)

    def _hand_on(self, now: float) -> list[BarrierEffect]:
        """Up to ``retell_batch`` remembered verdicts of the queued re-tellings, looking at up to
        16 times as many keys (one forgotten meanwhile is skipped: too old for anybody to wait on)."""
        out: list[BarrierEffect] = []
        batch = max(1, self.retell_batch)
        send, scan = batch, 16 * batch  # (looking at a key costs far less)
        while self._retells and send > 0 and scan > 0:
            target, job = next(iter(self._retells.items()))
            found: list[Release | Diverged | Expired] = []
            keys, group = job.keys, job.group
            while job.at < len(keys) and len(found) < send and scan > 0:
                k = keys[job.at]
                job.at += 1
                scan -= 1
                if (job.relayed or k[0] == group) and k[1] != STARTUP_KEY and (v := self._ended.get(k)) is not None:
                    found.append(v)
            send -= len(found)
            if job.relayed and job.only is not None:
                decode, d = job.only
                for v in found:
                    writers = (self._relays.get((v.group, v.key, v.instance)) or {}).get(job.only)
                    if writers:
                        out.append(ToRank(decode, d, replace(v, absent=writers)))
            elif job.joiner is not None:
                out += [ToRank(job.group, job.joiner, v) for v in found]
            else:
                told = self._tell_decode(job.group, job.ranks, found)
                if job.only is not None:
                    told = [e for e in told if isinstance(e, ToRank) and (e.group, e.rank) == job.only]
                out += self._relay(told, now)
            if job.at >= len(job.keys):
                del self._retells[target]
        self._retell_due = now
        return out

    def _tell_decode(
        self, group: str, ranks: list[int], verdicts: list[Release | Diverged | Expired]
    ) -> list[BarrierEffect]:
        """``ranks`` of ``group`` are absent (their process ended): the decode rank each writes
        hears ``verdicts`` from here, since the absent rank may not have told it (the decode
        daemon takes each as a failure, and hands on at most one notice per request)."""
        out: list[BarrierEffect] = []
        for v in verdicts:
            decode = self.decode_of.get(v.peer)
            size = self._groups.get(decode or "")
            if decode is None or size is None:
                continue  # no decode group named, or none of it said Hello yet: nobody to tell
            writes = self.targets.get((group, decode))
            absent: dict[int, list[int]] = {}  # decode rank -> its absent writers
            for r in ranks:
                for d in writes.get(r, ()) if writes is not None else (r,):
                    absent.setdefault(d, []).append(r)
            out += [
                ToRank(decode, d, replace(v, absent=tuple(sorted(ws)))) for d, ws in sorted(absent.items()) if d < size
            ]
        return out

    @staticmethod
    def _named(entry: _Open) -> set[str]:
        """The decode peers ``entry``'s words named, when they named more than one (else none)."""
        return {entry.peer, *entry.others} if entry.others else set()

    def _tell_others(self, peers: set[str], verdict: Release | Diverged | Expired) -> list[BarrierEffect]:
        """Ranks' cache_infos named different decode peers (a scheduler bug the admission refuses):
        a rank tells only the decode rank its own cache_info names, so a decode rank whose writer
        named another group would never hear. Every rank of every decode group named hears the
        verdict from here, as a failure, the verdict's own peer too (the decode daemon hands on one
        notice per writer and request, whoever sends it first)."""
        out: list[BarrierEffect] = []
        for peer in sorted(peers):
            decode = self.decode_of.get(peer)
            size = self._groups.get(decode or "")
            if decode is None or size is None:
                continue
            writes = self.targets.get((verdict.group, decode))
            for d in range(size):  # every writer of each rank: none of them wrote (admission refused)
                writers = (d,) if writes is None else tuple(sorted(p for p, ds in writes.items() if d in ds))
                if writers:
                    out.append(ToRank(decode, d, replace(verdict, absent=writers)))
        return out

    def _joined(self, group: str, now: float) -> list[BarrierEffect]:
        """A rank of ``group`` is newly heard serving: ranks already waiting in a start-up round
        (they reached a service that did not know yet that the group runs, as when the service
        and a rank restart together) are joiners, not a cold start, and join now."""
        effects: list[BarrierEffect] = []
        for k in [k for k, e in self._open.items() if e.group == group and e.key == STARTUP_KEY]:
            entry = self._open[k]
            arrived = {r: v.digest for r, v in entry.words.items() if v.digest is not None}
            if any(r in arrived for r in self.live(group, now)):
                continue  # a stale heartbeat of a rank that is starting again: still a cold start
            del self._open[k]
            self._open_in[group] -= 1
            self._deadlines.cancel(k)
            for r, digest in sorted(arrived.items()):
                effects += self._join(group, r, entry.instance, digest, now) or []
        return effects

    def on_timer(self, now: float) -> list[BarrierEffect]:
        self._ended.expire(now)
        self._relays.expire(now)
        effects: list[BarrierEffect] = []
        if self._sweep_at is not None and now >= self._sweep_at:
            self._sweep_at, self._swept = None, True  # once: later absences are stops and restarts
            unheard = [(g, r) for g, size in self._groups.items() for r in range(size) if (g, r) not in self._serving]
            self._absent.update(unheard)
            for group in sorted({g for g, _ in unheard}):
                effects += self._retell_absent(group, [r for g, r in unheard if g == group], now)
            # ranks not heard at all (no Hello, no word) count as stopped: the rounds waiting for
            # them end now (a rank that starts or serves is heard within alive_s)
            decoders = set(self.decode_of.values())
            silent = {(g, r) for g, r in unheard if (g, r) not in self._heard and g not in decoders}
            if silent:
                self._stopped |= silent
                for k, e in list(self._open.items()):
                    quiet = [r for r in self._missing(e) if (e.group, r) in silent]
                    if e.key != STARTUP_KEY and quiet:
                        self._deadlines.cancel(k)
                        effects += self._expire(k, now, gone=quiet, how="not heard since the barrier service started")
        for k in self._deadlines.pop_due(now):
            effects += self._expire(k, now)
        gone = {gr for gr, (seen, _) in self._serving.items() if now - seen > self.alive_s} - self._stopped
        if gone:
            self._stopped |= gone
            waiting = [
                k
                for k, e in self._open.items()
                if e.key != STARTUP_KEY and any((e.group, r) in gone for r in self._missing(e))
            ]  # (a start-up round waits for ranks that are starting, not serving)
            for k in waiting:
                self._deadlines.cancel(k)
                effects += self._expire(k, now)
            newly = sorted(gone - self._absent)
            self._absent.update(newly)
            for group in sorted({g for g, _ in newly}):
                effects += self._retell_absent(group, [r for g, r in newly if g == group], now)
        return effects + self._parts(now)

    def next_deadline(self) -> float | None:
        times = [t for t in (self._deadlines.earliest(), self._ended.next_deadline(), self._sweep_at) if t is not None]
        if self._retells:  # the next part is due at once (when the last one was handed on)
            times.append(self._retell_due)
        # a serving rank whose heartbeat is overdue stops the rounds waiting for it, and its decode
        # rank hears the verdicts it may not have told (so also while only verdicts are remembered)
        if self._open or (self.decode_of and len(self._ended)):
            beats = [seen + self.alive_s for gr, (seen, _) in self._serving.items() if gr not in self._stopped]
            if beats:
                times.append(min(beats) + 1e-3)
        return min(times, default=None)

    def _missing(self, entry: _Open) -> list[int]:
        return [r for r in range(self._groups[entry.group]) if r not in entry.words]

    def _expire(
        self,
        k: RoundKey,
        now: float,
        *,
        gone: list[int] | None = None,
        how: str = "stopped serving (no heartbeat) before reporting",
    ) -> list[BarrierEffect]:
        """End the open round of ``k`` as expired: its deadline passed, or ranks it waits for are
        ``gone`` (default: those stopped serving), ``how``."""
        entry = self._open.pop(k)
        self._open_in[entry.group] -= 1
        if len(entry.words) == 1:
            self._unalone(entry, k)
        size = self._groups[entry.group]
        missing = tuple(self._missing(entry))
        if gone is None:
            gone = [r for r in missing if (entry.group, r) in self._stopped]
        waited = round(now - entry.opened, 3)
        present = [entry.words[r] for r in sorted(entry.words)]
        status, reason, _ = verdicts.expiry(present, missing, entry.group, entry.round.value, waited, gone, how)
        verdict = Expired(entry.group, entry.key, entry.instance, missing, waited, status, reason, entry.peer)
        self._decide(k, verdict, now)
        told: list[BarrierEffect] = [ToRank(entry.group, r, verdict) for r in range(size)]
        told += self._relay(self._tell_others(self._named(entry), verdict), now)
        return told + self._relay(self._tell_decode(entry.group, self._absent_in(entry.group), [verdict]), now)

    def _decide(self, k: RoundKey, verdict: Release | Diverged | Expired, now: float) -> None:
        """``k`` ended with ``verdict``: remembered, and handed to the journal (see :meth:`recall`).
        A start-up round is not remembered: a rank arriving later is a new try, which must not
        hear the old one's expiry (it would exit, start again, hear it again...)."""
        if verdict.key == STARTUP_KEY:
            return
        self._ended.put(k, verdict, now)
        self.journal.append(verdict)

    def recall(self, entry: Journaled, age_s: float, now: float) -> bool:
        """An entry of a previous run's journal, ``age_s`` old. Recall every verdict first, then
        every word, each oldest first, as the journal holds them.

        A verdict is remembered for what is left of ``remember_s``, so a word about its key (said
        again after the restart, or by a rank's new process) hears that ending instead of opening
        the key anew. A word of a key no verdict ended, younger than ``timeout_s``, goes back into
        its round as it was said then (the round's deadline runs from then); it does not count as
        hearing its rank (only a Hello or a new word does), and what it causes is not sent: a
        rank that runs says its words again when it sees the new run, and hears the answer then.
        False (and nothing kept) if it is too old, or its key is known here already."""
        self._recalling = True
        try:
            return self._recall(entry, age_s, now)
        finally:
            self._recalling = False

    def _recall(self, entry: Journaled, age_s: float, now: float) -> bool:
        k = (entry.group, entry.key, entry.instance)
        if entry.key == STARTUP_KEY or k in self._ended:
            return False
        at = now - max(0.0, age_s)
        if isinstance(entry, (Release, Diverged, Expired)):
            if age_s >= self.remember_s or k in self._open:
                return False
            self._ended.put(k, entry, at)
            return True
        if age_s >= self.timeout_s or entry.group not in self._groups:
            return False
        if isinstance(entry, Admit):
            view = RankView(entry.rank, Status.OK, terms=entry.terms)
            effects = self._word(k, view, at, self.timeout_s)
        elif isinstance(entry, Arrive):
            wait = min(entry.timeout_s, self.max_wait_s) or self.timeout_s
            effects = self._word(k, RankView(entry.rank, Status.OK, digest=entry.digest), at, wait, peer=entry.peer)
        else:
            view = RankView(entry.rank, entry.status, reason=entry.reason)
            effects = self._word(k, view, at, self.timeout_s, entry.admitted, entry.peer)
        return not any(isinstance(e, Problem) for e in effects)

    def take_journal(self) -> list[Journaled]:
        """The words and final verdicts since the last call, in order, for the shell's journal: it
        writes them before it sends the effects they caused."""
        taken, self.journal = self.journal, []
        return taken

    def _absent_in(self, group: str) -> list[int]:
        return sorted(r for g, r in self._absent if g == group) if self._absent else []

    def sizes(self) -> dict[str, int]:
        retelling = sum(len(job.keys) - job.at for job in self._retells.values())
        return {"groups": len(self._groups), "open": len(self._open), "ended": len(self._ended), "retelling": retelling}

    def stopped(self) -> list[str]:
        """The serving ranks not heard from within ``alive_s`` (``group:rank``), for operators."""
        return sorted(f"{group}:{rank}" for group, rank in self._stopped)

    # ---------------------------------------------------------------- internals

    def _word(
        self,
        k: RoundKey,
        view: RankView,
        now: float,
        timeout_s: float,
        admitted: bool = False,
        peer: str = "",
    ) -> list[BarrierEffect]:
        """One rank's word; ``admitted``: a withdrawal of a rank that had been admitted; ``peer``:
        the decode peer a withdrawing rank's cache_info named."""
        group, key, instance = k
        size = self._groups.get(group)
        if size is None:
            return [Problem(ErrorCode.NOT_REGISTERED, f"group {group!r} is unknown: send Hello first", key)]
        if view.rank >= size:
            return [Problem(ErrorCode.BAD_MESSAGE, f"rank {view.rank} is outside group {group!r} of {size}", key)]
        named = view.terms.peer if view.terms is not None else peer
        remembered = self._ended.get(k)
        if remembered is not None:
            if named and named != remembered.peer and not isinstance(remembered, Release):
                others = self._relay(self._tell_others({named, remembered.peer}, remembered), now)
                return [ToRank(group, view.rank, remembered), *others]
            return [ToRank(group, view.rank, remembered)]
        entry = self._open.get(k)
        early: list[BarrierEffect] = []
        if entry is None:
            if view.status is not Status.OK:
                early = self._hold_alone(k, view.rank, size, now)
            if self._open_in[group] >= self.max_keys:
                detail = f"key {key!r} refused: group {group!r} already has {self.max_keys} keys open"
                return [*early, Problem(ErrorCode.TABLE_FULL, detail, key)]
            self._open_in[group] += 1
            first = Round.NAMED if view.digest is not None else Round.ADMISSION
            entry = self._open[k] = _Open(group, key, instance, now, timeout_s, first)
            self._deadlines.set(k, now + timeout_s)
            if view.status is not Status.OK:
                self._alone.setdefault((group, view.rank), {})[k] = None
        elif len(entry.words) == 1 and view.rank not in entry.words:
            self._unalone(entry, k)
        problem, tell = self._take(entry, view, admitted or view.digest is not None)
        if problem is not None:
            detail = f"rank {view.rank} about {key!r} instance {instance}: {problem}"
            return [*early, Problem(ErrorCode.CONFLICT, detail, key)]
        if not entry.peer:
            entry.peer = named
        elif named and named != entry.peer:
            entry.others.add(named)
        admission = Admitted(group, key, instance)  # (one message for every rank: encoded once)
        told: list[BarrierEffect] = early + [ToRank(group, r, admission) for r in tell]
        if len(entry.words) < size:
            if self._stopped and key != STARTUP_KEY and any((group, r) in self._stopped for r in self._missing(entry)):
                self._deadlines.cancel(k)
                return told + self._expire(k, now)  # a rank it waits for stopped serving: no use waiting
            return told
        return told + self._settle(k, entry, size, now)

    def _hold_alone(self, k: RoundKey, rank: int, size: int, now: float) -> list[BarrierEffect]:
        """Rank ``rank`` opens ``k`` with a withdrawal: if it already holds as many keys alone as
        it may, its oldest such key ends now (it failed anyway: a rank withdrew; the others hear
        the verdict when they speak, or now), so one rank's refusals cannot fill its group."""
        held = self._alone.get((k[0], rank))
        cap = max(1, min(self.max_alone, self.max_keys // (4 * size) or 1))
        if held is None or len(held) < cap:
            return []
        oldest = next(iter(held))
        self._deadlines.cancel(oldest)
        how = f"was not waited for: rank {rank} withdrew alone from {cap} newer keys"
        return self._expire(oldest, now, gone=self._missing(self._open[oldest]), how=how)

    def _unalone(self, entry: _Open, k: RoundKey) -> None:
        """``entry`` stops being held by one rank's withdrawal alone."""
        (first,) = entry.words
        held = self._alone.get((entry.group, first))
        if held is not None and held.pop(k, 0) is None and not held:
            del self._alone[(entry.group, first)]

    def _take(self, entry: _Open, view: RankView, admitted: bool) -> tuple[str | None, list[int]]:
        """Record one rank's word in the open round: a sentence if the word is not acceptable, and
        the ranks that must hear ``Admitted`` now. ``admitted``: the word is one only an admitted
        rank says (an arrival, or a withdrawal that says so).

        Such a word in an admission round (or an ``Admit`` into a round where some rank said one)
        means the service lost the admission in a restart and ranks announced their words again
        (or an Admit sent before the restart reached the new service): the round is the completion
        round, with those terms, and a rank whose ``Admitted`` was lost with the old service (it
        admits again) hears it now."""
        if view.terms is not None and entry.round is not Round.ADMISSION:
            if entry.round is Round.NAMED and entry.key != STARTUP_KEY:
                entry.round, entry.terms = Round.COMPLETION, view.terms
            if entry.round is Round.COMPLETION and entry.terms in (None, view.terms):
                entry.terms = view.terms
                return None, [view.rank]  # a repeated admission: harmless, and answered
            return f"admits in the {entry.round.value} round", []
        if admitted and entry.round is Round.ADMISSION:
            terms = [w.terms for w in entry.words.values() if w.terms is not None]
            entry.round, entry.terms = Round.COMPLETION, (terms[0] if terms else None)
            waiting = sorted(r for r, w in entry.words.items() if w.terms is not None)
            entry.words = {r: w for r, w in entry.words.items() if w.terms is None}  # withdrawals still count
            problem, _ = self._take(entry, view, admitted)
            return problem, ([] if problem else waiting)
        said = entry.words.get(view.rank)
        if said is None or said == view:
            entry.words[view.rank] = view
            return None, []
        if entry.round is Round.ADMISSION and said.terms is not None and view.status is not Status.OK:
            entry.words[view.rank] = view  # a withdrawal replaces an admission
            return None, []
        return f"already said {said.describe()}; now {view.describe()}", []

    def _settle(self, k: RoundKey, entry: _Open, size: int, now: float) -> list[BarrierEffect]:
        """Every rank has spoken in the open round."""
        group, key, instance = k
        views = tuple(entry.words[r] for r in range(size))
        if entry.round is Round.ADMISSION:
            ending = verdicts.admission(views)
            if ending is None:
                entry.round, entry.terms, entry.words, entry.opened = Round.COMPLETION, views[0].terms, {}, now
                self._deadlines.set(k, now + entry.timeout_s)
                return [ToRank(group, r, Admitted(group, key, instance)) for r in range(size)]
        else:
            ending = verdicts.completion(views)
        del self._open[k]
        self._open_in[group] -= 1
        self._deadlines.cancel(k)
        if size == 1:
            self._unalone(entry, k)
        verdict: Release | Diverged
        if ending is None:
            digest = views[0].digest
            assert digest is not None
            verdict = Release(group, key, instance, digest, entry.peer)
        else:
            verdict = Diverged(group, key, instance, ending[0], ending[1], views, entry.peer)
        self._decide(k, verdict, now)
        told: list[BarrierEffect] = [ToRank(group, r, verdict) for r in range(size)]
        if key == STARTUP_KEY:
            return told
        told += self._relay(self._tell_others(self._named(entry), verdict), now)
        return told + self._relay(self._tell_decode(group, self._absent_in(group), [verdict]), now)
