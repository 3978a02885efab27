"""ZMQ plumbing shared by the daemons and the clients: bind, connect, framing.

Every socket gets an explicit linger. ``bind`` creates the directory of an
``ipc://`` endpoint and returns the endpoint the socket really bound (useful
with ``tcp://127.0.0.1:*``). Frames carry one encoded protocol message; a
ROUTER sees ``[identity, frame]``.
"""

from __future__ import annotations

from pathlib import Path

import zmq

from kvxferd.errors import DaemonError
from kvxferd.protocol import DEFAULT_MAX_FRAME, Message, encode

LINGER_MS = 500
#: Messages queued per socket before ZMQ pushes back; a step's signals and results fit many times over.
HWM = 100_000
#: Most messages drained from one socket per poll wake-up, so no socket starves another.
BATCH = 256


def bind(sock: zmq.Socket[bytes], endpoint: str) -> str:
    path = Path(endpoint[len("ipc://") :]) if endpoint.startswith("ipc://") else None
    if path is not None:
        if len(str(path)) > 100:
            raise DaemonError(f"ipc path {path} is too long for a unix socket (keep run_dir short)")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            path.unlink()  # a stale socket file from a daemon that died; binding fails loudly otherwise
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise DaemonError(f"cannot bind {endpoint}: {exc}") from None
    real: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return real


def socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int, *, max_frame: int = DEFAULT_MAX_FRAME) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown identity raises instead of dropping silently
    return sock


def send(sock: zmq.Socket[bytes], msg: Message, identity: bytes | None = None) -> None:
    frame = encode(msg)
    if identity is None:
        sock.send(frame, zmq.NOBLOCK)
    else:
        sock.send_multipart([identity, frame], zmq.NOBLOCK)
