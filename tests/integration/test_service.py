"""The service loop's own bookkeeping (no daemon): sockets it watches and closes."""

from __future__ import annotations

from pathlib import Path

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
