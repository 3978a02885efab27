"""ZMQ plumbing shared by the daemons and the clients: sockets, bind, and the one receive path.

Every socket gets an explicit linger, a largest message (``MAXMSGSIZE``: a
bigger one drops the connection before any byte of it is kept) and a receive
queue bound in messages derived from a byte budget
(:attr:`LimitsConfig.queue_messages`: ZMQ counts messages, so the bound in
bytes is that count times the largest frame). Deployment sockets run CURVE
(:mod:`kvxferd.security`).

``bind`` creates the directory of an ``ipc://`` endpoint (mode 700), removes
a stale socket file, and returns the endpoint the socket really bound.

:func:`receive` is the only place frames are read and decoded, for every
socket kind: a bounded batch, each frame decoded (the codec's bounds apply)
into an :class:`Inbound` that holds either the message or why it was refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq

from kvxferd.errors import DaemonError, RemoteProtocolError
from kvxferd.protocol import DEFAULT_MAX_FRAME, Message, decode, encode
from kvxferd.protocol.fields import clip

LINGER_MS = 500
#: Messages queued per connection by default (clients; daemons derive theirs from the config).
HWM = 100_000
#: Most messages drained from one socket per poll wake-up, so no socket starves another.
BATCH = 256


@dataclass(frozen=True, slots=True)
class Inbound:
    """One frame read off a socket: the message, or ``error`` saying why it is not one."""

    identity: bytes | None  # the ROUTER's name for the sender; None on a DEALER
    msg: Message | None
    error: str = ""


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
    if path is not None:
        os.chmod(path, 0o600)
    real: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return real


def socket(
    ctx: zmq.Context[zmq.Socket[bytes]], kind: int, *, max_frame: int = DEFAULT_MAX_FRAME, queue: int = HWM
) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
    sock.setsockopt(zmq.SNDHWM, HWM)  # what we send is ours, small, and must not be dropped
    sock.setsockopt(zmq.RCVHWM, queue)  # what others send is bounded: queue x max_frame bytes
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown identity raises instead of dropping silently
    return sock


def send(sock: zmq.Socket[bytes], msg: Message, identity: bytes | None = None) -> None:
    frame = encode(msg)
    if identity is None:
        sock.send(frame, zmq.NOBLOCK)
    else:
        sock.send_multipart([identity, frame], zmq.NOBLOCK)


def receive(sock: zmq.Socket[bytes], *, max_frame: int, router: bool, limit: int = BATCH) -> list[Inbound]:
    """Up to ``limit`` frames waiting on ``sock``, each decoded or refused. Never blocks, never raises
    for what a peer sent."""
    out: list[Inbound] = []
    for _ in range(limit):
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        identity = parts[0] if router else None
        body = parts[1:] if router else parts
        if len(body) != 1:
            out.append(Inbound(identity, None, f"a message is one frame, got {len(body)}"))
            continue
        try:
            out.append(Inbound(identity, decode(body[0], max_bytes=max_frame)))
        except RemoteProtocolError as exc:
            out.append(Inbound(identity, None, clip(str(exc), 1024)))
    return out
