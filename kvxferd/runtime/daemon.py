"""What prefill and decode daemons share: their place in a group and how they start.

A group daemon binds its rank's engine endpoint, connects to the group's
barrier service and passes the start-up barrier (every rank of the group up,
with the same config) before it polls anything: engines may connect and
send early, their messages simply wait in the socket until the group serves.

Once serving, a rank says Hello every ``timeouts.heartbeat_s`` (with its
config's fingerprint): the service knows the group runs, so a rank restarted
later joins it, and the Ack tells the rank when the service itself restarted
(``on_barrier_restart``: a prefill rank announces its open words again).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import zmq

from kvxferd.config import Config, GroupConfig
from kvxferd.errors import DaemonError, TransportError
from kvxferd.protocol import STARTUP_KEY, Ack, CacheLayout, Error, ErrorCode, Message, RegisterCache
from kvxferd.runtime.barrier_link import BarrierLink
from kvxferd.runtime.service import STALL_S, Service
from kvxferd.security import credentials
from kvxferd.shm import Segment

log = logging.getLogger(__name__)


class GroupDaemon(Service):
    def __init__(self, config: Config, group: GroupConfig, rank: int) -> None:
        super().__init__(
            shutdown_s=config.timeouts.shutdown_s,
            max_frame=config.limits.max_frame_bytes,
            queue=config.limits.queue_messages,
            creds=credentials(config, "daemon"),
            max_connections=config.limits.max_connections,
        )
        self.config, self.group, self.rank = config, group, rank
        self.counters: Counter[str] = Counter()
        self.endpoint = ""
        kv = config.kv
        #: what the engine's cache must look like on this rank
        self.layout = CacheLayout(kv.num_layers, kv.num_blocks, kv.block_bytes(group.world_size), kv.planes, kv.order)
        self.heartbeat_s = config.timeouts.heartbeat_s
        self._next_beat: float | None = None  # set once serving

    def start(self) -> None:
        self.endpoint = self.bind_router(self.config.endpoint(self.group, self.rank))
        endpoint = self.config.barrier_endpoint()
        try:
            sock = self.client_socket(endpoint, BarrierLink.identity(self.group.name, self.rank))
        except zmq.ZMQError as exc:
            raise DaemonError(f"cannot connect to the barrier service at {endpoint}: {exc}") from None
        self.barrier = BarrierLink(
            sock,
            endpoint,
            group=self.group.name,
            rank=self.rank,
            world_size=self.group.world_size,
            role=self.role,
            max_frame=self.max_frame,
            keep_s=self.config.timeouts.verdict_s,
        )
        self.own(self.barrier.sock)
        self.barrier.startup(
            self.config.fingerprint(), self.config.timeouts.startup_s, lambda: self._stop_signal is not None
        )
        assert self.router is not None
        self.watch(self.router, self.on_router)
        self.watch(self.barrier.sock, self.on_barrier)
        self._next_beat = time.monotonic()
        if self.barrier.backlog:  # sent behind our start-up verdict, or kept while a decode rank started
            self.on_barrier()

    def next_wakeup(self) -> float | None:
        if self._next_beat is None:  # not serving yet (no barrier link before that)
            return None
        retry = self.barrier.unsent.next_deadline()
        return self._next_beat if retry is None else min(retry, self._next_beat)

    def tick(self, now: float) -> None:
        if self._next_beat is not None:
            self.barrier.retry(now)
        if self._next_beat is not None and now >= self._next_beat:
            self.barrier.hello()
            self._next_beat = now + self.heartbeat_s

    def on_stall(self, late_s: float) -> None:
        """Back from a stop: the heartbeat goes now, before the backlog is read (the barrier takes
        a rank it has not heard from for 3 heartbeats as stopped, and ends its rounds at once)."""
        if late_s > STALL_S and self._next_beat is not None:
            self.barrier.hello()
            self._next_beat = time.monotonic() + self.heartbeat_s

    def on_barrier(self) -> None:
        """Messages from the barrier service after start-up."""
        now = time.monotonic()
        for msg in self.barrier.recv_ready():
            self.from_barrier(msg, now)

    def from_barrier(self, msg: Message, now: float) -> None:
        """What every group daemon does with a barrier message (prefill adds verdicts)."""
        if isinstance(msg, Ack):
            if self.barrier.acked(msg):
                log.warning("the barrier service restarted (run %s): announcing this rank's open words again", msg.ref)
                self.on_barrier_restart(now)
        elif isinstance(msg, Error):
            log.error("the barrier service refused a message about %r: %s", msg.ref, msg.detail)
            if msg.code is ErrorCode.NOT_REGISTERED:
                self.barrier.hello()  # the service restarted and does not know us yet; its Ack says so
        elif getattr(msg, "key", None) == STARTUP_KEY:
            pass  # the start-up barrier of ranks starting now (or a joiner's) is not ours: we serve
        else:
            log.warning("unexpected %s from the barrier service", type(msg).__name__)

    def on_barrier_restart(self, now: float) -> None:
        """The barrier service lost its tables: say again what it must know."""

    def registration_problem(self, msg: RegisterCache) -> str | None:
        """Why an engine's cache registration does not fit this daemon's config, if it does not."""
        if msg.memory != self.group.memory:
            return f"group {self.group.name!r} keeps its cache in {self.group.memory} memory, not {msg.memory}"
        if msg.layout.unpadded() != self.layout:  # (padding between blocks is the engine's own)
            return f"the engine's cache is {msg.layout}, the config describes {self.layout}"
        return check_segments(msg)

    def ready_info(self) -> dict[str, Any]:
        return {"group": self.group.name, "rank": self.rank, "endpoint": self.endpoint}


def check_segments(msg: RegisterCache) -> str | None:
    """For host memory: every segment is a regular file of this daemon's uid, large enough for
    its regions (see :meth:`kvxferd.shm.Segment.attach`). Prefill and decode check alike."""
    if msg.memory != "host":
        return None
    need: dict[str, int] = {}
    for region in msg.regions:
        if not isinstance(region.handle, str):
            return f"host-memory region of layer {region.layer} must name a shared-memory segment"
        need[region.handle] = max(need.get(region.handle, 0), region.offset + msg.layout.region_bytes)
    for name, size in need.items():
        try:
            Segment.attach(name, min_size=size, writable=False, populate=False).close()
        except TransportError as exc:
            return str(exc)
    return None
