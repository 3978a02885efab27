"""``kvxferd serve`` for a prefill rank: the shell around :class:`kvxferd.core.RankCore`.

Sockets: a ROUTER for the engine (layer signals from the model worker;
cache_info and aborts from the scheduler; the cache registration), a DEALER
to the group's barrier service, and a DEALER per decode peer. Every message
goes to the core with ``now``; the effects it returns are carried out here:
writes go to the transports, arrivals to the barrier, results to the engine
that sent the request's cache_info, notices to the decode peer.
"""

from __future__ import annotations

import json
import logging
import time

import zmq

from kvxferd.config import Config, GroupConfig
from kvxferd.core import Problem, RankCore, RankEffect, RankSettings, ToBarrier, ToEngine, ToPeer, Write
from kvxferd.core.barrier import ALIVE_BEATS
from kvxferd.core.memory import Memory
from kvxferd.errors import CoreBroken, TransportError
from kvxferd.protocol import (
    STARTUP_KEY,
    Abort,
    Ack,
    Admitted,
    Attach,
    CacheInfo,
    Diverged,
    Error,
    ErrorCode,
    Expired,
    Key,
    LayerSignal,
    Message,
    RegisterCache,
    Release,
    Status,
    StatusQuery,
    StatusReply,
    TransferResult,
)
from kvxferd.protocol.fields import clip, show
from kvxferd.runtime.daemon import GroupDaemon
from kvxferd.runtime.guard import guarded, unguarded
from kvxferd.runtime.logs import TRACE
from kvxferd.runtime.outbox import Outbox
from kvxferd.runtime.peers import Peers
from kvxferd.transports import Completion

log = logging.getLogger(__name__)

SHUTTING_DOWN = "the prefill daemon is shutting down"
RESULT_RETRY_S = 0.5  # how often a result its scheduler could not take is tried again
#: scheduler connections remembered (the most recent ones) as allowed to abort a request not seen yet
MAX_SCHEDULERS = 64
#: live requests a status reply shows (the oldest): a query costs that much, however many are live
STATUS_ROWS = 100


def rank_settings(config: Config, group: GroupConfig, rank: int) -> RankSettings:
    kv, limits, t = config.kv, config.limits, config.timeouts
    return RankSettings(
        group=group.name,
        rank=rank,
        world_size=group.world_size,
        num_layers=kv.num_layers,
        num_blocks=kv.num_blocks,
        block_tokens=kv.block_tokens,
        block_bytes=kv.block_bytes(group.world_size),
        max_requests=limits.max_requests,
        max_ended=limits.max_ended,
        max_pending_signals=limits.max_pending_signals,
        max_steps=limits.max_steps,
        max_step_gap=limits.max_step_gap,
        pending_timeout_s=t.pending_s,
        progress_timeout_s=t.progress_s,
        verdict_timeout_s=t.verdict_s,
        planes=kv.planes,
    )


class PrefillDaemon(GroupDaemon):
    role = "prefill"

    def __init__(self, config: Config, group: GroupConfig, rank: int) -> None:
        super().__init__(config, group, rank)
        self.core = guarded(RankCore(rank_settings(config, group, rank)), "prefill core")
        self.peers = Peers(self, config, group=group.name, rank=rank, memory=group.memory)
        self.peers.on_report = self._confirmed
        self.worker: bytes | None = None  # the connection that registered the cache: the one model worker
        #: connections that sent a cache_info lately (schedulers): who may abort a request not seen yet
        self.schedulers: Memory[bytes, bool] = Memory(limit=MAX_SCHEDULERS)
        self._sender: bytes | None = None
        #: the worker's signals without a slot table read in a row from one step: (step, layers)
        self._run: tuple[int, list[int]] | None = None
        #: results a scheduler could not be sent (not reading, reconnecting): tried again, bounded
        self.results: Outbox[Key, TransferResult] = Outbox(
            limit=config.limits.max_requests, retry_s=RESULT_RETRY_S, keep_s=config.timeouts.verdict_s
        )

    # -- lifecycle -------------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        times = (
            self.core.next_deadline(),
            self.peers.next_wakeup(),
            super().next_wakeup(),
            self.results.next_deadline(),
        )
        return min((t for t in times if t is not None), default=None)

    def tick(self, now: float) -> None:
        self.fence()  # before the heartbeat: once it goes, the service hears this rank again
        super().tick(now)
        if self.results.next_deadline() is not None:
            self._lost(self.results.retry(now, lambda to, msg: to is not None and self.reply(to, msg, quiet=True)))
        self._complete(self.peers.handle_answers(now) + self.peers.tick(now), now)
        deadline = self.core.next_deadline()
        if deadline is not None and now >= deadline:
            self._apply(self.core.on_timer(now), now)

    def idle(self) -> bool:
        """Nothing live, and no ok result waiting for its decode rank's confirmation."""
        return self.core.sizes()["requests"] == 0 and not self.peers.ledger.holding

    def force_stop(self, now: float, why: str) -> None:
        """The drain is cut short and the process exits: what is left is withdrawn, and the group's
        verdict is its one ending (see RankCore.close)."""
        self.peers.close_transports()
        self._apply(self.core.close(f"{SHUTTING_DOWN} ({why})", now, report=False), now)

    def close(self) -> None:
        self.peers.close()

    def start(self) -> None:
        super().start()
        self.barrier.silence_s = ALIVE_BEATS * self.heartbeat_s
        self.barrier.on_silence = self.fence

    def begin_batch(self) -> None:
        self.core.hold()  # every message of the wake-up, then their writes planned together

    def end_batch(self, now: float) -> None:
        self._apply(self.core.flush(now), now)

    def on_stall(self, late_s: float) -> None:
        self.fence()  # before anything that waited is read
        super().on_stall(late_s)

    def on_barrier(self) -> None:
        self.fence()  # a verdict admitting a request would write its signalled layers
        super().on_barrier()

    def fence(self, silent_s: float | None = None) -> None:
        """Back from a stop, wherever in the loop it came: if the barrier service heard nothing of
        this rank for 3 heartbeats (the time after which it counts a rank stopped), it may have
        ended its rounds and told its decode rank those requests failed, whose engine may reuse
        the blocks already. So every request still writing stops and withdraws (the verdict ends
        it) before this rank writes anything more. A process may stop on any line, so this runs
        before every message and every run of the timers (``silent_s``: the time since the last
        word to the service), and right after a word to the service that ended such a silence
        (``silent_s`` given by the link: a stop on the line that sends the heartbeat leaves nothing
        else looking late). A loop merely busy for less than that, which a loaded host sees,
        changes nothing; the check is one clock read."""
        if self._next_beat is None:  # not serving yet: nothing written, no heartbeat expected
            return
        now = time.monotonic()
        if silent_s is None:
            silent_s = now - self.barrier.last_sent
        if silent_s >= ALIVE_BEATS * self.heartbeat_s:
            why = (
                f"prefill rank {self.rank} said nothing to the barrier service for {silent_s:.1f}s (stopped or "
                "starved): its decode rank may have been told the request failed, so it writes no more of it"
            )
            self.peers.cancel(why)  # not one more byte of a large copy still queued (shm)
            self._apply(self.core.stalled(why, now), now)

    def on_broken(self, reason: str, now: float) -> None:
        """End every request in flight as failed: through the core's own close if it still can
        (that also withdraws at the barrier and tells the decode peers), else to each origin."""
        self.peers.close_transports()  # no write of a broken daemon may land after this
        try:
            effects = unguarded(self.core).close(reason, now)
        except Exception:
            log.exception("the core cannot close; telling each engine directly")
        else:
            self._apply([e for e in effects if not isinstance(e, Write)], now)
            return
        try:
            origins = unguarded(self.core).origins()
        except Exception:
            log.exception("the core cannot name its requests' engines either; they learn from their timeouts")
            return
        for (rid, instance), identity in origins.items():
            if identity is not None:
                self.reply(identity, TransferResult(rid, Status.FAILED, reason, rank=self.rank, instance=instance))

    # -- inbound ----------------------------------------------------------------------

    def serve(self, sock: zmq.Socket[bytes]) -> None:
        try:
            super().serve(sock)
        except CoreBroken:
            self._run = None  # (nothing more goes to a broken core)
            raise
        finally:  # (a read that failed: what was read before it still counts, now)
            self._take_run(time.monotonic())

    def dispatch(self, sock: zmq.Socket[bytes], identity: bytes, msg: Message, now: float) -> None:
        """The model worker's layer signals after layer 0 read in a row, of one step, go to the core
        together (most of a request's messages are such signals: handled one by one, they cost
        more than everything else it sends here); anything else first hands over those before it."""
        if type(msg) is LayerSignal and msg.layer > 0 and identity == self.worker and sock is self.router:
            if self._run is not None and self._run[0] == msg.step:
                self._run[1].append(msg.layer)
                return
            self._take_run(now)
            self._run = (msg.step, [msg.layer])
            return
        self._take_run(now)
        super().dispatch(sock, identity, msg, now)

    def _take_run(self, now: float) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        self.counters["LayerSignal"] += len(run[1])
        worker = self._sender = self.worker  # (a stale or out-of-range layer is answered to the worker)
        try:
            self.fence()  # as before any message (the process may have stopped while reading them)
            self._apply(self.core.on_layers(run[0], run[1], now), now)
        except CoreBroken:
            raise
        except Exception as exc:  # as Service.dispatch does for one message
            log.exception("internal error handling %d layer signals of step %d; still serving", len(run[1]), run[0])
            detail = f"internal error handling layer signals: {type(exc).__name__}: {clip(str(exc), 512)}"
            if worker is not None:
                self.reply(worker, Error(ErrorCode.INTERNAL, detail))
        finally:
            self._sender = None

    def handle(self, identity: bytes, msg: Message, now: float) -> None:
        self.fence()  # the process may have stopped between two messages of one read
        self._sender = identity  # problems found while handling msg are answered to its sender
        try:
            self._engine_message(identity, msg, now)
        finally:
            self._sender = None

    def _engine_message(self, identity: bytes, msg: Message, now: float) -> None:
        self.counters[type(msg).__name__] += 1
        if isinstance(msg, CacheInfo):
            self._attached(identity)
            refusal = None
            if self.state != "serving":
                refusal = (ErrorCode.UNAVAILABLE, SHUTTING_DOWN)
            elif self.peers.local is None:
                detail = f"no KV cache is registered with {self.group.name} rank {self.rank}"
                refusal = (ErrorCode.NOT_REGISTERED, detail)
            else:
                try:
                    targets = self.peers.targets_of(self.peers.group_of(msg.peer))
                except TransportError as exc:
                    refusal = (ErrorCode.UNKNOWN_PEER, f"request {msg.request_id}: {exc}")
                else:
                    if msg.dst_generations and targets and max(targets) >= len(msg.dst_generations):
                        refusal = (ErrorCode.BAD_LAYOUT, (
                            f"request {msg.request_id}: dst_generations names the registrations of "
                            f"{len(msg.dst_generations)} decode ranks; {self.group.name} rank {self.rank} writes "
                            f"into decode ranks {sorted(targets)}"
                        ))  # fmt: skip
            self._apply(self.core.on_cache_info(msg, now, refusal, origin=identity), now)
        elif isinstance(msg, LayerSignal):
            if identity != self.worker:
                self._refuse(
                    identity, "layer signals", "the model worker's connection (the one that registered the cache)"
                )
                return
            self._apply(self.core.handle(msg, now), now)
        elif isinstance(msg, Abort):
            origin = self.core.origin_of(msg.key)
            allowed = identity == origin or identity == self.worker or (origin is None and identity in self.schedulers)
            if not allowed:
                self._refuse(
                    identity, f"an abort of {msg.request_id}", "its scheduler (the connection that sent its cache_info)"
                )
                return
            self._apply(self.core.handle(msg, now), now)
        elif isinstance(msg, Attach):
            self._attached(identity)
            self.reply(identity, Ack("attach"))
        elif isinstance(msg, RegisterCache):
            self._register(identity, msg)
        elif isinstance(msg, StatusQuery):
            self.reply(identity, self.status(now))
        else:
            super().handle(identity, msg, now)

    def _attached(self, identity: bytes) -> None:
        """``identity`` is a scheduler connection (it attached, or sent a cache_info)."""
        self.schedulers.put(identity, True)

    def _refuse(self, identity: bytes, what: str, who: str) -> None:
        self.counters["refused_sender"] += 1
        log.warning("refused %s from %s: accepted only from %s", what, show(identity), who)
        self.reply(identity, Error(ErrorCode.WRONG_ROLE, f"{what} is accepted only from {who}"))

    def _register(self, identity: bytes, msg: RegisterCache) -> None:
        problem = self.registration_problem(msg)
        if problem is not None:
            self.reply(identity, Error(ErrorCode.BAD_LAYOUT, problem, "register"))
            return
        live = self.core.sizes()["requests"]
        if live:
            # the worker restarted: the cache those requests read from is not the one registered now
            reason = (
                f"the model worker registered a new cache with {self.group.name} rank {self.rank}; "
                "requests in flight on the old one failed"
            )
            log.warning("%s (%d)", reason, live)
            now = time.monotonic()
            self.peers.close_transports()  # no write from the old cache may land after this
            self._apply(self.core.close(reason, now), now)
        self.peers.set_local(msg)
        self.core.new_worker()
        if self.worker is not None and self.worker != identity:
            detail = (
                f"another connection registered a cache with {self.group.name} rank {self.rank}; "
                "only its layer signals count now"
            )
            self.reply(self.worker, Error(ErrorCode.NOT_REGISTERED, detail, "takeover"))
        self.worker = identity
        log.info(
            "engine cache registered: %d layers x %d blocks of %d B",
            msg.layout.num_layers,
            msg.layout.num_blocks,
            msg.layout.block_bytes,
        )
        self.reply(identity, Ack("register"))
        if self.config.transport.warm_peers:
            for group in self.config.groups:
                if group.role == "decode" and self.rank < group.world_size:
                    self.peers.warm(group.name, time.monotonic())

    def from_barrier(self, msg: Message, now: float) -> None:
        log.log(TRACE, "<- barrier %s", msg)
        if isinstance(msg, (Admitted, Release, Diverged, Expired)) and msg.key != STARTUP_KEY:
            self._apply(self.core.on_verdict(msg, now), now)
        else:
            super().from_barrier(msg, now)

    def on_barrier_restart(self, now: float) -> None:
        effects = self.core.reannounce(now)
        log.warning("announcing %d open words about requests again", len(effects))
        self._apply(effects, now)

    # -- effects -----------------------------------------------------------------------

    def _apply(self, effects: list[RankEffect], now: float) -> None:
        queue = list(effects)
        while queue:
            eff = queue.pop(0)
            if isinstance(eff, Write):
                self.counters["writes"] += 1
                self.counters["bytes_posted"] += eff.nbytes
                completions = self.peers.write(eff, now)
                now = time.monotonic()  # a synchronous copy took time: stamp what follows with the real time
                for done in completions:
                    queue += self._done(done, now)
            elif isinstance(eff, ToBarrier):
                self.barrier.send(eff.message)
            elif isinstance(eff, ToEngine):
                self._result(eff)
            elif isinstance(eff, ToPeer):
                self.peers.notify(eff.peer, eff.message, now, eff.then)
            elif isinstance(eff, Problem):
                self._problem(eff)

    def _complete(self, completions: list[Completion], now: float) -> None:
        for done in completions:
            self._apply(self._done(done, now), now)

    def _done(self, done: Completion, now: float) -> list[RankEffect]:
        """A write's completion, to the core: where it went (transport, decode registration) with it."""
        generation = self.peers.generation_of(done)
        return self.core.write_done(done.write_id, now, done.error, done.transport, generation)

    def _result(self, eff: ToEngine) -> None:
        result = eff.result
        rid = result.request_id
        self.counters[f"result_{result.status.value}"] += 1
        if result.status.value == "ok":
            self.counters["bytes_ok"] += result.bytes
        else:
            log.warning("request %s %s: %s", rid, result.status.value, result.reason)
        identity = eff.origin or self._sender
        if identity is None:
            log.error("no engine to tell that request %s ended (%s)", rid, result.status.value)
            return
        if not self.reply(identity, result):  # its scheduler is not reading, or reconnecting: again later
            now = time.monotonic()
            self._lost(self.results.hold(result.key, identity, result, now))

    def _confirmed(self, eff: ToEngine) -> None:
        """An ok result whose decode rank confirmed (or did not) how its engine was told."""
        if eff.origin is None:  # never the sender of whatever message is being handled now
            log.error("no engine to tell that request %s ended (%s)", eff.result.request_id, eff.result.status.value)
            return
        self._result(eff)

    def _lost(self, results: list[TransferResult]) -> None:
        for result in results:
            self.counters["results_given_up"] += 1
            log.error(
                "gave up telling the scheduler that request %s instance %d ended %s: not reachable for %gs",
                result.request_id,
                result.instance,
                result.status.value,
                self.results.keep_s,
            )

    def _problem(self, eff: Problem) -> None:
        self.counters[f"problem_{eff.code.value}"] += 1
        level = logging.INFO if eff.code is ErrorCode.STALE_SIGNAL and not eff.reply else logging.WARNING
        log.log(level, "%s: %s", eff.code.value, eff.detail)
        if eff.reply and self._sender is not None:
            self.reply(self._sender, Error(eff.code, clip(eff.detail), eff.ref))

    def status(self, now: float) -> StatusReply:
        report = {
            "endpoint": self.endpoint,
            "registered": self.peers.local is not None,
            # (results_held: ok results waiting for their decode rank's confirmation)
            "tables": {**self.core.sizes(), "results_held": self.peers.ledger.holding},
            "requests": self.core.snapshot(now, limit=STATUS_ROWS),
            "peers": self.peers.report(),
            "counters": dict(self.counters),
        }
        return StatusReply(self.role, self.group.name, self.rank, self.state, json.dumps(report))
