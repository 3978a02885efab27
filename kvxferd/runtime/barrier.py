"""``kvxferd barrier``: the barrier service of one or more TP groups (a ZMQ ROUTER).

A thin shell over :class:`kvxferd.core.BarrierState`: frames in, effects out.
Ranks connect with identity ``group:rank``; verdicts are addressed by it.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from kvxferd.config import Config
from kvxferd.core import BarrierEffect, BarrierState, Problem, ToRank
from kvxferd.core.barrier import ALIVE_BEATS
from kvxferd.protocol import (
    Admit,
    Admitted,
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
    encode,
)
from kvxferd.protocol.fields import clip
from kvxferd.runtime.guard import guarded
from kvxferd.runtime.journal import Journal
from kvxferd.runtime.service import Service
from kvxferd.security import credentials

log = logging.getLogger(__name__)


class BarrierService(Service):
    role = "barrier"

    def __init__(self, config: Config) -> None:
        super().__init__(
            shutdown_s=config.timeouts.shutdown_s,
            max_frame=config.limits.max_frame_bytes,
            queue=config.limits.queue_messages,
            creds=credentials(config, "daemon"),
            max_connections=max(config.limits.max_connections, sum(g.world_size for g in config.groups) + 16),
        )
        self.config = config
        state = BarrierState(
            timeout_s=config.barrier.timeout_s,
            max_keys=config.barrier.max_keys,
            max_wait_s=config.timeouts.startup_s,
            epoch=secrets.token_hex(6),  # this run of the service: a rank seeing another one announces again
            alive_s=ALIVE_BEATS * config.timeouts.heartbeat_s,
            max_alone=config.limits.max_requests,
            groups={g.name: g.world_size for g in config.groups},
            remember_s=config.timeouts.pending_s + config.timeouts.verdict_s,
            decode_of={
                name: g.name for g in config.groups if g.role == "decode" for name in (g.name, config.peer_template(g))
            },
            targets=config.targets(),
        )
        self.barrier = guarded(state, "barrier core")
        #: the words and verdicts of late, kept across a restart (see runtime.journal); a file holds
        #: about max_keys requests' words and verdicts (2 x world words and one verdict each)
        self.journal: Journal | None = None
        if config.barrier.journal:
            keep = config.barrier.max_keys * (1 + 2 * max((g.world_size for g in config.groups), default=1))
            self.journal = Journal(Path(config.expand(config.barrier.journal)), keep=keep)
        self.endpoint = ""
        self.verdicts = 0
        self.admissions = 0
        self.unreachable = 0  # messages for ranks that were not connected (down, or restarting)

    def start(self) -> None:
        self.endpoint = self.bind_router(self.config.barrier_endpoint(), "barrier")
        assert self.router is not None
        if self.journal is not None:  # (only once the endpoint is ours: a second service reads nothing)
            now = time.monotonic()
            found = self.journal.load(self.barrier.remember_s)
            recalled = sum(self.barrier.recall(entry, age, now) for entry, age in found)
            if recalled:
                log.info("recalled %d words and verdicts of the last %gs from %s", recalled, self.barrier.remember_s,
                         self.journal.path)  # fmt: skip
            try:
                self.journal.open()
            except OSError as exc:  # serving matters more: it only forgets its verdicts on a restart
                log.error("barrier journal %s cannot be written (%s): verdicts are not kept across a restart",
                          self.journal.path, exc)  # fmt: skip
        self.watch(self.router, self.on_router)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

    def ready_info(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint}

    def next_wakeup(self) -> float | None:
        if self.barrier.retelling:  # the next part now, once what waits on the sockets is read
            return time.monotonic()
        return self.barrier.next_deadline()

    def tick(self, now: float) -> None:
        self._apply(self.barrier.on_timer(now), None)

    def handle(self, identity: bytes, msg: Message, now: float) -> None:
        if isinstance(msg, StatusQuery):
            report = {
                "sizes": self.barrier.sizes(),
                "stopped": self.barrier.stopped(),
                "verdicts": self.verdicts,
                "admissions": self.admissions,
                "unreachable": self.unreachable,
            }
            self.reply(identity, StatusReply(self.role, "", 0, self.state, json.dumps(report)))
            return
        if isinstance(msg, (Hello, Admit, Arrive, Withdraw)):
            claimed = f"{msg.group}:{msg.rank}".encode()
            if identity != claimed:
                detail = f"a rank must connect with identity {claimed!r} to speak for it, not {identity!r}"
                self.reply(identity, Error(ErrorCode.BAD_MESSAGE, detail))
                return
            if isinstance(msg, Hello) and not msg.serving:
                log.info("group %r rank %d of %d is up", msg.group, msg.rank, msg.world_size)
        self._apply(self.barrier.handle(msg, now), identity)

    def _apply(self, effects: list[BarrierEffect], sender: bytes | None) -> None:
        frames: dict[int, tuple[Message, bytes]] = {}  # a verdict is encoded once: journal, every rank

        def frame(msg: Message) -> bytes:
            known = frames.get(id(msg))
            if known is None:
                known = frames[id(msg)] = (msg, encode(msg))  # (the message kept: its id stays its own)
            return known[1]

        taken = self.barrier.take_journal()
        if taken and self.journal is not None:  # written before anything they caused is sent
            self.journal.append(taken, encoded=frame)
        logged: set[int] = set()  # each failed verdict once, not once per rank it goes to
        for eff in effects:
            if isinstance(eff, ToRank):
                if isinstance(eff.message, (Release, Diverged, Expired)):
                    self.verdicts += 1
                    if not isinstance(eff.message, Release) and id(eff.message) not in logged:
                        logged.add(id(eff.message))
                        log.info("%s", eff.message)
                elif isinstance(eff.message, Admitted):
                    self.admissions += 1
                # a rank that is down is not reachable: counted (status), not logged per message
                if not self.reply(
                    f"{eff.group}:{eff.rank}".encode(), eff.message, quiet=True, frame=frame(eff.message)
                ):
                    self.unreachable += 1
            elif isinstance(eff, Problem):
                log.warning("%s: %s", eff.code.value, eff.detail)
                if sender is not None and eff.reply:
                    self.reply(sender, Error(eff.code, clip(eff.detail), eff.ref))
