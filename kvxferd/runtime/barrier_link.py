"""A daemon's connection to its group's barrier service.

The DEALER's identity is ``group:rank``, so the service can address any rank
without having heard from it. ``startup`` is the blocking named barrier every
group passes before serving: each rank arrives at key ``ready`` with the
fingerprint of its config as digest, so a group whose ranks run different
configs refuses to start and says which rank differs. A rank that starts while
its group serves passes it at once (the service knows the live ranks by their
heartbeats: the daemon sends :meth:`hello` every ``heartbeat_s`` once serving).
``epoch`` is the service run the last Ack named: a new one means the service
restarted and lost its tables. What the service sends behind the answer a wait
is for (a joiner's remembered verdicts), and, to a decode rank, verdicts sent
while it waits (what the service told its predecessor, told again from its
Hello on), are kept for the next :meth:`recv_ready`.
A word the socket refuses (its queue to the service is full) is kept and sent
again from :meth:`retry` (a repeated word is harmless to the service); one
given up after ``keep_s`` is logged, and its request ends on its own deadline.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import zmq

from kvxferd.core.agreement import VERDICTS
from kvxferd.errors import DaemonError
from kvxferd.protocol import STARTUP_KEY, Ack, Arrive, Digest, Diverged, Error, Expired, Hello, Message, Release
from kvxferd.runtime import sockets
from kvxferd.runtime.outbox import Outbox

log = logging.getLogger(__name__)

GRACE_S = 2.0
RETRY_S = 0.2  # how often words the socket refused are tried again
MAX_UNSENT = 65536


class BarrierLink:
    def __init__(
        self,
        sock: zmq.Socket[bytes],
        endpoint: str,
        *,
        group: str,
        rank: int,
        world_size: int,
        role: str,
        max_frame: int,
        keep_s: float = 30.0,
    ) -> None:
        """``sock``: a DEALER named ``identity(group, rank)``, connected to ``endpoint``."""
        self.endpoint = endpoint
        self.group, self.rank, self.world_size, self.role = group, rank, world_size, role
        self.max_frame = max_frame
        self.sock = sock
        self.epoch: str | None = None  # the service run that answered our last Hello
        self.last_sent = time.monotonic()  # when this rank last said anything to the service
        self.backlog: list[Message] = []  # read by a wait, behind the message it waited for
        self.serving = ""  # our config's fingerprint once we serve (sent with every heartbeat)
        self.unsent: Outbox[Message, Message] = Outbox(limit=MAX_UNSENT, retry_s=RETRY_S, keep_s=keep_s)
        #: called with the silence's length right after a word ends a silence of at least
        #: ``silence_s`` (the service may have counted this rank stopped meanwhile)
        self.on_silence: Callable[[float], None] | None = None
        self.silence_s = math.inf

    @staticmethod
    def identity(group: str, rank: int) -> str:
        return f"{group}:{rank}"

    def send(self, msg: Message) -> None:
        if not self._try(msg) and not isinstance(msg, Hello):  # (a heartbeat goes again anyway)
            log.warning("barrier service %s is not keeping up; %s kept to send again", self.endpoint, msg)
            self._lost(self.unsent.hold(msg, None, msg, time.monotonic()))

    def _try(self, msg: Message) -> bool:
        try:
            sockets.send(self.sock, msg)
        except zmq.Again:
            return False
        now = time.monotonic()
        silent_s, self.last_sent = now - self.last_sent, now  # the service heard this rank no earlier than now
        if silent_s >= self.silence_s and self.on_silence is not None:
            self.on_silence(silent_s)
        return True

    def retry(self, now: float) -> None:
        """Send the words the socket refused again (a no-op while none are kept)."""
        if self.unsent.next_deadline() is not None:
            self._lost(self.unsent.retry(now, lambda _, msg: self._try(msg)))

    def _lost(self, words: list[Message]) -> None:
        for msg in words:
            log.error(
                "gave up sending %s to the barrier service %s; its request ends on its deadline", msg, self.endpoint
            )

    def hello(self) -> None:
        self.send(Hello(self.group, self.rank, self.world_size, self.role, self.serving))

    def acked(self, ack: Ack) -> bool:
        """Note the service run an Ack of a Hello names; True if it is a new run (a restart)."""
        word, _, epoch = ack.ref.partition(" ")
        if word != "hello" or not epoch:
            return False
        new = self.epoch is not None and epoch != self.epoch
        self.epoch = epoch
        return new

    def recv_ready(self) -> list[Message]:
        """The backlog, then every message waiting on the socket (bad frames are logged and skipped)."""
        out, self.backlog = self.backlog, []
        for inbound in sockets.receive(self.sock, max_frame=self.max_frame, router=False):
            if inbound.msg is None:
                log.error("bad frame from the barrier service: %s", inbound.error)
            else:
                out.append(inbound.msg)
        return out

    def startup(self, fingerprint: str, timeout_s: float, stopping: Callable[[], bool]) -> None:
        """Block until every rank of the group is up with the same config, or raise DaemonError."""
        # Wait a little past the key's own timeout, so the service's verdict (which names the
        # missing ranks) arrives before our own deadline.
        deadline = time.monotonic() + timeout_s + GRACE_S
        self.hello()
        ack = self._wait(lambda m: isinstance(m, Ack), deadline, stopping, "the barrier service to answer Hello")
        assert isinstance(ack, Ack)
        self.acked(ack)
        self.send(Arrive(self.group, STARTUP_KEY, 0, self.rank, Digest(0, 0, 0, fingerprint), timeout_s))
        verdict = self._wait(
            lambda m: isinstance(m, (Release, Diverged, Expired)) and m.key == STARTUP_KEY,
            deadline,
            stopping,
            f"all {self.world_size} ranks of group {self.group!r} to start",
        )
        if isinstance(verdict, Diverged):
            odd = [v.rank for v in verdict.views if v.digest is None or v.digest.fingerprint != fingerprint]
            raise DaemonError(
                f"ranks {odd} of group {self.group!r} run a different configuration than rank {self.rank}"
            )
        if isinstance(verdict, Expired):
            raise DaemonError(
                f"ranks {list(verdict.missing)} of group {self.group!r} did not start within {verdict.waited_s:.3g}s"
            )
        self.serving = fingerprint

    def _wait(
        self, want: Callable[[Message], bool], deadline: float, stopping: Callable[[], bool], what: str
    ) -> Message:
        kept: list[Message] = []  # (see below; they go back in front of the backlog on return)
        while True:
            if stopping():
                raise DaemonError(f"stopped while waiting for {what}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonError(f"timed out waiting for {what} at {self.endpoint}")
            if self.backlog or self.sock.poll(int(min(left, 0.2) * 1000), zmq.POLLIN):
                batch = self.recv_ready()
                for i, msg in enumerate(batch):
                    if isinstance(msg, Error):
                        raise DaemonError(f"the barrier service refused rank {self.rank}: {msg.detail}")
                    if want(msg):
                        self.backlog = kept + batch[i + 1 :]
                        return msg
                    if self.role == "decode" and isinstance(msg, VERDICTS) and msg.key != STARTUP_KEY:
                        # what the service told this decode rank's predecessor, said again to
                        # this new process from its Hello on: handed on once it serves
                        kept.append(msg)
                        continue
                    log.debug("ignoring %s while waiting for %s", type(msg).__name__, what)
