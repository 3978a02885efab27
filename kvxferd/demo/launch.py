"""Start a deployment's daemons as real processes, wait until each says it is ready, stop them.

Readiness is the one JSON line a daemon prints on stdout once it serves; logs go
to one file per daemon in the run directory, whose tail is shown when a daemon
fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvxferd.config import Config, dump
from kvxferd.errors import DaemonError


@dataclass
class Daemon:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    ready: dict[str, Any] | None = None
    _buf: bytes = field(default=b"", repr=False)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(f"    {line}" for line in text[-lines:]) or "    (empty log)"


def prepare(config: Config, prefix: str = "kvx-") -> tuple[Config, Path, Path]:
    """A fresh run directory under /tmp (unix socket paths must stay short) with ``config``
    written into it, pointing there: (the config, its path, the directory)."""
    run_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    config = dataclasses.replace(config, run_dir=str(run_dir))
    path = run_dir / "config.yaml"
    path.write_text(dump(config))
    return config, path, run_dir


class Cluster:
    """The barrier service and every rank of every group of ``config``."""

    def __init__(self, config: Config, config_path: Path, run_dir: Path, log_level: str) -> None:
        self.config = config
        self.config_path = config_path
        self.run_dir = run_dir
        self.log_level = log_level
        self.daemons: list[Daemon] = []

    def start(self, timeout_s: float, *, skip: frozenset[str] = frozenset()) -> None:
        """Start the barrier service, then every rank of every group not named in ``skip``."""
        deadline = time.monotonic() + timeout_s
        barrier = self.spawn("barrier")
        self.wait_ready([barrier], deadline)
        ranks = [
            self.spawn(f"{g.name}-{r}") for g in self.config.groups if g.name not in skip for r in range(g.world_size)
        ]
        self.wait_ready(ranks, deadline)

    def spawn(self, name: str) -> Daemon:
        """Start daemon ``name`` ("barrier" or "GROUP-RANK"); it replaces an earlier daemon of that name."""
        if name == "barrier":
            args = ["barrier"]
        else:
            group, _, rank = name.rpartition("-")
            args = ["serve", "--group", group, "--rank", rank]
        log_path = self.run_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "kvxferd", *args, "--config", str(self.config_path), "--log-level", self.log_level]
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL)
        daemon = Daemon(name, popen, log_path)
        for old in self.daemons:
            if old.name == name and old.popen.stdout is not None:
                old.popen.stdout.close()
        self.daemons = [d for d in self.daemons if d.name != name] + [daemon]
        return daemon

    def daemon(self, name: str) -> Daemon:
        for d in self.daemons:
            if d.name == name:
                return d
        raise KeyError(name)

    def restart(self, name: str, timeout_s: float = 60.0) -> Daemon:
        """Start daemon ``name`` again (its old process must have ended) and wait until it is ready."""
        old = self.daemon(name)
        if old.popen.poll() is None:
            raise DaemonError(f"{name} still runs (pid {old.popen.pid})")
        daemon = self.spawn(name)
        self.wait_ready([daemon], time.monotonic() + timeout_s)
        return daemon

    def wait_ready(self, daemons: list[Daemon], deadline: float) -> None:
        sel = selectors.DefaultSelector()
        for d in daemons:
            assert d.popen.stdout is not None
            os.set_blocking(d.popen.stdout.fileno(), False)
            sel.register(d.popen.stdout, selectors.EVENT_READ, d)
        waiting = set(d.name for d in daemons)
        try:
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    slow = [d for d in daemons if d.name in waiting]
                    raise DaemonError("not ready in time: " + ", ".join(d.name for d in slow) + "\n" + slow[0].tail())
                for key, _ in sel.select(min(left, 0.5)):
                    who: Daemon = key.data
                    chunk = os.read(key.fd, 4096)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        code = who.popen.wait(timeout=5)
                        raise DaemonError(f"{who.name} exited with status {code} before it was ready:\n{who.tail()}")
                    who._buf += chunk
                    if b"\n" in who._buf:
                        line, _, who._buf = who._buf.partition(b"\n")
                        who.ready = json.loads(line)
                        waiting.discard(who.name)
                        sel.unregister(key.fileobj)
        finally:
            sel.close()

    def check(self, *, skip: frozenset[str] = frozenset()) -> None:
        """Raise DaemonError if any daemon but those named in ``skip`` has exited."""
        for d in self.daemons:
            if d.name in skip:
                continue
            code = d.popen.poll()
            if code is not None:
                raise DaemonError(f"{d.name} exited unexpectedly with status {code}:\n{d.tail()}")

    def stop(self, timeout_s: float = 15.0) -> dict[str, int]:
        """SIGTERM the ranks, then the barrier service; returns every exit status (-9: had to be killed)."""
        codes: dict[str, int] = {}
        order = [d for d in self.daemons if d.name != "barrier"] + [d for d in self.daemons if d.name == "barrier"]
        for group in (order[:-1], order[-1:]):
            for d in group:
                if d.popen.poll() is None:
                    d.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for d in group:
                try:
                    codes[d.name] = d.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    d.popen.kill()
                    d.popen.wait()
                    codes[d.name] = -9
                if d.popen.stdout is not None:
                    d.popen.stdout.close()
        return codes
