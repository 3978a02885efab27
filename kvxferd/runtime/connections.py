"""How many connections a daemon's server sockets hold, all together, and the gate that keeps
that number bounded (``limits.max_connections``).

ZMQ bounds each connection's receive queue in messages (``limits.queue_messages``),
so the bytes a daemon can be made to hold grow with its connections: the bound
for all of them together is ``max_connections x queue_messages x
max_frame_bytes``. The count is kept from the server sockets' monitors:
connections accepted and not yet closed, by file descriptor (ZMQ names no
descriptor in its handshake events, so one still in its handshake counts too;
a handshake left unfinished is dropped after ``HANDSHAKE_S``). The CURVE
handshake's ZAP check (run in the authenticator's thread) asks
:meth:`Connections.admit`, which refuses a client once the connections
counted, with the approvals the monitors have not reported done yet, reach
``limit``: the clients that passed their handshake and are still connected are
never more than ``limit`` (one fewer when the loop had already counted the one
asking: the gate cannot tell, and errs on the side of the bound). A refused client's connection is closed by ZMQ
before any of its messages is queued; ZMQ tries it again later by itself.
"""

from __future__ import annotations

import logging
import threading

import zmq

log = logging.getLogger(__name__)

#: the monitor events the count is kept from
EVENTS = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
#: how long a server waits for a connection's handshake (ZMQ_HANDSHAKE_IVL) before dropping it
HANDSHAKE_S = 5.0


class Connections:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._live: set[tuple[int, int]] = set()  # (server socket, file descriptor) accepted, not closed
        self._approved = 0  # handshakes the gate let through that the monitors have not reported done
        self.refused = 0

    def admit(self) -> bool:
        """A client's handshake asks to complete (the ZAP thread): False once the daemon is full."""
        with self._lock:
            # the one asking may or may not be counted yet (its ACCEPTED event is read by the main
            # loop, this runs in the ZAP thread): taken as not counted, so never one too many
            if len(self._live) + self._approved >= self.limit:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log.warning(
                        "refused a connection: %d held (limits.max_connections); %d refused", self.limit, self.refused
                    )
                return False
            self._approved += 1
            return True

    def event(self, sock: int, event: int, fd: int) -> None:
        """A monitor event of server socket ``sock`` about connection ``fd``."""
        with self._lock:
            if event == zmq.EVENT_ACCEPTED:
                self._live.add((sock, fd))
            elif event == zmq.EVENT_DISCONNECTED:
                self._live.discard((sock, fd))
            elif event & (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH):
                self._approved = max(0, self._approved - 1)

    def __len__(self) -> int:
        return len(self._live)
