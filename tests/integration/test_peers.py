"""Prefill's decode links through real daemons: a decode engine that comes back with a new cache
is written there (never into the old one) without restarting prefill, and an idle link is closed
and opened again by the next request."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from kvxferd.client import DecodeEngine
from kvxferd.kvcache import HostKVCache
from tests.hostile.conftest import HOSTILE, Hostile
from tests.integration.conftest import deploy


@pytest.fixture
def dep() -> Iterator[Hostile]:
    with deploy(HOSTILE, kind=Hostile) as d:
        assert isinstance(d, Hostile)
        yield d


@pytest.mark.parametrize("old_cache", ["kept", "unlinked"])
def test_a_decode_engine_with_a_new_cache_is_written_there_without_restarting_prefill(
    dep: Hostile, old_cache: str
) -> None:
    """The engine restarts: the old engine's connection closes, its segments stay mapped (a
    slow exit) or are gone (a crash), and the new one registers new segments."""
    assert dep.dec is not None
    dep.legit("before")
    old, before = dep.dcaches, [c.raw().copy() for c in dep.dcaches]
    dep.dec.close()
    if old_cache == "unlinked":
        for c in old:
            c.close()
            c.unlink()
    dep.dcaches = [HostKVCache.create(dep.shape) for _ in old]
    dep.dec = DecodeEngine([dep.config.endpoint(dep.decode, r) for r in range(len(old))], credentials=dep.creds)
    dep.dec.register(dep.dcaches)
    for i in range(3):  # legit() checks the bytes landed in the new caches
        dep.still_fine(f"after-{i}")
    if old_cache == "kept":
        for c, was in zip(old, before, strict=True):
            assert np.array_equal(c.raw(), was), "a write after the re-registration went into the old cache"
            c.close()
            c.unlink()
    for r in range(dep.prefill.world_size):
        assert dep.status(r)["peers"][f"{dep.decode.name}:{r}"]["state"] == "ready"


IDLE = HOSTILE.replace("peer_s: 10,", "peer_s: 10, peer_idle_s: 0.5,")


def test_an_idle_link_is_closed_and_the_next_request_opens_it_again() -> None:
    assert "peer_idle_s" in IDLE
    with deploy(IDLE, kind=Hostile) as d:
        assert isinstance(d, Hostile)
        d.legit("first")
        for r in range(d.prefill.world_size):
            d.wait_until(f"rank {r}'s link to close", lambda r=r: f"{d.decode.name}:{r}" not in d.status(r)["peers"])
        d.still_fine("second")
        for r in range(d.prefill.world_size):
            link = d.status(r)["peers"].get(f"{d.decode.name}:{r}")
            assert link is None or link["waiting"] == link["inflight"] == 0
