"""The daemon lifecycle and its one poller loop.

Theory of operation: a service owns a ZMQ context, a poller and the sockets
registered in it. ``run`` goes through start → ready → serve → drain → stop:

* ``start`` binds and connects, then ``ready`` is announced on stdout as one
  JSON line (``{"event": "ready", ...}``), which is what launchers wait for.
* The loop polls every socket with a timeout taken from ``next_wakeup()``
  (the core's next deadline, a peer query's deadline, a transport that wants
  polling); an idle daemon sleeps in ``poll`` and uses no CPU.
* A service answers on one ROUTER (``bind_router``): every frame is decoded
  (:func:`kvxferd.runtime.sockets.receive`, the one receive path) and handed
  to ``handle(identity, msg, now)``; a frame that is not a valid message is
  answered with an ``Error`` and logged, never raised.
* Handlers are guarded: an exception while handling one message is logged
  with its traceback, answered with ``Error(internal)``, and the daemon keeps
  serving. An exception out of a core (:class:`~kvxferd.errors.CoreBroken`,
  see :mod:`kvxferd.runtime.guard`) means its tables cannot be trusted: the
  service calls ``on_broken`` (fail every request in flight, with the reason)
  and ``run`` returns :data:`BROKEN_EXIT`.
* One wake-up's reads are a batch: ``begin_batch`` before the sockets that
  ``poll`` reported are read, ``end_batch`` after (a prefill daemon plans the
  writes of every message of the batch together there: a step admitted verdict
  by verdict, or layers signalled while their job waited, go as one write).
* A loop that wakes more than :data:`STALL_S` after its next deadline (the
  process was stopped, or starved of CPU) first reads what waited on its
  sockets (:meth:`Service._catch_up`) and only then runs its timers: a word
  that came in time is not judged late because this process was not running.
  ``on_stall`` runs first, for what peers must hear at once (a group daemon
  sends its heartbeat, so the barrier stops counting it as stopped).
* SIGTERM / SIGINT only set a flag; a byte on the signal wake-up socket makes
  ``poll`` return. The service then drains (``begin_drain``) until it is idle
  or ``shutdown_s`` has passed, then stops (``force_stop``) and closes every
  socket with a linger. A second signal while draining stops it at once
  (``force_stop``: what is left fails with a reason). Socket files of the
  ``ipc://`` endpoints it bound are removed when it stops.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
import socket as pysocket
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvxferd.config import LimitsConfig
from kvxferd.errors import CoreBroken
from kvxferd.protocol import Error, ErrorCode, Message
from kvxferd.protocol.fields import clip, show
from kvxferd.runtime import sockets
from kvxferd.runtime.connections import EVENTS as CONNECTION_EVENTS
from kvxferd.runtime.connections import HANDSHAKE_S, Connections
from kvxferd.runtime.logs import TRACE
from kvxferd.security import Credentials, authenticator

log = logging.getLogger(__name__)

Handler = Callable[[], None]

#: exit status of a daemon whose core broke (EX_SOFTWARE)
BROKEN_EXIT = 70
#: timer runs in a row that may raise before the daemon counts itself broken
TICK_FAILURES = 3
#: a wake-up this late after its deadline means the process did not run: catch up before timers
STALL_S = 0.5
#: how long a catch-up waits for more of what queued meanwhile, per read and at most
CATCH_UP_POLL_S = 0.02
CATCH_UP_MAX_S = 1.0
#: a deadline closer than this is not left to ``zmq_poll`` (whole milliseconds) but waited for in naps
FINE_S = 1e-3
FINE_NAP_S = 50e-6


class Service:
    """Base class of the daemons and the barrier service."""

    #: shown in logs and status replies
    role = "service"

    def __init__(
        self,
        *,
        shutdown_s: float,
        max_frame: int,
        queue: int,
        creds: Credentials,
        max_connections: int = LimitsConfig.max_connections,
    ) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.max_frame = max_frame
        self.queue = queue  # messages per socket and connection (LimitsConfig.queue_messages)
        #: the clients of every server socket together, bounded (and so the bytes they can queue)
        self.connections = Connections(max_connections)
        self.creds = creds
        self._auth: Any = None  # the ZAP handler, started before the first server socket binds
        self.router: zmq.Socket[bytes] | None = None
        self.poller = zmq.Poller()
        self._handlers: dict[Any, Handler] = {}
        self._sockets: list[zmq.Socket[bytes]] = []
        self._claims: list[sockets.Claim] = []  # ipc endpoints bound: socket files removed at the end
        self.shutdown_s = shutdown_s
        self.state = "starting"
        self._stop_signal: int | None = None
        self._forced = False  # a second signal came while draining
        self._wake_r, self._wake_w = pysocket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- registration ---------------------------------------------------------------

    def watch(self, sock: zmq.Socket[bytes], handler: Handler) -> None:
        self.poller.register(sock, zmq.POLLIN)
        self._handlers[sock] = handler
        if sock not in self._sockets:
            self._sockets.append(sock)

    def unwatch(self, sock: zmq.Socket[bytes]) -> None:
        """Stop polling ``sock`` and let go of it: the caller closes it."""
        if sock in self._handlers:
            self.poller.unregister(sock)
            del self._handlers[sock]
        if sock in self._sockets:
            self._sockets.remove(sock)

    def own(self, sock: zmq.Socket[bytes]) -> zmq.Socket[bytes]:
        """Close ``sock`` with the service (without polling it)."""
        self._sockets.append(sock)
        return sock

    # -- the ROUTER everyone talks to ---------------------------------------------------

    def server_socket(self, endpoint: str, domain: str) -> tuple[zmq.Socket[bytes], str]:
        """A CURVE ROUTER bound at ``endpoint`` whose clients must hold the keys ``domain`` accepts
        (:data:`kvxferd.security.DOMAINS`); closed with the service, not yet polled."""
        if self._auth is None:
            self._auth = authenticator(self.ctx, self.creds, self.connections.admit)
        sock = self.own(sockets.socket(self.ctx, zmq.ROUTER, max_frame=self.max_frame, queue=self.queue))
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_S * 1000))  # a silent connection frees its place
        self.creds.server(sock, domain)
        real, claim = sockets.bind(sock, endpoint)
        if claim is not None:
            self._claims.append(claim)
        monitor = self.own(sock.get_monitor_socket(CONNECTION_EVENTS))
        monitor.setsockopt(zmq.LINGER, 0)
        self.watch(monitor, lambda: self._on_connections(id(sock), monitor))
        return sock, real

    def _on_connections(self, sock: int, monitor: zmq.Socket[bytes]) -> None:
        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            self.connections.event(sock, event["event"], event["value"])

    def client_socket(self, endpoint: str, identity: str) -> zmq.Socket[bytes]:
        """A CURVE DEALER named ``identity``, connected to another daemon's server socket (not owned:
        the caller closes it, or hands it to ``own``). Raises zmq.ZMQError for a bad endpoint."""
        sock = sockets.socket(self.ctx, zmq.DEALER, max_frame=self.max_frame, queue=self.queue)
        sock.setsockopt(zmq.IDENTITY, identity.encode())
        self.creds.client(sock)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)  # a half-made socket would block the context's termination
            raise
        return sock

    def bind_router(self, endpoint: str, domain: str = "engine") -> str:
        """Bind the service's ROUTER (not yet polled: ``watch(self.router, self.on_router)``)."""
        self.router, real = self.server_socket(endpoint, domain)
        return real

    def on_router(self) -> None:
        assert self.router is not None
        self.serve(self.router)

    def serve(self, sock: zmq.Socket[bytes]) -> None:
        """Decode and handle what waits on the ROUTER ``sock``; refusals are answered on ``sock``."""
        for inbound in sockets.receive(sock, max_frame=self.max_frame, router=True):
            identity = inbound.identity or b""
            if inbound.msg is None:
                log.warning("bad frame from %s: %s", show(identity), inbound.error)
                self.answer(sock, identity, Error(ErrorCode.BAD_MESSAGE, inbound.error))
                continue
            log.log(TRACE, "<- %r %s", identity, inbound.msg)
            self.dispatch(sock, identity, inbound.msg, time.monotonic())

    def dispatch(self, sock: zmq.Socket[bytes], identity: bytes, msg: Message, now: float) -> None:
        """Handle one message from ``sock``, guarded: a failure is logged and answered, not fatal."""
        try:
            self.handle_on(sock, identity, msg, now)
        except CoreBroken:
            raise
        except Exception as exc:
            log.exception("internal error handling %s from %s; still serving", type(msg).__name__, show(identity))
            detail = f"internal error handling {type(msg).__name__}: {type(exc).__name__}: {clip(str(exc), 512)}"
            self.answer(sock, identity, Error(ErrorCode.INTERNAL, detail))

    def answer(
        self, sock: zmq.Socket[bytes], identity: bytes, msg: Message, *, quiet: bool = False, frame: bytes | None = None
    ) -> bool:
        """Send ``msg`` to ``identity`` on the ROUTER ``sock``; False (logged unless ``quiet``) if it
        is not reachable. ``frame``: ``msg`` encoded already (one verdict to every rank of a group)."""
        try:
            sockets.send(sock, msg, identity, frame)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: not connected (yet, or any more); EAGAIN: not reading
            if not quiet:
                log.warning("%s unreachable (%s); could not send %s", show(identity), exc.strerror, type(msg).__name__)
            return False
        log.log(TRACE, "-> %r %s", identity, msg)
        return True

    def reply(self, identity: bytes, msg: Message, *, quiet: bool = False, frame: bytes | None = None) -> bool:
        """Send ``msg`` to ``identity`` on the service's ROUTER; False (logged unless ``quiet``) if it
        is not reachable."""
        assert self.router is not None
        return self.answer(self.router, identity, msg, quiet=quiet, frame=frame)

    # -- hooks for subclasses ---------------------------------------------------------

    def on_stall(self, late_s: float) -> None:
        """The loop woke ``late_s`` after a deadline (called whenever it is late at all; more than
        STALL_S means this process did not run): before it reads what waited, do what must come
        first (a daemon says it is alive; a prefill daemon stops writing what its peers may have
        given up on). Called often: keep it a few comparisons unless there is work."""

    def begin_batch(self) -> None:
        """A wake-up's reads begin: what they make ready may wait for :meth:`end_batch` (a prefill
        daemon plans the writes of every message read in one go)."""

    def end_batch(self, now: float) -> None:
        """The wake-up's reads are done: carry out what waited for them."""

    def handle_on(self, sock: zmq.Socket[bytes], identity: bytes, msg: Message, now: float) -> None:
        """One message from the server socket ``sock`` (a service with more than one overrides this)."""
        self.handle(identity, msg, now)

    def handle(self, identity: bytes, msg: Message, now: float) -> None:
        """One message from the ROUTER."""
        self.reply(identity, Error(ErrorCode.WRONG_ROLE, f"the {self.role} does not accept {type(msg).__name__}"))

    def start(self) -> None:
        """Bind, connect, agree with the group; raise DaemonError if that fails."""

    def ready_info(self) -> dict[str, Any]:
        return {}

    def next_wakeup(self) -> float | None:
        """Monotonic time by which ``tick`` must run (None: only when a message comes)."""
        return None

    def tick(self, now: float) -> None:
        """Run timers and poll transports."""

    def begin_drain(self, now: float) -> None:
        """Stop taking new work; finish what is in flight."""

    def idle(self) -> bool:
        """True once draining has nothing left to finish."""
        return True

    def force_stop(self, now: float, why: str) -> None:
        """Draining ends early (``why``: the deadline passed, or a second signal): end what is left."""

    def close(self) -> None:
        """Release resources other than sockets (transports, mappings)."""

    def on_broken(self, reason: str, now: float) -> None:
        """A core broke (``reason``): tell everyone waiting on a request in flight that it failed."""

    # -- the loop ----------------------------------------------------------------------

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        if self._stop_signal is not None:
            self._forced = True
        self._stop_signal = signum
        with contextlib.suppress(OSError):  # a wake-up byte is already pending, or the service has stopped
            self._wake_w.send(b"\0")

    def run(self, *, announce: bool = True) -> int:
        previous = self._install_signals()
        try:
            self.start()
            self.state = "serving"
            if announce:
                self._announce()
            self._loop()
            return 0
        except CoreBroken as exc:
            log.critical("%s: failing every request in flight and exiting", exc, exc_info=exc)
            self.state = "broken"
            try:
                self.on_broken(f"{self.role} stopped on an internal error ({clip(str(exc), 300)})", time.monotonic())
            except Exception:
                log.exception("could not tell every engine about its requests in flight")
            return BROKEN_EXIT
        finally:
            self._restore_signals(previous)
            self.shutdown_sockets()

    def _loop(self) -> None:
        wake_fd = self._wake_r.fileno()
        self.poller.register(wake_fd, zmq.POLLIN)  # the poller reports plain fds back as ints
        drain_deadline: float | None = None
        failures = 0
        while True:
            now = time.monotonic()
            if self._stop_signal is not None and drain_deadline is None:
                log.info("stopping (signal %d): draining for up to %gs", self._stop_signal, self.shutdown_s)
                self.state = "draining"
                drain_deadline = now + self.shutdown_s
                self.begin_drain(now)
            if drain_deadline is not None:
                if self.idle():
                    log.info("drained; stopping")
                    return
                if now >= drain_deadline or self._forced:
                    why = "a second signal" if self._forced else "drain deadline passed"
                    log.warning("%s; stopping what is left", why)
                    self.force_stop(now, why)
                    return
            wake = self.next_wakeup()
            if drain_deadline is not None:
                wake = drain_deadline if wake is None else min(wake, drain_deadline)
            ready = self._wait(wake, now)
            late = 0.0 if wake is None else time.monotonic() - wake
            if late > 0:  # before anything that waited is read (a stop may have ended just now)
                self._guard(functools.partial(self.on_stall, late), "telling peers it runs again")
            self._read_batch(ready, wake_fd)
            if late > STALL_S:
                self._catch_up(wake_fd, late)
            failures = 0 if self._guard(lambda: self.tick(time.monotonic()), "running timers") else failures + 1
            if failures >= TICK_FAILURES:
                raise CoreBroken(f"timers failed {failures} times in a row")

    def _wait(self, wake: float | None, now: float) -> list[tuple[Any, int]]:
        """Poll until something is readable or ``wake``. ``zmq_poll`` counts whole milliseconds, so
        a deadline closer than that (a transport's completions are polled from 50 µs on) is waited
        for in naps of at most FINE_NAP_S between non-blocking polls: a completion is noticed tens
        of microseconds after it is due, not a millisecond, and a message within a nap of coming."""
        if wake is None:
            return self.poller.poll(None)
        left = wake - now
        if left >= FINE_S:
            return self.poller.poll(math.ceil(left * 1000.0))
        ready = self.poller.poll(0)
        while not ready and (left := wake - time.monotonic()) > 0:
            time.sleep(min(left, FINE_NAP_S))
            ready = self.poller.poll(0)
        return ready

    def _read(self, ready: list[tuple[Any, int]], wake_fd: int) -> None:
        for sock, _ in ready:
            if sock == wake_fd:
                self._drain_wake()
            elif sock in self._handlers:  # a handler earlier in this round may have closed it
                self._guard(self._handlers[sock], "reading a socket")

    def _catch_up(self, wake_fd: int, late_s: float) -> None:
        """Read what queued while this process did not run (ZMQ's I/O thread hands it over from
        the kernel's buffers a little at a time) until a short wait brings nothing more."""
        log.warning("woke %.1fs after a deadline (stopped or starved?): reading what waited before timers", late_s)
        until = time.monotonic() + CATCH_UP_MAX_S
        while time.monotonic() < until:
            ready = self.poller.poll(int(CATCH_UP_POLL_S * 1000))
            if not ready:
                return
            self._read_batch(ready, wake_fd)

    def _read_batch(self, ready: list[tuple[Any, int]], wake_fd: int) -> None:
        """Read what ``ready`` names as one batch (see begin_batch)."""
        self.begin_batch()
        self._read(ready, wake_fd)
        self._guard(lambda: self.end_batch(time.monotonic()), "carrying out what the reads made ready")

    def _guard(self, step: Handler, what: str) -> bool:
        """Run one step of the loop; an exception other than CoreBroken is logged, not fatal."""
        try:
            step()
        except CoreBroken:
            raise
        except Exception:
            log.exception("internal error %s; still serving", what)
            return False
        return True

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except BlockingIOError:
            pass

    def _announce(self) -> None:
        line = {"event": "ready", "role": self.role, "pid": _pid(), **self.ready_info()}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        log.info("ready: %s", line)

    def _install_signals(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        try:
            previous[-1] = signal.set_wakeup_fd(self._wake_w.fileno())
        except ValueError:  # not the main thread (tests run services in threads)
            return previous
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda s, _f: self.request_stop(s))
        return previous

    def _restore_signals(self, previous: dict[int, Any]) -> None:
        if -1 in previous:
            signal.set_wakeup_fd(previous.pop(-1))
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def shutdown_sockets(self) -> None:
        try:
            self.close()
        finally:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
            self._wake_r.close()
            self._wake_w.close()
            if self._auth is not None:
                self._auth.stop()
                self._auth = None
            self.ctx.term()
            for claim in self._claims:
                claim.release()
            self._claims.clear()
            self.state = "stopped"


def _pid() -> int:
    import os

    return os.getpid()
