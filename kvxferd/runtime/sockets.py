"""ZMQ plumbing shared by the daemons and the clients: sockets, bind, and the one receive path.

Every socket gets an explicit linger, a largest message (a frame up to
``max_frame`` is read; one a little larger is read and refused with an Error
naming the limit; ZMQ's ``MAXMSGSIZE``, set :data:`ENVELOPE` bytes above it so
CURVE's own envelope never counts against a frame, drops the connection before
any byte of a much bigger one is kept) and a receive
queue bound in messages derived from a byte budget
(:attr:`LimitsConfig.queue_messages`: ZMQ counts messages, so the bound in
bytes is that count times the largest frame). Deployment sockets run CURVE
(:mod:`kvxferd.security`).

``bind`` creates the directory of an ``ipc://`` endpoint (mode 700), claims
the endpoint (:class:`Claim`: a second daemon for a live endpoint refuses to
start and names the running one; a dead one's socket file is replaced), and
returns the endpoint the socket really bound with the claim, released (the
socket file removed) when the daemon stops.

:func:`receive` is the only place frames are read and decoded, for every
socket kind: a bounded batch, each frame decoded (the codec's bounds apply)
into an :class:`Inbound` that holds either the message or why it was refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import zmq

from kvxferd.errors import DaemonError, RemoteProtocolError
from kvxferd.protocol import DEFAULT_MAX_FRAME, Message, decode, encode
from kvxferd.protocol.fields import clip

LINGER_MS = 500
#: Room above ``max_frame`` in ZMQ's own limit: CURVE's envelope (tens of bytes) must not turn a frame
#: within the documented limit into a dropped connection, and one just over it is refused in words.
ENVELOPE = 1024
#: Messages queued per connection by default (clients; daemons derive theirs from the config).
HWM = 100_000
#: Most messages drained from one socket per poll wake-up, so no socket starves another.
BATCH = 256
#: Most bytes of frames decoded from one socket per poll wake-up: what decoding costs is bounded per
#: frame (counts checked before items are built) and, with this, per wake-up, so the loop is back to
#: its timers (heartbeats) within tens of milliseconds whatever waits in the socket.
BATCH_BYTES = 4 << 20


class Inbound(NamedTuple):
    """One frame read off a socket: the message, or ``error`` saying why it is not one (a tuple:
    one is made per frame)."""

    identity: bytes | None  # the ROUTER's name for the sender; None on a DEALER
    msg: Message | None
    error: str = ""


class Claim:
    """This process's hold on an ``ipc://`` endpoint: an exclusive ``flock`` on ``PATH.lock``
    (which names our pid), held for the process's life. The kernel drops the lock when the process
    dies however it dies, so a socket file whose lock nobody holds is stale and may be replaced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = path.with_name(path.name + ".lock")
        self.fd = self._take()

    def _take(self) -> int:
        for _ in range(8):
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise DaemonError(
                    f"ipc://{self.path} is served by a running process (pid {holder}); "
                    "stop it first, or give this daemon another endpoint"
                ) from None
            try:
                same = os.stat(self.lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its last holder unlinked between our open and our lock
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
            os.close(fd)
        raise DaemonError(f"could not claim ipc://{self.path}: its lock file keeps changing")

    def release(self) -> None:
        """Remove the socket file and the lock file (still holding the lock), then let go."""
        if self.fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.lock.unlink()
        os.close(self.fd)
        self.fd = -1


def bind(sock: zmq.Socket[bytes], endpoint: str) -> tuple[str, Claim | None]:
    path = Path(endpoint[len("ipc://") :]) if endpoint.startswith("ipc://") else None
    claim = None
    if path is not None:
        if len(str(path)) > 100:
            raise DaemonError(f"ipc path {path} is too long for a unix socket (keep run_dir short)")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        claim = Claim(path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # the socket file of a daemon that died; binding fails loudly otherwise
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        if claim is not None:
            claim.release()
        raise DaemonError(f"cannot bind {endpoint}: {exc}") from None
    if path is not None:
        os.chmod(path, 0o600)
    real: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return real, claim


def socket(
    ctx: zmq.Context[zmq.Socket[bytes]], kind: int, *, max_frame: int = DEFAULT_MAX_FRAME, queue: int = HWM
) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame + ENVELOPE)
    sock.setsockopt(zmq.SNDHWM, HWM)  # what we send is ours, small, and must not be dropped
    sock.setsockopt(zmq.RCVHWM, queue)  # what others send is bounded: queue x max_frame bytes
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown identity raises instead of dropping silently
    return sock


def send(sock: zmq.Socket[bytes], msg: Message, identity: bytes | None = None, frame: bytes | None = None) -> None:
    """Send ``msg`` (``frame``: its encoding, made already) without blocking."""
    if frame is None:
        frame = encode(msg)
    if identity is None:
        sock.send(frame, zmq.NOBLOCK)
    else:
        sock.send_multipart([identity, frame], zmq.NOBLOCK)


def receive(sock: zmq.Socket[bytes], *, max_frame: int, router: bool, limit: int = BATCH) -> Iterator[Inbound]:
    """Up to ``limit`` frames (and about :data:`BATCH_BYTES`) waiting on ``sock``, each decoded or
    refused. Never blocks, never raises for what a peer sent.

    Each frame is read and decoded as the caller asks for the next one, so the first message of
    a burst is handled before the rest are decoded (a cache_info in front of 32 layer signals
    starts its admission round ~10 µs after it came, not after all 33 were decoded). A socket
    the caller closed meanwhile ends the iteration."""
    taken = 0
    for _ in range(limit):
        if taken >= BATCH_BYTES:
            return  # the rest waits for the next wake-up (the socket stays readable)
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        except zmq.ZMQError:
            if sock.closed:
                return
            raise
        taken += sum(len(part) for part in parts)
        identity = parts[0] if router else None
        body = parts[1:] if router else parts
        if len(body) != 1:
            yield Inbound(identity, None, f"a message is one frame, got {len(body)}")
            continue
        try:
            msg = decode(body[0], max_bytes=max_frame)
        except RemoteProtocolError as exc:
            yield Inbound(identity, None, clip(str(exc), 1024))
        else:
            yield Inbound(identity, msg)
