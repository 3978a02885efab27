"""rdma: a failed write is reported only once none of its bytes can land any more (issue 23,
item 10), driven through a fake NIXL agent whose handles and peers can refuse to let go."""

from __future__ import annotations

import time
from typing import Any

from kvxferd.config import TransportConfig
from kvxferd.transports.rdma import RdmaTransport, _Remote, _Staging


class NixlError(Exception):
    pass


class Handle:
    def __init__(self, agent: Agent) -> None:
        self.agent, self.released = agent, False

    def release(self) -> None:
        if self.agent.stuck_handles:
            raise NixlError("transfer still active")
        self.released = True


class Agent:
    """A write never finishes (state PROC); handles and peers let go only when told to."""

    def __init__(self) -> None:
        self.stuck_handles = False
        self.stuck_peers = False
        self.removed: list[str] = []
        self.added = 0

    refuse = False

    def make_prepped_xfer(self, *args: Any) -> Handle:
        if self.refuse:
            raise NixlError("invalid descriptor")
        return Handle(self)

    def transfer(self, handle: Handle) -> str:
        return "PROC"

    def check_xfer_state(self, handle: Handle) -> str:
        return "PROC"

    def remove_remote_agent(self, name: str) -> None:
        if self.stuck_peers:
            raise NixlError("busy")
        self.removed.append(name)

    def add_remote_agent(self, metadata: bytes) -> str:
        self.added += 1
        return "peer-agent"

    def prep_xfer_dlist(self, *args: Any) -> object:
        return object()

    def register_memory(self, *args: Any) -> object:
        return object()

    def deregister_memory(self, reg: object) -> None:
        pass


class Prepped:
    def release(self) -> None:
        pass


def transport(agent: Agent, timeout_s: float = 0.0) -> RdmaTransport:
    """An RdmaTransport with its NIXL parts replaced: two writes in flight to peer "d#g"."""
    t = object.__new__(RdmaTransport)
    t.config = TransportConfig(write_timeout_s=max(timeout_s, 1e-3))
    t._errors = (NixlError,)
    t._agent, t._prepped = agent, Prepped()
    t._remotes = {"d#g": _Remote("peer-agent", Prepped())}
    t._infos, t._peers, t._stuck, t._done = {}, {}, {}, []
    t._inflight = {}
    t._staging, t._staged, t._waiting = _Staging(agent, 1 << 20), {}, {}
    for wid in (1, 2):
        t._inflight[wid] = (Handle(agent), time.monotonic() - 1.0, "d#g")  # past their deadline
        start = t._staging.take(4096, 4096)  # each gathered its slices into staging
        assert start is not None
        t._staged[wid] = (start, 4096)
    return t


def staging_free(t: RdmaTransport) -> bool:
    """Every byte of the staging is free (no write may still read it)."""
    assert t._staging is not None
    return t._staging.free == [(0, 1 << 20)] and not t._staged


def test_a_timed_out_write_whose_handle_is_released_fails_at_once() -> None:
    agent = Agent()
    t = transport(agent)
    done = t.poll()
    assert [c.write_id for c in done] == [1, 2] and all("not done after" in c.error for c in done)
    assert agent.removed == [] and t.pending() == 0 and staging_free(t)


def test_a_failed_write_nixl_will_not_release_is_cut_off_from_its_peer_before_it_is_reported() -> None:
    agent = Agent()
    agent.stuck_handles = True
    t = transport(agent)
    done = t.poll()
    assert agent.removed == ["peer-agent"]  # the connection went before anyone was told
    first = next(c for c in done if c.write_id == 1)
    assert "NIXL would not release it" in first.error and "nothing more of it can land" in first.error
    assert {c.write_id for c in done} == {1, 2} and t.pending() == 0  # the other write went with it
    assert staging_free(t)


def test_a_failed_write_that_can_be_neither_released_nor_cut_off_is_not_reported_until_it_can() -> None:
    agent = Agent()
    agent.stuck_handles = agent.stuck_peers = True
    t = transport(agent)
    assert t.poll() == [] and t.pending() == 2  # its request's ending waits (bounded by its drain deadline)
    assert t.poll() == []
    assert set(t._staged) == {1, 2}  # NIXL may still read their staging: it stays taken
    agent.stuck_peers = False
    done = t.poll()
    assert {c.write_id for c in done} == {1, 2} and all("can land" in c.error for c in done)
    assert t.pending() == 0 and staging_free(t)


def test_staging_is_handed_out_aligned_first_fit_and_merged_back_whole() -> None:
    s = _Staging(Agent(), 100)
    a, b = s.take(30, 10), s.take(25, 25)
    assert (a, b) == (0, 50)  # b skips 30..49 to start at a multiple of 25
    assert s.take(40, 1) is None and s.take(20, 1) == 30  # what is left: 30..49 and 75..99
    s.give(0, 30)
    s.give(50, 25)
    assert s.free == [(0, 30), (50, 100)]
    s.give(30, 20)
    assert s.free == [(0, 100)]


def test_a_write_nixl_refuses_fails_at_once_and_leaves_nothing_behind() -> None:
    from types import SimpleNamespace

    import numpy as np

    from kvxferd.protocol import CacheLayout

    agent = Agent()
    agent.refuse = True
    t = transport(agent)
    t._inflight.clear()
    layout = CacheLayout(2, 8, 64)
    t.local, t._peers, t._cuts = SimpleNamespace(layout=layout), {"d#g": layout}, {}
    done = t._post(7, "d#g", (0, 1), np.array([[0, 2, 3]], dtype=np.int64))
    assert done is not None and done.write_id == 7 and "NIXL refused the write" in (done.error or "")
    assert t.pending() == 0 and t.poll() == []
