"""Real services run in threads of the test process, for tests that must reach inside one.

Nothing outside a process can make it stop at a chosen line, or make a correct handler raise, so
these tests run the real services in threads and replace one method of one of them; everything
else (sockets, clients, the other daemons) is what production runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvxferd import security
from kvxferd.client import DecodeEngine, PrefillScheduler, PrefillWorker, credentials, status
from kvxferd.config import Config, loads
from kvxferd.errors import DaemonError
from kvxferd.runtime.service import Service


class Running:
    """A service's ``run`` in a thread; ``code`` is what it returned."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.code = self.service.run(announce=False)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def wait(self, timeout_s: float = 20.0) -> int | None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"{self.service.role} did not stop within {timeout_s}s"
        assert self.error is None, self.error
        return self.code

    def stop(self) -> int | None:
        if self.thread.is_alive():
            self.service.request_stop()
        return self.wait()


def ready(config: Config, endpoint: str, timeout_s: float = 20.0) -> None:
    """The readiness handshake: a status query answered (retried until the deadline)."""
    last: Exception | None = None
    creds = security.credentials(config, "daemon" if endpoint == config.barrier_endpoint() else "engine")
    for _ in range(int(timeout_s / 0.5)):
        try:
            status(endpoint, 0.5, credentials=creds)
            return
        except DaemonError as exc:
            last = exc
    raise AssertionError(f"{endpoint} never answered: {last}")


@contextlib.contextmanager
def run_dir(config_text: str) -> Iterator[Config]:
    """``config_text`` loaded with a fresh run directory under /tmp, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="kvx-t-", dir="/tmp"))
    try:
        yield dataclasses.replace(loads(config_text), run_dir=str(path))
    finally:
        shutil.rmtree(path, ignore_errors=True)


def engines(config: Config, clients: list[Any]) -> tuple[DecodeEngine, PrefillWorker, PrefillScheduler]:
    """Once rank 0 of the prefill and of the decode group answer: a decode engine, a prefill worker
    and a scheduler for them (also appended to ``clients``, for the caller to close)."""
    pgroup, dgroup = config.group(role="prefill"), config.group(role="decode")
    for endpoint in (config.endpoint(pgroup, 0), config.endpoint(dgroup, 0)):
        ready(config, endpoint)
    creds = credentials(config)
    dec = DecodeEngine([config.endpoint(dgroup, 0)], credentials=creds)
    worker = PrefillWorker(config.endpoint(pgroup, 0), credentials=creds)
    sched = PrefillScheduler([config.endpoint(pgroup, 0)], credentials=creds)
    clients += [dec, worker, sched]
    return dec, worker, sched
