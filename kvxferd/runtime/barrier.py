"""``kvxferd barrier``: the barrier service of one or more TP groups (a ZMQ ROUTER).

A thin shell over :class:`kvxferd.core.BarrierState`: frames in, effects out.
Ranks connect with identity ``group:rank``; verdicts are addressed by it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import zmq

from kvxferd.config import Config
from kvxferd.core import BarrierState, Effect, Problem, ToRank
from kvxferd.errors import RemoteProtocolError
from kvxferd.protocol import (
    Arrive,
    Diverged,
    Error,
    ErrorCode,
    Expired,
    Hello,
    Message,
    Release,
    StatusQuery,
    StatusReply,
    Withdraw,
    decode,
)
from kvxferd.runtime import sockets
from kvxferd.runtime.logs import TRACE
from kvxferd.runtime.service import Service

log = logging.getLogger(__name__)


class BarrierService(Service):
    role = "barrier"

    def __init__(self, config: Config) -> None:
        super().__init__(shutdown_s=config.timeouts.shutdown_s)
        self.config = config
        self.barrier = BarrierState(timeout_s=config.barrier.timeout_s, max_keys=config.barrier.max_keys)
        self.max_frame = config.limits.max_frame_bytes
        self.endpoint = ""
        self.verdicts = 0

    def start(self) -> None:
        self.router = self.own(sockets.socket(self.ctx, zmq.ROUTER, max_frame=self.max_frame))
        self.endpoint = sockets.bind(self.router, self.config.barrier_endpoint())
        self.watch(self.router, self._on_router)

    def ready_info(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint}

    def next_wakeup(self) -> float | None:
        return self.barrier.next_deadline()

    def tick(self, now: float) -> None:
        self._apply(self.barrier.on_timer(now), None)

    def _on_router(self) -> None:
        for _ in range(sockets.BATCH):
            try:
                identity, frame = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                log.warning("dropped a message that was not [identity, frame]")
                continue
            try:
                msg = decode(frame, max_bytes=self.max_frame)
            except RemoteProtocolError as exc:
                log.warning("bad frame from %r: %s", identity, exc)
                self._reply(identity, Error(ErrorCode.BAD_MESSAGE, str(exc)))
                continue
            log.log(TRACE, "<- %r %s", identity, msg)
            self._handle(identity, msg)

    def _handle(self, identity: bytes, msg: Message) -> None:
        if isinstance(msg, StatusQuery):
            report = {"sizes": self.barrier.sizes(), "verdicts": self.verdicts}
            self._reply(identity, StatusReply(self.role, "", 0, self.state, json.dumps(report)))
            return
        if isinstance(msg, (Hello, Arrive, Withdraw)):
            claimed = f"{msg.group}:{msg.rank}".encode()
            if identity != claimed:
                detail = f"a rank must connect with identity {claimed!r} to speak for it, not {identity!r}"
                self._reply(identity, Error(ErrorCode.BAD_MESSAGE, detail))
                return
            if isinstance(msg, Hello):
                log.info("group %r rank %d of %d is up", msg.group, msg.rank, msg.world_size)
        self._apply(self.barrier.handle(msg, time.monotonic()), identity)

    def _apply(self, effects: list[Effect], sender: bytes | None) -> None:
        for eff in effects:
            if isinstance(eff, ToRank):
                if isinstance(eff.message, (Release, Diverged, Expired)):
                    self.verdicts += 1
                    if not isinstance(eff.message, Release):
                        log.warning("%s -> %s:%d", eff.message, eff.group, eff.rank)
                self._reply(f"{eff.group}:{eff.rank}".encode(), eff.message)
            elif isinstance(eff, Problem):
                log.warning("%s: %s", eff.code.value, eff.detail)
                if sender is not None and eff.reply:
                    self._reply(sender, Error(eff.code, eff.detail, eff.ref))

    def _reply(self, identity: bytes, msg: Message) -> None:
        try:
            sockets.send(self.router, msg, identity)
            log.log(TRACE, "-> %r %s", identity, msg)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that rank is not connected (yet / any more)
            log.warning("cannot reach %r (%s); dropped %s", identity, exc.strerror, type(msg).__name__)
