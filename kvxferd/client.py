"""The engine side: what a prefill worker, a prefill scheduler and a decode engine call.

Each class holds one DEALER per daemon rank it talks to. Sends never block
longer than ``send_timeout_s``; every wait takes a timeout. Errors the daemon
sends back (an :class:`~kvxferd.protocol.Error`) are raised as
:class:`~kvxferd.errors.DaemonError` where a call waits for a reply, and are
returned as events by ``poll`` otherwise.

Every client holds the deployment's engine keys (:func:`credentials`, made
from the deployment secret, see :mod:`kvxferd.security`): a daemon does not
complete the handshake with a client without them, and answers nothing.

Example, for a 2-rank prefill group and a 2-rank decode group::

    shape = KVShape.from_config(config, world_size=2)
    creds = credentials(config)
    # decode engine: register each rank's cache, then wait for requests
    decode = DecodeEngine([config.endpoint(dgroup, r) for r in range(2)], credentials=creds)
    dcaches = [HostKVCache.create(shape) for _ in range(2)]
    decode.register(dcaches)
    # prefill model worker of rank r (one per rank, in the worker process)
    worker = PrefillWorker(config.endpoint(pgroup, r), credentials=creds)
    worker.register(HostKVCache.create(shape))
    # prefill scheduler: one CacheInfo per request, to every rank
    sched = PrefillScheduler([config.endpoint(pgroup, r) for r in range(2)], credentials=creds)
    sched.submit(CacheInfo("req-1", slot=3, step=17, num_tokens=200, src_blocks=src,
                           dst_blocks=dst, peer=dgroup.name, instance=0,
                           dst_generations=tuple(decode.generations)))  # where dst was reserved
    # ... the worker runs step 17: worker.layer_ready(17, 0, [SlotChunk(3, 0, 200, 17)]), then layers 1..L-1
    sched.wait("req-1", timeout_s=30)        # PrefillOutcome: results {rank: TransferResult}
    decode.wait("req-1", timeout_s=30)       # DecodeOutcome(ready=True, ...)

Each client watches its connections: a daemon whose connection closes is *gone*
(``gone`` holds its ranks until it connects again). The scheduler ends the
instances a gone prefill rank held without reporting (``PrefillOutcome.gone``
says so), so no request waits on a dead process.

Outcomes are kept per request instance ``(request_id, instance)``: undecided
ones until decided (at most :data:`MAX_OPEN`), decided ones for the
:data:`KEEP_DONE` most recent instances, so nothing needs forgetting by hand.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvxferd.core.memory import Memory
from kvxferd.errors import DaemonError
from kvxferd.protocol import (
    DEFAULT_MAX_FRAME,
    Abort,
    Ack,
    Attach,
    CacheInfo,
    Error,
    ErrorCode,
    Key,
    KVReady,
    LayerSignal,
    Message,
    RegisterCache,
    SlotChunk,
    Status,
    StatusQuery,
    StatusReply,
    TransferResult,
    encode,
)
from kvxferd.runtime import sockets

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from kvxferd.config import Config
    from kvxferd.kvcache import HostKVCache
    from kvxferd.security import Credentials


def credentials(config: Config) -> Credentials:
    """The engine keys of ``config``'s deployment (what every client here needs)."""
    from kvxferd import security

    return security.credentials(config, "engine")


@dataclass(frozen=True)
class Gone:
    """Not a message: the connection to a daemon closed (its process ended, or the link broke)."""

    endpoint: str


Event = tuple[int, "Message | Gone"]  # (rank, message)


class Channel:
    """A DEALER to one daemon, speaking protocol messages."""

    def __init__(
        self,
        endpoint: str,
        *,
        credentials: Credentials,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        send_timeout_s: float = 5.0,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.endpoint = endpoint
        self.max_frame = max_frame
        self._own_ctx = ctx is None
        self.ctx = ctx if ctx is not None else zmq.Context()
        self.sock = sockets.socket(self.ctx, zmq.DEALER, max_frame=max_frame)
        # A name of our own, kept across reconnects: a daemon knows its worker and schedulers by it.
        self.sock.setsockopt(zmq.IDENTITY, b"engine-" + secrets.token_hex(8).encode())
        credentials.client(self.sock)
        self.sock.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
        self.sock.connect(endpoint)

    def send(self, msg: Message) -> None:
        try:
            self.sock.send(encode(msg))
        except zmq.Again:
            raise DaemonError(f"daemon at {self.endpoint} did not take a message within the send timeout") from None

    def recv(self, timeout_s: float) -> Message | None:
        if not self.sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            return None
        return self.recv_now()

    def recv_now(self) -> Message | None:
        """The next message waiting, if any; one the daemon sent that cannot be decoded comes back
        as ``Error(bad_message)`` saying why (read through the daemons' own receive path)."""
        for inbound in sockets.receive(self.sock, max_frame=self.max_frame, router=False, limit=1):
            if inbound.msg is None:
                return Error(ErrorCode.BAD_MESSAGE, f"undecodable reply from {self.endpoint}: {inbound.error}")
            return inbound.msg
        return None

    def close(self) -> None:
        self.sock.close()
        if self._own_ctx:
            self.ctx.term()


class _Group:
    """Channels to every rank of one daemon group, polled together."""

    def __init__(self, endpoints: Sequence[str], *, credentials: Credentials, send_timeout_s: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.channels = [
            Channel(e, credentials=credentials, ctx=self.ctx, send_timeout_s=send_timeout_s) for e in endpoints
        ]
        self.poller = zmq.Poller()
        self.backlog: list[Event] = []  # messages taken while waiting for something else
        #: ranks whose daemon's connection closed and has not come back
        self.gone: set[int] = set()
        self._rank_of: dict[zmq.Socket[bytes], int] = {}
        self._monitors: dict[zmq.Socket[bytes], int] = {}
        for rank, ch in enumerate(self.channels):
            self.poller.register(ch.sock, zmq.POLLIN)
            self._rank_of[ch.sock] = rank
            monitor = ch.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            self.poller.register(monitor, zmq.POLLIN)
            self._monitors[monitor] = rank

    def poll(self, timeout_s: float = 0.0) -> list[Event]:
        """Messages from any rank: wait up to ``timeout_s`` for the first, then take what is there.

        A rank whose connection closed comes as ``(rank, Gone)``, after every message it sent
        before closing (its socket is read again once the event is seen)."""
        events: list[Event] = []
        ready = [sock for sock, _ in self.poller.poll(max(0, int(timeout_s * 1000)))]
        for sock in ready:
            if sock in self._rank_of:
                self._drain(self._rank_of[sock], events)
        for sock in ready:
            if sock in self._monitors:
                self._watch(sock, self._monitors[sock], events)
        return events

    def _drain(self, rank: int, events: list[Event]) -> None:
        ch = self.channels[rank]
        while (msg := ch.recv_now()) is not None:
            events.append((rank, msg))

    def _watch(self, monitor: zmq.Socket[bytes], rank: int, events: list[Event]) -> None:
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED and rank not in self.gone:
                self.gone.add(rank)
                self._drain(rank, events)  # what it sent before the connection closed comes first
                events.append((rank, Gone(self.channels[rank].endpoint)))
            elif event == zmq.EVENT_CONNECTED:
                self.gone.discard(rank)

    def _expect(self, rank: int, want: type[Ack], timeout_s: float, what: str, ref: str = "register") -> Ack:
        """Wait for the ``want`` reply to the request named ``ref`` from ``rank``; an Error naming
        ``ref`` refuses it. Other messages (errors answering other messages, say layer signals
        sent before) are kept for :meth:`poll` callers."""
        deadline = time.monotonic() + timeout_s
        ch = self.channels[rank]
        while (left := deadline - time.monotonic()) > 0:
            msg = ch.recv(left)
            if msg is None:
                break
            if isinstance(msg, want) and msg.ref == ref:
                return msg
            if isinstance(msg, Error) and msg.ref == ref:
                raise DaemonError(f"{what} refused by {ch.endpoint}: {msg.detail}")
            self.backlog.append((rank, msg))
        raise DaemonError(f"no answer to {what} from {ch.endpoint} within {timeout_s:g}s (is the daemon running?)")

    def close(self) -> None:
        if self.ctx.closed:
            return  # closed already
        for ch in self.channels:
            ch.sock.disable_monitor()
        for monitor in self._monitors:
            monitor.close()
        for ch in self.channels:
            ch.close()
        self.ctx.term()

    def __enter__(self) -> _Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _registration(cache: HostKVCache | RegisterCache) -> RegisterCache:
    return cache if isinstance(cache, RegisterCache) else cache.registration()


class PrefillWorker(_Group):
    """One prefill rank's model worker: registers its cache and says which layers are written."""

    def __init__(self, endpoint: str, *, credentials: Credentials, send_timeout_s: float = 5.0) -> None:
        super().__init__([endpoint], credentials=credentials, send_timeout_s=send_timeout_s)

    def register(self, cache: HostKVCache | RegisterCache, timeout_s: float = 10.0) -> None:
        self.channels[0].send(_registration(cache))
        self._expect(0, Ack, timeout_s, "cache registration")

    def layer_ready(self, step: int, layer: int, slots: Iterable[SlotChunk] = ()) -> None:
        self.channels[0].send(LayerSignal(step, layer, tuple(slots)))

    def errors(self) -> list[Error]:
        """Errors the daemon answered signals with, since the last call."""
        found = [m for _, m in self.backlog + self.poll(0.0) if isinstance(m, Error)]
        self.backlog = []
        return found


#: Decided outcomes kept for late lookups and late messages, per client (oldest forgotten first).
KEEP_DONE = 4096
#: Undecided outcomes kept at most (a request whose notices never all come is dropped, and reported).
MAX_OPEN = 65536
#: Anomalies and errors kept for the caller to read (oldest dropped first).
MAX_EVENTS = 1024
#: A rank whose connection is closed when a cache_info is sent to it counts as gone for that instance
#: unless it connects again within this long (a daemon restarting there serves what waited for it).
GONE_GRACE_S = 1.0


@dataclass
class PrefillOutcome:
    """What the prefill ranks reported about one request instance.

    ``results`` holds one TransferResult per rank that reported. Every rank
    reports the group's status, but for one whose result has a ``code``: a rank
    that *refused* the cache_info reports at once (the code says why), and a
    rank reports ``ok`` only once its decode rank confirmed it told its engine
    KVReady, so one whose decode engine was told a failure (it registered a new
    cache after the write) reports that, with its code. An outcome is *decided*
    as soon as every rank reported or any rank ended it with a code. Results that come after that are
    still added here. A second result from the same rank is never taken in:
    it goes to ``duplicates``.

    ``gone``: ranks whose daemon's connection closed while they held the
    instance without reporting, with why. Such a rank will never report (a
    restarted daemon does not know the instances its predecessor held), so the
    outcome is decided, and not ok, once every other rank reported. A
    cache_info still queued in the scheduler's socket when the connection
    closed goes to the daemon that starts there next, which may serve it: its
    result is added here after the decision, and said in ``anomalies``; until
    that daemon reported, it may still read the instance's source blocks.
    ``sent``: the ranks the cache_info went to through
    :meth:`PrefillScheduler.submit`.
    """

    request_id: str
    instance: int
    world_size: int
    results: dict[int, TransferResult] = field(default_factory=dict)
    duplicates: list[TransferResult] = field(default_factory=list)
    gone: dict[int, str] = field(default_factory=dict)
    sent: set[int] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return len(self.results) == self.world_size

    @property
    def refused(self) -> dict[int, TransferResult]:
        """The ranks whose result has a ``code``, with their results: those that refused the
        cache_info, and those that ended it alone (see the class)."""
        return {rank: r for rank, r in self.results.items() if r.code}

    @property
    def decided(self) -> bool:
        return self.complete or bool(self.refused) or len(self.results.keys() | self.gone.keys()) == self.world_size

    @property
    def ok(self) -> bool:
        return self.complete and not self.gone and all(r.status is Status.OK for r in self.results.values())

    @property
    def status(self) -> Status | None:
        """The instance's status, once any rank reported: the group's verdict (the status of every
        result without a ``code``), unless a rank ended it alone (a refusal, or a decode rank that
        told its engine a failure where the group said ok): then that rank's ``failed``."""
        if not self.results:
            return None
        failing = [r for r in self.results.values() if r.status is not Status.OK]
        if not failing:
            return Status.OK
        return next((r.status for r in failing if not r.code), failing[0].status)

    @property
    def reason(self) -> str:
        """Why the instance did not end ok, read once: the group's reason (every result without a
        ``code`` has it), else the first rank's own; "" while none did."""
        failing = [r for r in self.results.values() if r.status is not Status.OK]
        return next((r.reason for r in failing if not r.code), failing[0].reason if failing else "")


@dataclass
class DecodeOutcome:
    """What the decode side knows of a request instance.

    ``ready``: the KV is complete on every rank: every decode rank reported
    KVReady (each names the cache registration its bytes went into, and its
    daemon turns one that names an earlier registration into a failure, so
    one rank's KVReady does not vouch for another's). ``reasons``: per decode
    rank, how the request failed. ``reported``: the decode ranks
    that told. ``reusable``: every decode rank reported, so no prefill rank
    writes into the request's blocks any more and the engine may reuse them.
    A second notice from the same decode rank goes to ``duplicates``.
    """

    request_id: str
    instance: int
    world_size: int
    ready: bool = False
    reasons: dict[int, str] = field(default_factory=dict)
    statuses: dict[int, Status] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)
    duplicates: list[Message] = field(default_factory=list)

    @property
    def reusable(self) -> bool:
        return len(self.reported) == self.world_size

    @property
    def decided(self) -> bool:
        return self.ready or self.reusable


Outcome = TypeVar("Outcome", PrefillOutcome, DecodeOutcome)


class _Ledger(Generic[Outcome]):
    """Outcomes by request instance: open ones until decided, then a bounded memory of decided ones.

    Nothing needs to be forgotten by hand: decided outcomes are kept for the
    :data:`KEEP_DONE` most recent instances (late messages still land in them,
    and ``wait`` finds them), undecided ones for at most :data:`MAX_OPEN`.
    """

    def __init__(self, make: Callable[[Key], Outcome]) -> None:
        self.make: Callable[[Key], Outcome] = make
        self.open: Memory[Key, Outcome] = Memory(limit=MAX_OPEN)
        self.done: Memory[Key, Outcome] = Memory(limit=KEEP_DONE)
        self.anomalies: deque[str] = deque(maxlen=MAX_EVENTS)

    def get(self, key: Key) -> Outcome | None:
        return self.open.get(key) or self.done.get(key)

    def entry(self, key: Key) -> Outcome:
        out = self.get(key)
        if out is None:
            out = self.make(key)
            dropped = self.open.put(key, out)
            if dropped is not None:
                old = dropped[0]
                self.anomalies.append(f"{old[0]} instance {old[1]}: dropped undecided, {MAX_OPEN} others open")
        return out

    def settle(self, key: Key) -> bool:
        """Move a decided outcome to the memory of decided ones; True the first time."""
        out = self.open.pop(key)
        if out is None:
            return False
        self.done.put(key, out)
        return True


class PrefillScheduler(_Group):
    """The prefill scheduler: cache_info and aborts to every rank, results from every rank."""

    def __init__(self, endpoints: Sequence[str], *, credentials: Credentials, send_timeout_s: float = 5.0) -> None:
        super().__init__(endpoints, credentials=credentials, send_timeout_s=send_timeout_s)
        world = len(self.channels)
        for ch in self.channels:  # say who we are first: ZMQ keeps a connection's order, so no wait
            ch.send(Attach("scheduler"))
        self.ledger: _Ledger[PrefillOutcome] = _Ledger(lambda k: PrefillOutcome(k[0], k[1], world))
        #: Error replies (bad messages, refusals, duplicates), oldest dropped first.
        self.errors: deque[tuple[int, Error]] = deque(maxlen=MAX_EVENTS)
        self._early: list[PrefillOutcome] = []  # decided while submitting, for the next collect
        #: instances sent to a rank whose connection was closed: rank -> since when, until it
        #: connects again (it will report) or GONE_GRACE_S passed (it counts as gone)
        self._unsure: dict[Key, dict[int, float]] = {}

    @property
    def world_size(self) -> int:
        return len(self.channels)

    @property
    def anomalies(self) -> deque[str]:
        """Second results from one rank, results for instances no longer kept: reported here."""
        return self.ledger.anomalies

    def submit(self, info: CacheInfo, ranks: Iterable[int] | None = None) -> None:
        """Send ``info`` to ``ranks`` (default: every rank; each rank must get it once).

        A rank whose connection is closed now counts as gone for this instance as well, unless it
        connects again within :data:`GONE_GRACE_S` (a daemon restarting there): its cache_info waits
        in the socket for whatever daemon starts there next, and the instance is decided without it
        once the others reported (a result that comes later is still added)."""
        # connections that closed (and opened again) meanwhile end what was sent before, not this.
        # (collect hands over and empties ``_early``: read it first, then keep what it returned;
        # ``self._early += self.collect()`` would add the old list to itself on every call)
        decided = self.collect(0.0)
        self._early.extend(decided)
        out = self.ledger.entry(info.key)
        now = time.monotonic()
        for rank in range(self.world_size) if ranks is None else ranks:
            self.channels[rank].send(info)
            out.sent.add(rank)
            if rank in self.gone:  # decided without it unless it connects again within the grace
                self._unsure.setdefault(info.key, {})[rank] = now

    def abort(
        self,
        request_id: str,
        reason: str = "aborted by the scheduler",
        ranks: Iterable[int] | None = None,
        instance: int = 0,
    ) -> None:
        """Abort an instance on ``ranks`` (default: every rank). An abort may come before the cache_info."""
        msg = Abort(request_id, reason, instance)
        for rank in range(self.world_size) if ranks is None else ranks:
            self.channels[rank].send(msg)

    def collect(self, timeout_s: float = 0.0) -> list[PrefillOutcome]:
        """Take in results; return the outcomes that became decided (every rank reported, or one refused)."""
        decided, self._early = self._early, []
        for rank, msg in self.backlog + self.poll(timeout_s):
            if isinstance(msg, TransferResult):
                out = self.ledger.entry(msg.key)
                if rank in out.results:
                    out.duplicates.append(msg)
                    self.ledger.anomalies.append(f"rank {rank} reported {msg.request_id} instance {msg.instance} twice")
                    continue
                out.results[rank] = msg
                if rank in out.gone:
                    # a cache_info still queued when the connection closed reached the restarted
                    # daemon, which served it: the outcome was decided without it, and stays so
                    self.ledger.anomalies.append(
                        f"rank {rank} reported {msg.request_id} instance {msg.instance} ({msg.status.value}) "
                        "after its connection closed: a new daemon there served it"
                    )
                if out.decided and self.ledger.settle(msg.key):
                    decided.append(out)
            elif isinstance(msg, Error):
                self.errors.append((rank, msg))
            elif isinstance(msg, Gone):
                decided += self._gone(rank, msg.endpoint)
        self.backlog = []
        return decided + self._settle_unsure(time.monotonic())

    def _settle_unsure(self, now: float) -> list[PrefillOutcome]:
        """Instances sent to a rank whose connection was closed: it connected again (it will
        report), or the grace passed and it counts as gone for them."""
        decided = []
        for key, ranks in list(self._unsure.items()):
            out = self.ledger.get(key)
            for rank, since in list(ranks.items()):
                if out is None or rank not in self.gone or rank in out.results:
                    del ranks[rank]
                elif now - since >= GONE_GRACE_S:
                    del ranks[rank]
                    out.gone[rank] = _gone_text(rank, self.channels[rank].endpoint, "when the cache_info was sent")
            if not ranks:
                del self._unsure[key]
            if out is not None and out.decided and self.ledger.settle(key):
                decided.append(out)
        return decided

    def _gone(self, rank: int, endpoint: str) -> list[PrefillOutcome]:
        """Rank ``rank``'s connection closed: the open instances sent to it that it never reported
        on will not be (its process ended, or a new one does not know them); end them here."""
        why = _gone_text(rank, endpoint, "before reporting")
        decided = []
        for key, out in list(self.ledger.open.items()):
            if rank in out.sent and rank not in out.results and rank not in out.gone:
                out.gone[rank] = why
                if out.decided and self.ledger.settle(key):
                    decided.append(out)
        return decided

    def outcome(self, request_id: str, instance: int = 0) -> PrefillOutcome | None:
        """What is known of an instance so far (None if nothing, or no longer kept)."""
        return self.ledger.get((request_id, instance))

    def wait(self, request_id: str, timeout_s: float, instance: int = 0) -> PrefillOutcome:
        """Block until the instance is decided: every rank reported, or a rank refused it.

        Raises DaemonError naming the silent ranks when ``timeout_s`` passes first.
        """
        key = (request_id, instance)
        deadline = time.monotonic() + timeout_s
        while True:
            out = self.ledger.get(key)
            if out is not None and out.decided:
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(self.world_size)) - set(out.results if out else ()))
                raise DaemonError(
                    f"ranks {missing} did not report request {request_id} instance {instance} within {timeout_s:g}s"
                )
            self.collect(min(left, 0.5))


class DecodeEngine(_Group):
    """The decode engine: registers each rank's cache and learns when each request's KV is in."""

    def __init__(self, endpoints: Sequence[str], *, credentials: Credentials, send_timeout_s: float = 5.0) -> None:
        super().__init__(endpoints, credentials=credentials, send_timeout_s=send_timeout_s)
        world = len(self.channels)
        self.ledger: _Ledger[DecodeOutcome] = _Ledger(lambda k: DecodeOutcome(k[0], k[1], world))
        self.errors: deque[tuple[int, Error]] = deque(maxlen=MAX_EVENTS)
        #: each rank's current cache registration, as its daemon named it ("" before the first):
        #: what a CacheInfo's ``dst_generations`` carries for blocks reserved now
        self.generations: list[str] = [""] * world

    @property
    def anomalies(self) -> deque[str]:
        """Second notices from one decode rank, notices for instances no longer kept: reported here."""
        return self.ledger.anomalies

    def register(self, caches: Sequence[HostKVCache | RegisterCache], timeout_s: float = 10.0) -> None:
        if len(caches) != len(self.channels):
            raise ValueError(f"{len(caches)} caches for {len(self.channels)} decode ranks")
        for rank, cache in enumerate(caches):
            self.channels[rank].send(_registration(cache))
        for rank in range(len(caches)):
            self.generations[rank] = self._expect(rank, Ack, timeout_s, "cache registration").generation

    def register_rank(self, rank: int, cache: HostKVCache | RegisterCache, timeout_s: float = 10.0) -> None:
        """Register one rank's cache again (its daemon restarted, or its cache is new); notices
        that come meanwhile are kept for ``collect``. Blocks reserved from now on are reserved
        in the new registration (``generations[rank]``)."""
        self.channels[rank].send(_registration(cache))
        self.generations[rank] = self._expect(rank, Ack, timeout_s, "cache registration").generation

    def collect(self, timeout_s: float = 0.0) -> list[DecodeOutcome]:
        """Take in notices; return each outcome that heard something new, once per call."""
        changed: dict[Key, DecodeOutcome] = {}
        for rank, msg in self.backlog + self.poll(timeout_s):
            if isinstance(msg, (KVReady, TransferResult)):
                out = self.ledger.entry(msg.key)
                if rank in out.reported:
                    out.duplicates.append(msg)
                    self.ledger.anomalies.append(
                        f"decode rank {rank} reported {msg.request_id} instance {msg.instance} twice"
                    )
                    continue
                out.reported.add(rank)
                if isinstance(msg, KVReady):
                    out.statuses[rank] = Status.OK
                else:
                    out.statuses[rank] = msg.status
                    out.reasons[rank] = f"{msg.status.value}: {msg.reason}"
                out.ready = out.reusable and all(st is Status.OK for st in out.statuses.values())
                if out.reusable:
                    self.ledger.settle(msg.key)
                changed[msg.key] = out
            elif isinstance(msg, Error):
                self.errors.append((rank, msg))
        self.backlog = []
        return list(changed.values())

    def outcome(self, request_id: str, instance: int = 0) -> DecodeOutcome | None:
        """What is known of an instance so far (None if nothing, or no longer kept)."""
        return self.ledger.get((request_id, instance))

    def wait(self, request_id: str, timeout_s: float, instance: int = 0) -> DecodeOutcome:
        """Until the KV is ready (any rank's KVReady), or every decode rank reported a failure."""
        key = (request_id, instance)
        deadline = time.monotonic() + timeout_s
        while True:
            out = self.ledger.get(key)
            if out is not None and out.decided:
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonError(f"no word on request {request_id} instance {instance} within {timeout_s:g}s")
            self.collect(min(left, 0.5))


def _gone_text(rank: int, endpoint: str, when: str) -> str:
    return f"prefill rank {rank} at {endpoint} is gone (its connection closed) {when}"


def status(endpoint: str, timeout_s: float = 5.0, *, credentials: Credentials) -> StatusReply:
    """Ask one daemon (or, with the daemon keys, the barrier service) what it is doing."""
    ch = Channel(endpoint, credentials=credentials, send_timeout_s=timeout_s)
    try:
        ch.send(StatusQuery())
        reply = ch.recv(timeout_s)
    finally:
        ch.close()
    if not isinstance(reply, StatusReply):
        raise DaemonError(f"no status from {endpoint} within {timeout_s:g}s" if reply is None else f"{reply}")
    return reply
