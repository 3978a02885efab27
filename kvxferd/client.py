"""The engine side: what a prefill worker, a prefill scheduler and a decode engine call.

Each class holds one DEALER per daemon rank it talks to. Sends never block
longer than ``send_timeout_s``; every wait takes a timeout. Errors the daemon
sends back (an :class:`~kvxferd.protocol.Error`) are raised as
:class:`~kvxferd.errors.DaemonError` where a call waits for a reply, and are
returned as events by ``poll`` otherwise.

Example, for a 2-rank prefill group and a 2-rank decode group::

    shape = KVShape.from_config(config, world_size=2)
    # decode engine: register each rank's cache, then wait for requests
    decode = DecodeEngine([config.endpoint(dgroup, r) for r in range(2)])
    dcaches = [HostKVCache.create(shape) for _ in range(2)]
    decode.register(dcaches)
    # prefill model worker of rank r (one per rank, in the worker process)
    worker = PrefillWorker(config.endpoint(pgroup, r))
    worker.register(HostKVCache.create(shape))
    # prefill scheduler: one CacheInfo per request, to every rank
    sched = PrefillScheduler([config.endpoint(pgroup, r) for r in range(2)])
    sched.submit(CacheInfo("req-1", slot=3, step=17, num_tokens=200, src_blocks=src,
                           dst_blocks=dst, peer=config.peer_template(dgroup)))
    # ... the worker runs step 17: worker.layer_ready(17, 0, [SlotChunk(3, 0, 200, 17)]), then layers 1..L-1
    sched.wait("req-1", timeout_s=30)        # {rank: TransferResult}
    decode.wait("req-1", timeout_s=30)       # DecodeOutcome(ready=True, ...)
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from kvxferd.errors import DaemonError, RemoteProtocolError
from kvxferd.protocol import (
    DEFAULT_MAX_FRAME,
    Abort,
    Ack,
    CacheInfo,
    Error,
    ErrorCode,
    KVReady,
    LayerSignal,
    Message,
    RegisterCache,
    SlotChunk,
    Status,
    StatusQuery,
    StatusReply,
    TransferResult,
    decode,
    encode,
)
from kvxferd.runtime import sockets

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from kvxferd.kvcache import HostKVCache

Event = tuple[int, Message]  # (rank, message)


class Channel:
    """A DEALER to one daemon, speaking protocol messages."""

    def __init__(
        self,
        endpoint: str,
        *,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        send_timeout_s: float = 5.0,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.endpoint = endpoint
        self.max_frame = max_frame
        self._own_ctx = ctx is None
        self.ctx = ctx if ctx is not None else zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, sockets.LINGER_MS)
        self.sock.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
        self.sock.setsockopt(zmq.SNDHWM, sockets.HWM)
        self.sock.setsockopt(zmq.RCVHWM, sockets.HWM)
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
        try:
            frame = self.sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None
        try:
            return decode(frame, max_bytes=self.max_frame)
        except RemoteProtocolError as exc:
            return Error(ErrorCode.BAD_MESSAGE, f"undecodable reply from {self.endpoint}: {exc}")

    def close(self) -> None:
        self.sock.close()
        if self._own_ctx:
            self.ctx.term()


class _Group:
    """Channels to every rank of one daemon group, polled together."""

    def __init__(self, endpoints: Sequence[str], *, send_timeout_s: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.channels = [Channel(e, ctx=self.ctx, send_timeout_s=send_timeout_s) for e in endpoints]
        self.poller = zmq.Poller()
        self.backlog: list[Event] = []  # messages taken while waiting for something else
        self._rank_of = {}
        for rank, ch in enumerate(self.channels):
            self.poller.register(ch.sock, zmq.POLLIN)
            self._rank_of[ch.sock] = rank

    def poll(self, timeout_s: float = 0.0) -> list[Event]:
        """Messages from any rank: wait up to ``timeout_s`` for the first, then take what is there."""
        events: list[Event] = []
        for sock, _ in self.poller.poll(max(0, int(timeout_s * 1000))):
            rank = self._rank_of[sock]
            ch = self.channels[rank]
            while (msg := ch.recv_now()) is not None:
                events.append((rank, msg))
        return events

    def _expect(self, rank: int, want: type[Message], timeout_s: float, what: str) -> Message:
        """Wait for a ``want`` reply from ``rank``; other messages are kept for :meth:`poll` callers."""
        deadline = time.monotonic() + timeout_s
        ch = self.channels[rank]
        while (left := deadline - time.monotonic()) > 0:
            msg = ch.recv(left)
            if msg is None:
                break
            if isinstance(msg, want):
                return msg
            if isinstance(msg, Error):
                raise DaemonError(f"{what} refused by {ch.endpoint}: {msg.detail}")
            self.backlog.append((rank, msg))
        raise DaemonError(f"no answer to {what} from {ch.endpoint} within {timeout_s:g}s (is the daemon running?)")

    def close(self) -> None:
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

    def __init__(self, endpoint: str, *, send_timeout_s: float = 5.0) -> None:
        super().__init__([endpoint], send_timeout_s=send_timeout_s)

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


@dataclass
class PrefillOutcome:
    request_id: str
    results: dict[int, TransferResult] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.status is Status.OK for r in self.results.values())


class PrefillScheduler(_Group):
    """The prefill scheduler: cache_info and aborts to every rank, results from every rank."""

    def __init__(self, endpoints: Sequence[str], *, send_timeout_s: float = 5.0) -> None:
        super().__init__(endpoints, send_timeout_s=send_timeout_s)
        self.results: dict[str, dict[int, TransferResult]] = defaultdict(dict)
        self.errors: list[tuple[int, Error]] = []

    @property
    def world_size(self) -> int:
        return len(self.channels)

    def submit(self, info: CacheInfo, ranks: Iterable[int] | None = None) -> None:
        """Send ``info`` to ``ranks`` (default: every rank; each rank must get it once)."""
        for rank in range(self.world_size) if ranks is None else ranks:
            self.channels[rank].send(info)

    def abort(self, request_id: str, reason: str = "aborted by the scheduler") -> None:
        for ch in self.channels:
            ch.send(Abort(request_id, reason))

    def collect(self, timeout_s: float = 0.0) -> list[str]:
        """Take in results; return the ids of requests every rank has now reported."""
        finished = []
        for rank, msg in self.backlog + self.poll(timeout_s):
            if isinstance(msg, TransferResult):
                got = self.results[msg.request_id]
                got[rank] = msg
                if len(got) == self.world_size:
                    finished.append(msg.request_id)
            elif isinstance(msg, Error):
                self.errors.append((rank, msg))
        self.backlog = []
        return finished

    def wait(self, request_id: str, timeout_s: float) -> PrefillOutcome:
        """Block until every rank reported ``request_id``; raises DaemonError naming the silent ranks."""
        deadline = time.monotonic() + timeout_s
        while len(self.results.get(request_id, {})) < self.world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(self.world_size)) - set(self.results.get(request_id, {})))
                raise DaemonError(f"ranks {missing} did not report request {request_id} within {timeout_s:g}s")
            self.collect(min(left, 0.5))
        return PrefillOutcome(request_id, self.results.pop(request_id))


@dataclass
class DecodeOutcome:
    """What the decode side knows of a request.

    ``ready``: the KV is complete on every rank. ``reasons``: per rank, why it
    failed. ``reusable``: every decode rank reported the end, so no prefill
    rank writes into the request's blocks any more.
    """

    request_id: str
    ready: bool = False
    reasons: dict[int, str] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)
    reusable: bool = False


class DecodeEngine(_Group):
    """The decode engine: registers each rank's cache and learns when each request's KV is in."""

    def __init__(self, endpoints: Sequence[str], *, send_timeout_s: float = 5.0) -> None:
        super().__init__(endpoints, send_timeout_s=send_timeout_s)
        self.outcomes: dict[str, DecodeOutcome] = {}
        self.errors: list[tuple[int, Error]] = []

    def register(self, caches: Sequence[HostKVCache | RegisterCache], timeout_s: float = 10.0) -> None:
        if len(caches) != len(self.channels):
            raise ValueError(f"{len(caches)} caches for {len(self.channels)} decode ranks")
        for rank, cache in enumerate(caches):
            self.channels[rank].send(_registration(cache))
        for rank in range(len(caches)):
            self._expect(rank, Ack, timeout_s, "cache registration")

    def collect(self, timeout_s: float = 0.0) -> list[tuple[str, DecodeOutcome]]:
        """Take in notices; return (request id, outcome) once per request that heard something new."""
        changed: dict[str, DecodeOutcome] = {}
        for rank, msg in self.backlog + self.poll(timeout_s):
            if isinstance(msg, (KVReady, TransferResult)):
                out = self.outcomes.setdefault(msg.request_id, DecodeOutcome(msg.request_id))
                out.reported.add(rank)
                if isinstance(msg, KVReady):
                    out.ready = True
                else:
                    out.reasons[rank] = f"{msg.status.value}: {msg.reason}"
                out.reusable = len(out.reported) == len(self.channels)
                changed[msg.request_id] = out
            elif isinstance(msg, Error):
                self.errors.append((rank, msg))
        self.backlog = []
        return list(changed.items())

    def wait(self, request_id: str, timeout_s: float) -> DecodeOutcome:
        """Until the KV is ready (any rank's KVReady), or every rank reported a failure."""
        deadline = time.monotonic() + timeout_s
        while True:
            out = self.outcomes.get(request_id)
            if out is not None and (out.ready or out.reusable):
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonError(f"no word on request {request_id} within {timeout_s:g}s")
            self.collect(min(left, 0.5))

    def forget(self, request_id: str) -> None:
        self.outcomes.pop(request_id, None)


def status(endpoint: str, timeout_s: float = 5.0) -> StatusReply:
    """Ask one daemon (or the barrier service) what it is doing."""
    ch = Channel(endpoint, send_timeout_s=timeout_s)
    try:
        ch.send(StatusQuery())
        reply = ch.recv(timeout_s)
    finally:
        ch.close()
    if not isinstance(reply, StatusReply):
        raise DaemonError(f"no status from {endpoint} within {timeout_s:g}s" if reply is None else f"{reply}")
    return reply
