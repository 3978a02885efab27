"""Real daemons in real processes over ipc:// sockets, for integration tests.

Each deployment gets its own short run directory under /tmp (unix socket paths
are limited to ~107 bytes). Daemons are started with the launcher the demo
uses: it waits for each one's readiness line, with a deadline, and stops them
with SIGTERM afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvxferd.client import DecodeEngine, PrefillScheduler, PrefillWorker, credentials, status
from kvxferd.config import Config, dump, loads
from kvxferd.demo.launch import Cluster
from kvxferd.kvcache import HostKVCache, KVShape

SMALL = """
kv: {num_layers: 4, kv_heads: 2, head_dim: 16, block_tokens: 4, num_blocks: 64, dtype: float32}
timeouts: {pending_s: 20, progress_s: 20, verdict_s: 40, peer_s: 10, startup_s: 30, shutdown_s: 5}
"""


class Deployment:
    """The barrier service, a 2-rank prefill group and a 2-rank decode group, plus engine clients.

    ``prefill`` and ``decode`` are the config's first group of each role; groups named in
    ``skip`` are not started (a test plays them)."""

    skip: frozenset[str] = frozenset()

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.prefill = next(g for g in config.groups if g.role == "prefill")
        self.decode = next(g for g in config.groups if g.role == "decode")
        path = run_dir / "config.yaml"
        path.write_text(dump(config))
        self.cluster = Cluster(config, path, run_dir, "INFO")
        self.shape = KVShape.from_config(config, self.prefill.world_size)
        self.pcaches: list[HostKVCache] = []
        self.dcaches: list[HostKVCache] = []
        self.workers: list[PrefillWorker] = []
        self.sched: PrefillScheduler | None = None
        self.dec: DecodeEngine | None = None

    def start(self) -> None:
        self.cluster.start(60.0, skip=self.skip)

    def engines(self) -> None:
        """Create and register every cache (decode first), connect scheduler and workers."""
        world, dworld = self.prefill.world_size, self.decode.world_size
        self.pcaches = [HostKVCache.create(self.shape) for _ in range(world)]
        dshape = KVShape.from_config(self.config, dworld)  # (another shape where the groups differ in size)
        self.dcaches = [HostKVCache.create(dshape) for _ in range(dworld)]
        self.creds = credentials(self.config)
        self.dec = DecodeEngine([self.config.endpoint(self.decode, r) for r in range(dworld)], credentials=self.creds)
        self.dec.register(self.dcaches)
        self.workers = [
            PrefillWorker(self.config.endpoint(self.prefill, r), credentials=self.creds) for r in range(world)
        ]
        for worker, cache in zip(self.workers, self.pcaches, strict=True):
            worker.register(cache)
        self.sched = PrefillScheduler(
            [self.config.endpoint(self.prefill, r) for r in range(world)], credentials=self.creds
        )

    @property
    def peer(self) -> str:
        return self.decode.name

    def status(self, rank: int, role: str = "prefill") -> dict[str, Any]:
        import json

        group = self.prefill if role == "prefill" else self.decode
        reply = status(self.config.endpoint(group, rank), 10.0, credentials=self.creds)
        return {"state": reply.state, **json.loads(reply.report)}

    def wait_until(self, what: str, check: Callable[[], bool], timeout_s: float = 20.0) -> None:
        """Poll a condition (through status queries, never sleeps) until it holds or time runs out."""
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            assert self.dec is not None
            self.dec.collect(0.01)  # between checks, wait (briefly) for decode notices instead of sleeping

    def close(self) -> dict[str, int]:
        for w in self.workers:
            w.close()
        for g in (self.sched, self.dec):
            if g is not None:
                g.close()
        codes = self.cluster.stop()
        for c in self.pcaches + self.dcaches:
            c.close()
            c.unlink()
        return codes


def fill(cache: HostKVCache, blocks: list[int], seed: int) -> None:
    """Distinct random bytes in every layer, K and V, of these blocks."""
    raw = cache.raw()
    rng = np.random.default_rng(seed)
    raw[:, :, blocks] = rng.integers(0, 256, size=raw[:, :, blocks].shape, dtype=np.uint8)


@contextlib.contextmanager
def deploy(text: str = SMALL, *, kind: type[Deployment] = Deployment) -> Iterator[Deployment]:
    """A running deployment of config ``text``, engines connected; every daemon must exit cleanly
    and leave no socket file behind."""
    run_dir = Path(tempfile.mkdtemp(prefix="kvx-", dir="/tmp"))
    config = dataclasses.replace(loads(text), run_dir=str(run_dir))
    dep = kind(config, run_dir)
    segments = _segments()
    try:
        dep.start()
        dep.engines()
        yield dep
    finally:
        codes = dep.close()
        left = sorted(p.name for p in run_dir.rglob("*") if p.is_socket() or p.name.endswith(".lock"))
        shutil.rmtree(run_dir, ignore_errors=True)
    assert all(code == 0 for code in codes.values()), f"daemons did not exit cleanly: {codes}"
    assert not left, f"socket files left behind by daemons that exited cleanly: {left}"
    # daemons create no segment; the engines' caches are gone with the engines (killed daemons too)
    assert not (_segments() - segments), f"/dev/shm segments left behind: {sorted(_segments() - segments)}"


def _segments() -> set[str]:
    """kvxferd's shared-memory segments on this machine (the engines' caches are named kvx-...)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith("kvx")} if shm.is_dir() else set()


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    with deploy() as dep:
        yield dep
