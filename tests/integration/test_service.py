"""The service loop's own bookkeeping (no daemon): sockets it watches and closes."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import zmq

from kvxferd.config import loads
from kvxferd.runtime.service import Service
from kvxferd.security import credentials


def test_a_socket_no_longer_watched_is_no_longer_held(tmp_path: Path) -> None:
    """A decode link that closes idle unwatches its socket and closes it: the service must not keep
    it (every idle link that closed used to leave two dead sockets behind)."""
    config = loads(f"run_dir: {tmp_path}\n")
    service = Service(shutdown_s=1.0, max_frame=1 << 20, queue=16, creds=credentials(config, "daemon"))
    try:
        held = len(service._sockets)
        for _ in range(3):
            sock = service.client_socket(f"ipc://{tmp_path}/nobody.sock", "prefill:0")
            service.watch(sock, lambda: None)
            monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
            service.watch(monitor, lambda: None)
            service.unwatch(monitor)
            sock.disable_monitor()
            monitor.close()
            service.unwatch(sock)
            sock.close(linger=0)
        assert len(service._sockets) == held
        assert not service._handlers
    finally:
        service.shutdown_sockets()


class _Polls(Service):
    """A service whose timers are due every 200 µs, counting how the loop waited for them."""

    def __init__(self, tmp_path: Path) -> None:
        config = loads(f"run_dir: {tmp_path}\n")
        super().__init__(shutdown_s=1.0, max_frame=1 << 20, queue=16, creds=credentials(config, "daemon"))
        self.due = time.monotonic() + 200e-6
        self.ticks = 0
        self.timeouts: list[int | None] = []
        poll = self.poller.poll

        def recorded(timeout: int | None = None) -> list[tuple[Any, int]]:
            self.timeouts.append(timeout)
            return poll(timeout)

        self.poller.poll = recorded  # type: ignore[method-assign]

    def next_wakeup(self) -> float | None:
        return self.due

    def tick(self, now: float) -> None:
        if now >= self.due:
            self.ticks += 1
            self.due = now + 200e-6
            if self.ticks == 20:
                self.request_stop()


def test_a_deadline_under_a_millisecond_is_not_rounded_up_to_a_whole_millisecond(tmp_path: Path) -> None:
    """zmq_poll counts whole milliseconds: a transport polled every 50-200 µs used to be polled every
    millisecond at best. The loop now never blocks in poll for a deadline closer than that."""
    service = _Polls(tmp_path)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (service.run(announce=False), done.set()), daemon=True)
    thread.start()
    assert done.wait(30), "the service did not stop"
    assert service.ticks == 20
    assert service.timeouts and all(t == 0 for t in service.timeouts), sorted(set(service.timeouts), key=str)
