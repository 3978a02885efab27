"""Processes die, stop and come back, through real ``kvxferd serve`` / ``barrier`` processes.

Each case runs a deployment (barrier service, 2 prefill + 2 decode ranks on host memory), moves
requests with verified bytes before the fault, injects the fault (SIGKILL, SIGTERM twice, a second
daemon for a live endpoint), checks what the requests touched by it report and how soon, restarts
only the faulted process, and moves verified requests again. Every deployment ends with a clean
stop of every daemon and no socket file left in its run directory (``deploy`` checks both).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvxferd import security
from kvxferd.client import DecodeEngine, DecodeOutcome, PrefillOutcome, PrefillScheduler, PrefillWorker, status
from kvxferd.errors import TransportUnavailable
from kvxferd.kvcache import HostKVCache
from kvxferd.protocol import CacheInfo, ErrorCode, SlotChunk, Status
from kvxferd.transports import load
from tests.integration.conftest import SMALL, Deployment, deploy, fill

BARRIER_S = 4.0  # the barrier's round timeout in these deployments
HEARTBEAT_S = 0.25  # a rank silent for 3 heartbeats has stopped: the barrier ends what waits for it
SLACK_S = 3.0  # what a failure report may take beyond its timeout on a busy 2-core machine


@pytest.fixture(params=["shm", "rdma"])
def transport(request: pytest.FixtureRequest) -> str:
    """The transport a case's requests ask for (rdma: NIXL over loopback; skipped where absent)."""
    try:
        load(request.param)
    except TransportUnavailable as exc:
        pytest.skip(str(exc))
    return str(request.param)


def faults(**timeouts: float) -> str:
    """The small deployment with a short barrier timeout, quick heartbeats and ``timeouts``."""
    base: dict[str, float] = {"pending_s": 20, "progress_s": 20, "verdict_s": 30, "peer_s": 10, "startup_s": 30}
    base |= {"shutdown_s": 5, "heartbeat_s": HEARTBEAT_S} | timeouts
    kv = next(line for line in SMALL.splitlines() if line.startswith("kv:"))
    inner = ", ".join(f"{k}: {v}" for k, v in base.items())
    return f"{kv}\ntimeouts: {{{inner}}}\nbarrier: {{timeout_s: {BARRIER_S}}}\n"


class Traffic:
    """One-block requests on every rank, each with fresh bytes, checked at decode byte for byte."""

    def __init__(self, dep: Deployment, record: dict[str, Any], transport: str = "auto") -> None:
        self.dep = dep
        self.record = record  # the case's figures: requests verified here are counted in it
        self.transport = transport
        if transport != "auto":
            record["transport"] = transport
        self.step = 0
        self.n = 0

    def info(self, slot: int | None = None) -> tuple[CacheInfo, int, int]:
        self.n += 1
        self.step += 1
        src, dst = self.n % 24, 24 + self.n % 24
        rid = f"q{self.n}"
        for r in range(self.dep.prefill.world_size):
            fill(self.dep.pcaches[r], [src], seed=1000 * self.n + r)
        slot = self.n % 8 if slot is None else slot
        assert self.dep.dec is not None
        gens = tuple(self.dep.dec.generations)  # the registrations the decode blocks are reserved in
        gens = gens if all(gens) else ()  # a decode engine that is not registered everywhere: none
        info = CacheInfo(rid, slot, self.step, 4, (src,), (dst,), self.dep.peer, self.transport, dst_generations=gens)
        return info, src, dst

    def signal(self, info: CacheInfo, ranks: range | list[int]) -> None:
        chunk = (SlotChunk(info.slot, 0, info.num_tokens, info.step),)
        for r in ranks:
            for layer in range(self.dep.config.kv.num_layers):
                self.dep.workers[r].layer_ready(info.step, layer, chunk if layer == 0 else ())

    def half_done(self, rank: int) -> tuple[CacheInfo, int, int]:
        """A request both ranks hold, written and arrived on ``rank`` only: in flight."""
        info, src, dst = self.info()
        assert self.dep.sched is not None
        self.dep.sched.submit(info)
        self.signal(info, [rank])
        _wait_state(self.dep, rank, info.request_id, "arrived")
        return info, src, dst

    def ok(self, count: int = 3) -> None:
        """``count`` requests, each reported ok on every rank, ready at decode, bytes in place."""
        dep = self.dep
        assert dep.sched is not None and dep.dec is not None
        for _ in range(count):
            info, src, dst = self.info()
            dep.sched.submit(info)
            self.signal(info, range(dep.prefill.world_size))
            out = dep.sched.wait(info.request_id, 20.0)
            assert out.ok, out.results
            assert self.transport == "auto" or {r.transport for r in out.results.values()} == {self.transport}
            assert dep.dec.wait(info.request_id, 20.0).ready
            self.verify(src, dst)
            self.record["verified"] += 1

    def verify(self, src: int, dst: int) -> None:
        for r in range(self.dep.prefill.world_size):
            p, d = self.dep.pcaches[r].raw(), self.dep.dcaches[r].raw()
            assert np.array_equal(p[:, :, [src]], d[:, :, [dst]]), f"rank {r}: decode block {dst} differs"


def _name(dep: Deployment, role: str, rank: int) -> str:
    group = dep.prefill if role == "prefill" else dep.decode
    return f"{group.name}-{rank}"


def _socket(dep: Deployment, rank: int) -> Path:
    return Path(dep.config.endpoint(dep.prefill, rank)[len("ipc://") :])


def _kill(dep: Deployment, name: str) -> float:
    d = dep.cluster.daemon(name)
    d.popen.send_signal(signal.SIGKILL)
    assert d.popen.wait(timeout=10) == -signal.SIGKILL
    return time.monotonic()


def _restart(dep: Deployment, name: str, record: dict[str, Any]) -> None:
    """Start ``name`` again, alone; the seconds until it serves go into the case's figures."""
    started = time.monotonic()
    dep.cluster.restart(name)
    record["rejoin_s"] = round(time.monotonic() - started, 2)


def _serve_again(dep: Deployment, rank: int, record: dict[str, Any]) -> None:
    """Start prefill ``rank`` again, alone, and register its worker's cache with it."""
    _restart(dep, _name(dep, "prefill", rank), record)
    dep.workers[rank].register(dep.pcaches[rank])


def _barrier_status(dep: Deployment) -> dict[str, Any]:
    """What the barrier service reports (asked with the daemon keys)."""
    reply = status(dep.config.barrier_endpoint(), 10.0, credentials=security.credentials(dep.config, "daemon"))
    return dict(json.loads(reply.report))


def _wait_state(dep: Deployment, rank: int, rid: str, state: str) -> None:
    def there() -> bool:
        return any(r["request_id"] == rid and r["state"] == state for r in dep.status(rank)["requests"])

    dep.wait_until(f"{rid} to be {state} on rank {rank}", there)


def _results(dep: Deployment, rid: str) -> dict[int, Any]:
    """The results the scheduler has of ``rid`` so far, by rank."""
    assert dep.sched is not None
    dep.sched.collect(0.0)
    out = dep.sched.outcome(rid)
    return dict(out.results) if out is not None else {}


def _outcome_on(dep: Deployment, rid: str, rank: int, timeout_s: float) -> PrefillOutcome:
    """Wait until prefill ``rank`` reported on ``rid`` (other ranks may never)."""
    assert dep.sched is not None
    out = _reported(dep.sched, rid, rank, timeout_s, lambda o: set(o.results))
    assert isinstance(out, PrefillOutcome)
    return out


def _decode_told(dep: Deployment, rid: str, rank: int, timeout_s: float) -> DecodeOutcome:
    """Wait until decode ``rank`` told the engine how ``rid`` went (other ranks may never)."""
    assert dep.dec is not None
    out = _reported(dep.dec, rid, rank, timeout_s, lambda o: o.reported)
    assert isinstance(out, DecodeOutcome)
    return out


def _reported(
    client: PrefillScheduler | DecodeEngine, rid: str, rank: int, timeout_s: float, ranks: Callable[[Any], set[int]]
) -> PrefillOutcome | DecodeOutcome:
    """Wait until ``rank`` is among the ``ranks`` of ``client``'s outcome for ``rid``."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = client.outcome(rid)
        if out is not None and rank in ranks(out):
            return out
        left = deadline - time.monotonic()
        assert left > 0, f"rank {rank} did not report on {rid} within {timeout_s}s ({out})"
        client.collect(min(left, 0.2))


@pytest.mark.slow
def test_a_second_daemon_for_a_live_endpoint_refuses_and_names_the_running_one(record: dict[str, Any]) -> None:
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record)
        traffic.ok(1)
        first = dep.cluster.daemon(_name(dep, "prefill", 0))
        cmd = [sys.executable, "-m", "kvxferd", "serve", "--group", dep.prefill.name, "--rank", "0"]
        cmd += ["--config", str(dep.cluster.config_path)]
        asked = time.monotonic()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        record.update(fault="a second serve for prefill rank 0", report_s=round(time.monotonic() - asked, 2))
        record["affected"] = "none: the newcomer exits 1 naming the pid"
        assert second.returncode != 0
        assert f"is served by a running process (pid {first.popen.pid})" in second.stderr, second.stderr
        # the running daemon kept its socket and serves on
        assert _socket(dep, 0).is_socket()
        assert first.popen.poll() is None
        traffic.ok(2)


@pytest.mark.slow
def test_a_killed_prefill_rank_rejoins_its_running_group_and_its_requests_fail_on_the_others(
    record: dict[str, Any], transport: str
) -> None:
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None
        traffic.ok(3)
        # a request in flight: both ranks hold it, only rank 0 has its layers (it arrives), then rank 1 dies
        info, _, _ = traffic.half_done(0)
        fault = _kill(dep, _name(dep, "prefill", 1))
        out = _outcome_on(dep, info.request_id, 0, BARRIER_S + SLACK_S + 5)
        took = time.monotonic() - fault
        report = out.results[0]
        assert report.status is Status.FAILED, report
        assert "rank 1 of group prefill stopped serving" in report.reason, report.reason
        record.update(fault="SIGKILL prefill rank 1", report_s=round(took, 2))
        record["affected"] = "1 in flight: failed on rank 0 naming rank 1, rank 1 'gone' at the scheduler"
        # the barrier ends it once rank 1's heartbeats stop, long before its round would time out
        assert took <= 3 * HEARTBEAT_S + SLACK_S, f"the failure came {took:.1f}s after the fault"
        assert _socket(dep, 1).exists()  # the dead rank's socket file stays until its next start
        # the scheduler saw rank 1's connection close: the instance is decided without its result
        out = dep.sched.wait(info.request_id, SLACK_S + 5)
        assert not out.ok and set(out.results) == {0}, out
        assert "prefill rank 1 at ipc://" in out.gone[1] and "is gone" in out.gone[1], out.gone

        # only rank 1 starts again; it joins the serving group at once (no cold-start barrier)
        _restart(dep, _name(dep, "prefill", 1), record)
        dep.workers[1].register(dep.pcaches[1])  # the restarted daemon learns the worker's cache anew
        # decode rank 1 hears of the request from rank 1's successor: every decode rank told, once
        assert dep.dec is not None
        told = dep.dec.wait(info.request_id, BARRIER_S + SLACK_S + 5)
        assert told.reusable and not told.ready and not told.duplicates, told
        assert set(told.statuses.values()) == {Status.FAILED}, told
        record["affected"] += "; both decode ranks told once (rank 1 by the restarted rank)"
        traffic.ok(3)
        assert dep.status(0)["tables"]["requests"] == 0 and dep.status(1)["tables"]["requests"] == 0


@pytest.mark.slow
def test_a_drain_finishes_the_requests_in_flight_then_the_daemon_exits(record: dict[str, Any], transport: str) -> None:
    """SIGTERM of prefill rank 0 while a request is held on both ranks: the daemon drains (new
    cache_infos refused), the request's layers come, it completes ok on both ranks with its bytes
    in place, and the daemon exits 0 as soon as it is idle, long before ``shutdown_s``."""
    with deploy(faults(shutdown_s=60)) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(1)
        info, src, dst = traffic.info()
        dep.sched.submit(info)
        _wait_state(dep, 0, info.request_id, "wait_signal")
        name = _name(dep, "prefill", 0)
        daemon = dep.cluster.daemon(name)
        daemon.popen.send_signal(signal.SIGTERM)
        fault = time.monotonic()
        dep.wait_until("rank 0 to drain", lambda: dep.status(0)["state"] == "draining")
        assert daemon.popen.poll() is None  # it holds a request: it waits for it
        traffic.signal(info, range(dep.prefill.world_size))
        out = dep.sched.wait(info.request_id, BARRIER_S + SLACK_S + 10)
        assert out.ok, out.results
        assert dep.dec.wait(info.request_id, 10.0).ready
        traffic.verify(src, dst)
        assert daemon.popen.wait(timeout=30) == 0
        took = time.monotonic() - fault
        record.update(fault="SIGTERM prefill rank 0, a request in flight", report_s=round(took, 2))
        record["affected"] = "1 held: completed ok during the drain, then the daemon exited 0"
        assert took < 30, f"the drain took {took:.1f}s"
        assert not _socket(dep, 0).exists()
        _restart(dep, name, record)
        dep.workers[0].register(dep.pcaches[0])
        traffic.ok(2)


@pytest.mark.slow
def test_a_second_signal_ends_the_drain_at_once_and_fails_what_is_left(record: dict[str, Any], transport: str) -> None:
    with deploy(faults(shutdown_s=120)) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None
        traffic.ok(1)
        info, _, _ = traffic.info()
        dep.sched.submit(info)  # held by both ranks, no layer ever signalled: the drain cannot finish
        _wait_state(dep, 0, info.request_id, "wait_signal")
        name = _name(dep, "prefill", 0)
        daemon = dep.cluster.daemon(name)
        daemon.popen.send_signal(signal.SIGTERM)
        dep.wait_until("rank 0 to drain", lambda: dep.status(0)["state"] == "draining")
        assert daemon.popen.poll() is None  # the first signal drains: the request still holds it
        asked = time.monotonic()
        daemon.popen.send_signal(signal.SIGTERM)
        assert daemon.popen.wait(timeout=30) == 0
        record.update(fault="SIGTERM twice, prefill rank 0, drain blocked", report_s=round(time.monotonic() - asked, 2))
        record["affected"] = "1 held: one verdict, reported by rank 1 and told to both decode ranks"
        assert time.monotonic() - asked < 10, "the second signal did not stop the daemon at once"
        out = _outcome_on(dep, info.request_id, 1, BARRIER_S + SLACK_S + 10)
        # one ending: rank 0 exited without waiting for the verdict and reports nothing (it is gone
        # for the scheduler); rank 1 reports the verdict, and both decode ranks hear it alike
        assert set(out.results) == {1} and 0 in out.gone, (out.results, out.gone)
        assert out.results[1].status is Status.FAILED and "a second signal" in out.results[1].reason
        told = dep.dec.wait(info.request_id, BARRIER_S + SLACK_S + 10)
        while set(told.reported) != {0, 1}:
            assert dep.dec.collect(10.0), f"decode ranks {told.reported} only"
        assert told.reasons[0] == told.reasons[1] and out.results[1].reason in told.reasons[0], told.reasons
        assert not _socket(dep, 0).exists() and not _socket(dep, 0).with_suffix(".sock.lock").exists()

        _restart(dep, name, record)
        dep.workers[0].register(dep.pcaches[0])
        traffic.ok(2)


@pytest.mark.slow
def test_a_restarted_barrier_service_loses_no_request_in_flight(record: dict[str, Any], transport: str) -> None:
    # verdict_s far beyond the test: a request the new service did not recover would hang, not fail
    with deploy(faults(verdict_s=60)) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        # rank 0 wrote and arrived (the old service heard it), rank 1 has not written yet
        info, src, dst = traffic.half_done(0)
        fault = _kill(dep, "barrier")
        _restart(dep, "barrier", record)
        traffic.signal(info, [1])
        out = dep.sched.wait(info.request_id, BARRIER_S + SLACK_S + 10)
        record.update(fault="SIGKILL barrier service", report_s=round(time.monotonic() - fault, 2))
        record["affected"] = "1 half arrived: completed ok after the restart"
        assert out.ok, out.results
        assert dep.dec.wait(info.request_id, 10.0).ready
        traffic.verify(src, dst)
        traffic.ok(2)


@pytest.mark.slow
def test_a_prefill_rank_restarted_with_the_barrier_service_rejoins_whoever_is_heard_first(
    record: dict[str, Any],
) -> None:
    """Issue 23, item 3: the barrier service and prefill rank 1 die together and start again;
    rank 1 reaches the new service before rank 0's first heartbeat does (rank 0 is held with
    SIGSTOP until rank 1 waits in the start-up round). Rank 1 joins the running group once rank
    0 is heard, instead of taking the group for a cold start and giving up."""
    with deploy(faults(startup_s=8)) as dep:
        traffic = Traffic(dep, record)
        traffic.ok(2)
        fault = _kill(dep, "barrier")
        _kill(dep, _name(dep, "prefill", 1))
        survivor = dep.cluster.daemon(_name(dep, "prefill", 0)).popen
        survivor.send_signal(signal.SIGSTOP)
        try:
            _restart(dep, "barrier", record)
            joiner = dep.cluster.spawn(_name(dep, "prefill", 1))
            dep.wait_until("rank 1 to wait in the start-up round", lambda: _barrier_status(dep)["sizes"]["open"] == 1)
        finally:
            survivor.send_signal(signal.SIGCONT)
        dep.cluster.wait_ready([joiner], time.monotonic() + 30)
        record.update(fault="SIGKILL barrier + prefill rank 1, rank 1 back before rank 0's heartbeat")
        record["report_s"] = round(time.monotonic() - fault, 2)
        record["affected"] = "none in flight: rank 1 joined the running group, then served"
        dep.workers[1].register(dep.pcaches[1])
        traffic.ok(3)


@pytest.mark.slow
def test_a_stopped_barrier_service_completes_what_arrived_while_it_was_stopped(
    record: dict[str, Any], transport: str
) -> None:
    """SIGSTOP of the barrier service past its round timeout and past every rank's heartbeat
    deadline, with a request half arrived and its second rank arriving while the service is
    stopped: once continued, the service reads what waited before it runs its timers (and words
    count as heartbeats, so no rank is taken for stopped), so the request completes, ok on both
    ranks, ready at decode with its bytes; later ones move."""
    with deploy(faults(verdict_s=60)) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        info, src, dst = traffic.half_done(0)
        barrier = dep.cluster.daemon("barrier")
        barrier.popen.send_signal(signal.SIGSTOP)
        fault = time.monotonic()
        try:
            traffic.signal(info, [1])
            _wait_state(dep, 1, info.request_id, "arrived")
            # stopped for longer than the round timeout: the round's deadline passes meanwhile
            stopped_until = fault + BARRIER_S + 1.0
            while (left := stopped_until - time.monotonic()) > 0:
                dep.sched.collect(left)  # waits without sleeping (nothing can end while it is stopped)
            assert dep.sched.outcome(info.request_id) is not None
            assert not dep.sched.outcome(info.request_id).results, "a rank ended it while the barrier was stopped"
        finally:
            barrier.popen.send_signal(signal.SIGCONT)
        continued = time.monotonic()
        out = dep.sched.wait(info.request_id, BARRIER_S + SLACK_S + 10)
        record.update(fault="SIGSTOP barrier service past its timeout", report_s=round(time.monotonic() - continued, 2))
        assert (
            len({r.status for r in out.results.values()}) == 1 and len({r.reason for r in out.results.values()}) == 1
        ), out.results
        assert out.ok, out.results  # rank 1's Arrive came in time: it is not judged late
        told = dep.dec.wait(info.request_id, 10.0)
        assert told.reusable and told.ready, (out, told)
        traffic.verify(src, dst)
        record["affected"] = "1 arrived while stopped: completed ok on both ranks, ready, verified"
        traffic.ok(3)


@pytest.mark.slow
def test_a_new_worker_cache_is_accepted_while_requests_are_in_flight_and_those_fail(
    record: dict[str, Any], transport: str
) -> None:
    """The prefill worker of rank 1 dies and its successor registers a new cache while a request
    is in flight: the registration is accepted, that request fails on both ranks saying why, and
    the next requests read the new cache."""
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None
        traffic.ok(2)
        info, _, _ = traffic.half_done(0)
        fresh = HostKVCache.create(dep.shape)
        old = dep.pcaches[1]
        try:
            fault = time.monotonic()
            dep.workers[1].register(fresh)
            dep.pcaches[1] = fresh
            out = dep.sched.wait(info.request_id, BARRIER_S + SLACK_S + 10)
            record.update(fault="prefill worker 1 registers a new cache", report_s=round(time.monotonic() - fault, 2))
            record["affected"] = "1 in flight: failed on both ranks, reason names the registration"
            assert {r.status for r in out.results.values()} == {Status.FAILED}, out.results
            assert all("registered a new cache with prefill rank 1" in r.reason for r in out.results.values())
            traffic.ok(3)  # fills and checks rank 1's blocks in the new cache
        finally:
            old.close()
            old.unlink()


@pytest.mark.slow
def test_a_killed_decode_daemon_fails_its_requests_at_once_and_is_written_again_once_back(
    record: dict[str, Any], transport: str
) -> None:
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        _kill(dep, _name(dep, "decode", 1))
        # while it is gone, a request for it fails on every prefill rank, promptly, saying so
        info, _, _ = traffic.info()
        asked = time.monotonic()
        dep.sched.submit(info)
        traffic.signal(info, range(dep.prefill.world_size))
        out = dep.sched.wait(info.request_id, 20.0)
        took = time.monotonic() - asked
        assert {r.status for r in out.results.values()} == {Status.FAILED}, out.results
        assert all("rank 1 at" in r.reason and "is gone" in r.reason for r in out.results.values()), out.results
        record.update(fault="SIGKILL decode rank 1", report_s=round(took, 2))
        record["affected"] = "1 sent while gone: failed on both ranks ('is gone')"
        assert took < dep.config.timeouts.peer_s, f"the failure took {took:.1f}s"
        _restart(dep, _name(dep, "decode", 1), record)
        # prefill rank 1's notice of that failure waited in its socket for the new daemon, which
        # keeps it until an engine registers: the engine then hears from both decode ranks
        dep.wait_until(
            "the new decode rank 1 to take the waiting notice",
            lambda: dep.status(1, "decode")["counters"].get("peer_TransferResult", 0) >= 1,
        )
        _register_decode(dep, 1, dep.dcaches[1])  # the engine registers with the new daemon
        told = dep.dec.wait(info.request_id, 10.0)
        assert told.reusable and not told.ready, told
        traffic.ok(3)


@pytest.mark.slow
def test_notices_unread_by_a_killed_decode_daemon_reach_the_engine_through_its_successor(
    record: dict[str, Any],
) -> None:
    """Decode rank 1 is stopped, two requests complete (their notices for it wait unread in its
    socket), then it is killed: the notices die with it. Prefill rank 1 kept them unconfirmed and
    sends them again once the restarted daemon connects; the engine, which registers the same
    cache with it again (the same generation: the bytes went into its memory), hears each once, as
    ready, and the bytes are in place. On shm only: an rdma write needs its target to run, so a
    stopped decode daemon fails it. Prefill rank 1 holds its ok results until decode rank 1
    confirms how its engine was told (issue 23, item 8). (peer_s is long, so the confirmation comes
    before prefill gives up waiting for it.)"""
    with deploy(faults(peer_s=60)) as dep:
        traffic = Traffic(dep, record, "shm")
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)

        def unconfirmed() -> int:
            return int(dep.status(1)["peers"][f"{dep.decode.name}:1"]["unconfirmed"])

        dep.wait_until("decode rank 1 to confirm every notice so far", lambda: unconfirmed() == 0)
        victim = dep.cluster.daemon(_name(dep, "decode", 1))
        victim.popen.send_signal(signal.SIGSTOP)
        unread = []
        for _ in range(2):
            info, src, dst = traffic.info()
            dep.sched.submit(info)
            traffic.signal(info, range(dep.prefill.world_size))
            assert _outcome_on(dep, info.request_id, 0, 20.0).results[0].status is Status.OK
            unread.append((info.request_id, src, dst))
        dep.wait_until("prefill rank 1 to hold both notices unconfirmed", lambda: unconfirmed() == 2)
        assert all(1 not in _results(dep, rid) for rid, _, _ in unread), "ok before decode confirmed"
        fault = _kill(dep, _name(dep, "decode", 1))  # SIGKILL works on a stopped process
        _restart(dep, _name(dep, "decode", 1), record)
        _register_decode(dep, 1, dep.dcaches[1])
        for rid, src, dst in unread:
            told = dep.dec.wait(rid, 10.0)
            assert told.ready and not told.duplicates, told
            traffic.verify(src, dst)
            mine = _outcome_on(dep, rid, 1, 10.0).results[1]
            assert mine.status is Status.OK, mine
        record.update(fault="SIGKILL decode rank 1 with notices unread", report_s=round(time.monotonic() - fault, 2))
        record["affected"] = "2 notices unread: sent again, each told once (ready, verified; the same registration)"
        dep.wait_until("prefill rank 1 to hold no notice unconfirmed", lambda: unconfirmed() == 0)
        traffic.ok(3)


def _register_decode(dep: Deployment, rank: int, cache: HostKVCache) -> None:
    assert dep.dec is not None
    dep.dec.register_rank(rank, cache)


@pytest.mark.slow
def test_notices_for_a_dead_decode_engine_reach_its_successor_and_no_prefill_rank_keeps_them(
    record: dict[str, Any],
) -> None:
    """Issue 23, item 4: the decode engine dies (its connections close); two requests complete on
    prefill meanwhile, and their notices cannot be handed to it. Each decode daemon holds them;
    once a new engine registers it hears them (as failures: they went into the dead engine's
    cache), and every prefill rank's notices are confirmed, none kept. Prefill reports them failed
    too, once confirmed (issue 23, item 8), not ok while no engine was told."""
    with deploy(faults(peer_s=60)) as dep:
        traffic = Traffic(dep, record, "shm")
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        world = range(dep.prefill.world_size)

        def unconfirmed() -> list[int]:
            return [int(dep.status(r)["peers"][f"{dep.decode.name}:{r}"]["unconfirmed"]) for r in world]

        dep.wait_until("every notice so far to be confirmed", lambda: unconfirmed() == [0, 0])
        dep.dec.close()  # the engine dies
        fault = time.monotonic()
        dep.dec = DecodeEngine([dep.config.endpoint(dep.decode, r) for r in world], credentials=dep.creds)
        lost = []
        for _ in range(2):
            info, _, _ = traffic.info()
            dep.sched.submit(info)
            traffic.signal(info, world)
            lost.append(info.request_id)
        dep.wait_until(
            "each decode daemon to hold both notices",
            lambda: [dep.status(r, "decode")["held"] for r in world] == [2, 2],
        )
        assert unconfirmed() == [2, 2]
        assert all(not _results(dep, rid) for rid in lost), "ok on prefill while no decode engine was told"
        dep.dec.register(dep.dcaches)  # a new engine, with its own cache
        for rid in lost:
            told = dep.dec.wait(rid, 20.0)
            while set(told.reported) != set(world):
                assert dep.dec.collect(10.0), f"a decode rank never told the new engine about {rid}"
            assert not told.ready and "registration" in told.reasons[0], told
            out = dep.sched.wait(rid, 20.0)
            while not out.complete:
                out = _outcome_on(dep, rid, min(set(world) - set(out.results)), 20.0)
            assert {r.code for r in out.results.values()} == {"not_registered"}, out.results
            assert not out.ok and out.status is Status.FAILED
        dep.wait_until("no prefill rank to keep a notice", lambda: unconfirmed() == [0, 0])
        record.update(
            fault="decode engine killed, 2 requests, a new engine", report_s=round(time.monotonic() - fault, 2)
        )
        record["affected"] = (
            "2 meanwhile: held at decode, heard by the new engine as failures, confirmed, so on prefill"
        )
        traffic.ok(3)


@pytest.mark.slow
def test_bytes_written_into_an_old_decode_cache_are_never_reported_ready_for_a_new_one(
    record: dict[str, Any], transport: str
) -> None:
    """Prefill rank 1 writes a request into decode rank 1's cache; then the decode engine registers
    a new cache there; then the request is released. Decode rank 1 must not call it ready: its
    bytes are in the old cache; and prefill rank 1 must not call it ok (issue 23, item 8): a rank's
    ok stands only once its decode rank confirmed it handed the KVReady on as ready. Later requests
    are written into the new cache and verified."""
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        info, _, _ = traffic.half_done(1)  # written into the old cache
        fresh = HostKVCache.create(dep.shape)
        old = dep.dcaches[1]
        try:
            _register_decode(dep, 1, fresh)
            dep.dcaches[1] = fresh
            fault = time.monotonic()
            traffic.signal(info, [0])
            notice = dep.dec.wait(info.request_id, BARRIER_S + SLACK_S + 10)
            while 1 not in notice.reported:
                assert dep.dec.collect(10.0), "decode rank 1 never reported"
            record.update(fault="decode engine 1 registers a new cache", report_s=round(time.monotonic() - fault, 2))
            record["affected"] = "1 written into the old cache: failed at decode rank 1, not ready"
            assert notice.statuses[1] is Status.FAILED, notice
            assert "registration" in notice.reasons[1], notice.reasons
            out = _outcome_on(dep, info.request_id, 1, 10.0)
            while 0 not in out.results:
                out = _outcome_on(dep, info.request_id, 0, 10.0)
            mine = out.results[1]
            assert mine.status is Status.FAILED and mine.code == ErrorCode.NOT_REGISTERED.value, mine
            assert "registration" in mine.reason, mine
            assert out.results[0].status is Status.OK, out.results  # decode rank 0 handed its KVReady on as ready
            assert not out.ok and out.status is Status.FAILED, out
            record["affected"] += "; prefill rank 1 failed too (its decode rank handed it on as a failure)"
            traffic.ok(3)
        finally:
            old.close()
            old.unlink()


def test_a_request_reserved_in_an_old_decode_cache_is_never_written_into_a_new_one(
    record: dict[str, Any], transport: str
) -> None:
    """The decode engine reserves a request's blocks, then registers a new cache on decode rank 1
    before any layer is written (the soak's "new-decode" fault). In the new cache those block ids
    may hold other requests: prefill rank 1 must not write them there, nor may decode call the
    request ready. The request fails on every rank, naming the registration its blocks were
    reserved in; the new cache's block is untouched; later requests go into the new cache
    (issue 23: seen once in a 10-minute soak before CacheInfo named that registration)."""
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        info, _, dst = traffic.info()  # reserved in the registrations held now
        old_generation = dep.dec.generations[1]
        dep.sched.submit(info)
        fresh = HostKVCache.create(dep.shape)
        fresh.raw()[:] = 7  # what other requests' bytes would be
        old = dep.dcaches[1]
        try:
            _register_decode(dep, 1, fresh)
            dep.dcaches[1] = fresh
            assert dep.dec.generations[1] not in ("", old_generation)
            fault = time.monotonic()
            traffic.signal(info, range(dep.prefill.world_size))
            out = dep.sched.wait(info.request_id, BARRIER_S + SLACK_S + 10)
            notice = dep.dec.wait(info.request_id, BARRIER_S + SLACK_S + 10)
            took = round(time.monotonic() - fault, 2)
            record.update(fault="decode engine 1 registers a new cache after cache_info", report_s=took)
            assert not out.ok and out.status is Status.FAILED, out.results
            # rank 1 fails the write once it knows of the new registration; one posted before that
            # went to the old one (rdma: whose region its decode daemon closed; shm: decode calls it
            # failed, and rank 0 may be ok, its decode rank ready): each failure names the old one
            assert out.results[1].status is Status.FAILED, out.results
            reasons = [r.reason for r in out.results.values() if r.status is not Status.OK]
            assert all(old_generation in why for why in reasons), reasons
            assert not notice.ready, notice
            assert np.all(fresh.raw()[:, :, [dst]] == 7), "bytes reserved in the old cache went into the new one"
            record["affected"] = "1 reserved in the old cache: failed everywhere, the new cache untouched"
            traffic.ok(3)
        finally:
            old.close()
            old.unlink()


@pytest.mark.slow
def test_a_stopped_prefill_rank_fails_its_requests_everywhere_and_serves_again_when_continued(
    record: dict[str, Any],
    transport: str,
) -> None:
    """SIGSTOP of prefill rank 1: once its heartbeats stop, a request in flight fails on rank 0,
    naming rank 1; after SIGCONT rank 1 reports the same verdict, and later requests move."""
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None
        traffic.ok(2)
        info, _, _ = traffic.half_done(0)
        stopped = dep.cluster.daemon(_name(dep, "prefill", 1))
        stopped.popen.send_signal(signal.SIGSTOP)
        fault = time.monotonic()
        try:
            out = _outcome_on(dep, info.request_id, 0, BARRIER_S + SLACK_S + 5)
            took = time.monotonic() - fault
            report = out.results[0]
            assert report.status is Status.FAILED and "rank 1 of group prefill stopped serving" in report.reason
            record.update(fault="SIGSTOP prefill rank 1", report_s=round(took, 2))
            record["affected"] = "1 in flight: failed on both ranks, same reason"
            assert took <= 3 * HEARTBEAT_S + SLACK_S, f"the failure came {took:.1f}s after the fault"
        finally:
            stopped.popen.send_signal(signal.SIGCONT)
        out = dep.sched.wait(info.request_id, 20.0)
        assert {r.status for r in out.results.values()} == {Status.FAILED}
        assert out.results[1].reason == out.results[0].reason  # the same verdict on both ranks
        # rank 1's first heartbeat after SIGCONT may still be on its way while rank 0 admits the next
        # request: the barrier would take rank 1 as stopped for it; wait until it heard rank 1
        dep.wait_until("the barrier to hear rank 1 again", lambda: not _barrier_status(dep)["stopped"])
        traffic.ok(3)
        assert dep.status(1)["tables"]["requests"] == 0


@pytest.mark.slow
def test_a_stopped_prefill_rank_writes_nothing_into_blocks_its_decode_rank_was_told_are_free(
    record: dict[str, Any], transport: str
) -> None:
    """Prefill rank 1 has written layer 0 of a request when it is stopped (SIGSTOP); the rest of
    its layer signals wait in its socket. The barrier service counts it stopped, the request fails
    and decode rank 1 is told so: its engine reuses the block (its own bytes go in). When rank 1
    runs again it must not write the waiting layers into that block: a rank the barrier service
    heard nothing of for 3 heartbeats stops writing what it holds before it reads anything."""
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        info, _, dst = traffic.info()
        dep.sched.submit(info)
        dep.workers[1].layer_ready(info.step, 0, (SlotChunk(info.slot, 0, info.num_tokens, info.step),))
        _wait_state(dep, 1, info.request_id, "active")
        stopped = dep.cluster.daemon(_name(dep, "prefill", 1))
        stopped.popen.send_signal(signal.SIGSTOP)
        fault = time.monotonic()
        try:
            for layer in range(1, dep.config.kv.num_layers):
                dep.workers[1].layer_ready(info.step, layer)
            traffic.signal(info, [0])
            told = dep.dec.wait(info.request_id, 3 * HEARTBEAT_S + SLACK_S + 10)
            while told.reported != {0, 1}:
                assert dep.dec.collect(10.0), "decode rank 1 was never told"
            assert told.reusable and not told.ready, told
            fill(dep.dcaches[1], [dst], seed=424242)  # the engine reuses the block
            reused = dep.dcaches[1].raw()[:, :, [dst]].copy()
        finally:
            stopped.popen.send_signal(signal.SIGCONT)
        mine = _outcome_on(dep, info.request_id, 1, 20.0).results[1]
        record.update(fault="SIGSTOP prefill rank 1 mid-request, decode told, block reused, SIGCONT")
        record["report_s"] = round(time.monotonic() - fault, 2)
        assert mine.status is Status.FAILED, mine
        dep.wait_until("rank 1 to hold nothing", lambda: dep.status(1)["tables"]["requests"] == 0)
        assert np.array_equal(dep.dcaches[1].raw()[:, :, [dst]], reused), "rank 1 wrote into a reused block"
        record["affected"] = "1 in flight: failed everywhere; nothing written after decode was told"
        dep.wait_until("the barrier to hear rank 1 again", lambda: not _barrier_status(dep)["stopped"])
        traffic.ok(3)


@pytest.mark.slow
def test_a_stopped_decode_daemon_delays_notices_but_loses_none(record: dict[str, Any]) -> None:
    """SIGSTOP of decode rank 1: prefill keeps writing (shm goes into the engine's memory), the
    notices for decode rank 1 wait in its socket; after SIGCONT every request is ready, verified."""
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(1)
        stopped = dep.cluster.daemon(_name(dep, "decode", 1))
        stopped.popen.send_signal(signal.SIGSTOP)
        fault = time.monotonic()
        try:
            held = []
            for _ in range(3):
                info, src, dst = traffic.info()
                dep.sched.submit(info)
                traffic.signal(info, range(dep.prefill.world_size))
                assert _outcome_on(dep, info.request_id, 0, 20.0).results[0].status is Status.OK
                held.append((info.request_id, src, dst))
            dep.dec.collect(0.5)
            outcomes = [dep.dec.outcome(rid) for rid, _, _ in held]
            assert all(o is None or not o.ready for o in outcomes), "ready without decode rank 1's notice"
            # prefill rank 1 says ok only once decode rank 1 confirmed its engine was told
            assert all(1 not in _results(dep, rid) for rid, _, _ in held)
        finally:
            stopped.popen.send_signal(signal.SIGCONT)
            continued = time.monotonic()
        for rid, src, dst in held:
            assert dep.dec.wait(rid, 20.0).ready
            assert dep.sched.wait(rid, 20.0).ok
            traffic.verify(src, dst)
        record.update(fault="SIGSTOP decode rank 1", report_s=round(time.monotonic() - continued, 2))
        record["affected"] = f"3 written while stopped ({continued - fault:.2f}s): ready after SIGCONT, verified"
        traffic.ok(2)


@pytest.mark.slow
def test_a_worker_that_dies_mid_step_fails_its_request_on_every_rank_after_progress_s(
    record: dict[str, Any], transport: str
) -> None:
    """Prefill rank 1's model worker signals layer 0 of a step, then dies: the request fails on
    both ranks once ``progress_s`` passed, naming the layer it waited for; a new worker registers
    the same cache and requests move again."""
    progress_s = 2.0
    with deploy(faults(progress_s=progress_s)) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None
        traffic.ok(2)
        info, _, _ = traffic.info()
        dep.sched.submit(info)
        traffic.signal(info, [0])
        dep.workers[1].layer_ready(info.step, 0, (SlotChunk(info.slot, 0, info.num_tokens, info.step),))
        _wait_state(dep, 1, info.request_id, "active")
        dep.workers[1].close()  # the worker process is gone
        fault = time.monotonic()
        out = dep.sched.wait(info.request_id, progress_s + SLACK_S + 10)
        took = time.monotonic() - fault
        assert {r.status for r in out.results.values()} == {Status.FAILED}, out.results
        assert all(f"waiting for layer 1 of step {info.step}" in r.reason for r in out.results.values()), out.results
        record.update(fault=f"prefill worker 1 dies mid-step (progress_s {progress_s:g})", report_s=round(took, 2))
        record["affected"] = "1 in flight: failed on both ranks naming the layer"
        assert took <= progress_s + SLACK_S, f"the failure came {took:.1f}s after the worker died"
        dep.workers[1] = PrefillWorker(dep.config.endpoint(dep.prefill, 1), credentials=dep.creds)
        dep.workers[1].register(dep.pcaches[1])
        traffic.ok(3)


@pytest.mark.slow
def test_a_scheduler_that_dies_leaves_its_requests_to_end_and_a_new_one_is_served(
    record: dict[str, Any], transport: str
) -> None:
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        info, src, dst = traffic.info()
        dep.sched.submit(info)
        _wait_state(dep, 1, info.request_id, "wait_signal")
        dep.sched.close()  # the scheduler process is gone; its request's layers still come
        fault = time.monotonic()
        traffic.signal(info, range(dep.prefill.world_size))
        assert dep.dec.wait(info.request_id, 20.0).ready  # decode is told as ever
        record.update(fault="the scheduler dies", report_s=round(time.monotonic() - fault, 2))
        record["affected"] = "1 submitted: completes, ready at decode (its results go nowhere)"
        traffic.verify(src, dst)
        endpoints = [dep.config.endpoint(dep.prefill, r) for r in range(dep.prefill.world_size)]
        dep.sched = PrefillScheduler(endpoints, credentials=dep.creds)
        traffic.ok(3)
        dep.wait_until(
            "both ranks to empty their tables",
            lambda: all(dep.status(r)["tables"]["requests"] == 0 for r in range(dep.prefill.world_size)),
        )


@pytest.mark.slow
def test_a_request_submitted_after_a_prefill_rank_died_is_decided_without_it(record: dict[str, Any]) -> None:
    """Prefill rank 1 is killed and stays down; the scheduler saw its connection close. A request
    submitted to both ranks afterwards is decided as soon as rank 0 reports: rank 1 counts as gone
    for it too (its cache_info waits in the scheduler's socket for whatever starts there next)."""
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record)
        assert dep.sched is not None
        traffic.ok(2)
        _kill(dep, _name(dep, "prefill", 1))
        dep.wait_until("the scheduler to see rank 1 gone", lambda: bool(dep.sched.collect(0.05)) or 1 in dep.sched.gone)
        info, _, _ = traffic.info()
        fault = time.monotonic()
        dep.sched.submit(info)
        traffic.signal(info, [0])
        out = dep.sched.wait(info.request_id, 3 * HEARTBEAT_S + SLACK_S + 5)
        took = time.monotonic() - fault
        assert not out.ok and set(out.results) == {0} and out.results[0].status is Status.FAILED, out
        # (rank 0's result may decide it first: nobody else spoke in its admission round, so it is
        # an ending of its own, with a code; rank 1 is counted gone a second after the submit)
        dep.wait_until("rank 1 to count gone", lambda: bool(dep.sched.collect(0.05)) or 1 in out.gone)
        assert "prefill rank 1 at ipc://" in out.gone[1] and "is gone" in out.gone[1], out.gone
        record.update(fault="SIGKILL prefill rank 1, then a request to both ranks", report_s=round(took, 2))
        record["affected"] = "1 submitted after: failed on rank 0, decided with rank 1 'gone' at the scheduler"
        assert took <= 3 * HEARTBEAT_S + SLACK_S, f"decided {took:.1f}s after it was submitted"
        _serve_again(dep, 1, record)
        traffic.ok(3)


@pytest.mark.slow
def test_a_rank_that_comes_back_after_the_barrier_service_restarted_reports_the_groups_ending(
    record: dict[str, Any],
) -> None:
    """Issue 23, item 6: prefill rank 1 is killed; a request submitted to both ranks fails on rank
    0 (rank 1 stopped serving); then the barrier service is killed and started again, then rank 1.
    Rank 1's new process gets the request's cache_info (it waited in the scheduler's socket) and
    must report the group's ending, the same status and reason as rank 0: the new service recalls
    the verdict from its journal instead of opening the key anew for rank 1 alone."""
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        _kill(dep, _name(dep, "prefill", 1))
        dep.wait_until("the scheduler to see rank 1 gone", lambda: bool(dep.sched.collect(0.05)) or 1 in dep.sched.gone)
        info, _, _ = traffic.info()
        dep.sched.submit(info)
        traffic.signal(info, [0])
        first = _outcome_on(dep, info.request_id, 0, 3 * HEARTBEAT_S + SLACK_S + 5).results[0]
        assert first.status is Status.FAILED and "rank 1 of group prefill" in first.reason, first
        _kill(dep, "barrier")
        _restart(dep, "barrier", record)
        fault = time.monotonic()
        _serve_again(dep, 1, record)
        late = _outcome_on(dep, info.request_id, 1, BARRIER_S + SLACK_S + 10).results[1]
        record.update(fault="SIGKILL prefill rank 1, a request, SIGKILL barrier, both started again")
        record["report_s"] = round(time.monotonic() - fault, 2)
        record["affected"] = "1 reaching rank 1's new process: the verdict recalled, same reason as rank 0"
        assert (late.status, late.reason, late.code) == (first.status, first.reason, ""), (first, late)
        told = dep.dec.wait(info.request_id, 10.0)
        assert told.reusable and not told.ready and not told.duplicates, told
        traffic.ok(3)


def test_a_round_whose_ranks_all_died_while_the_barrier_service_was_down_still_reaches_decode(
    record: dict[str, Any],
) -> None:
    """Found by the property (issue 23): a request is admitted on both prefill ranks and rank 0
    arrived; the barrier service is killed, then both prefill ranks, and only the service is
    started again. Nobody is left to say the round's words again, so the new service must recall
    them from its journal: once it has heard neither rank serve for a few heartbeats, the round
    ends and both decode ranks hear the failure, so the engine can reuse the blocks."""
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        info, _, _ = traffic.half_done(0)
        _kill(dep, "barrier")
        for rank in range(dep.prefill.world_size):
            _kill(dep, _name(dep, "prefill", rank))
        _restart(dep, "barrier", record)
        fault = time.monotonic()
        told = dep.dec.wait(info.request_id, 3 * HEARTBEAT_S + SLACK_S + 10)
        while set(told.reported) != {0, 1}:
            assert dep.dec.collect(3 * HEARTBEAT_S + SLACK_S + 10), f"decode ranks {told.reported} only"
        record.update(fault="SIGKILL barrier, then every prefill rank holding a request; barrier started again")
        record["report_s"] = round(time.monotonic() - fault, 2)
        record["affected"] = "1 in flight: recalled from the journal, both decode ranks told it failed"
        assert told.reusable and not told.ready and not told.duplicates, told
        assert all("not heard since the barrier service started" in why for why in told.reasons.values()), told
        # the whole prefill group starts again (a cold start) and serves
        names = [_name(dep, "prefill", r) for r in range(dep.prefill.world_size)]
        dep.cluster.wait_ready([dep.cluster.spawn(n) for n in names], time.monotonic() + 60.0)
        for r, worker in enumerate(dep.workers):
            worker.register(dep.pcaches[r])
        traffic.ok(2)


@pytest.mark.slow
def test_a_decode_rank_down_when_its_writers_died_hears_of_their_request_once_all_are_back(
    record: dict[str, Any],
) -> None:
    """A request is in flight on both prefill ranks (rank 0 wrote and arrived); decode rank 1 is
    killed, then both prefill ranks. The barrier service tells both decode ranks the request
    failed: decode rank 1's word is lost with it. The prefill group starts again together (a cold
    start: no live rank to join, nobody is sent the group's verdicts), then decode rank 1. Its
    writers serve, so the service had no absent writer to speak for, and the new decode process
    dropped what came before its start-up verdict anyway: nobody ever told decode rank 1, and its
    engine's block stayed reserved. The service now says again to a decode rank starting anew
    every word it told its predecessor, and the decode daemon keeps them while it starts."""
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        info, _, _ = traffic.half_done(0)
        fault = _kill(dep, _name(dep, "decode", 1))
        for rank in range(dep.prefill.world_size):
            _kill(dep, _name(dep, "prefill", rank))
        told = _decode_told(dep, info.request_id, 0, 3 * HEARTBEAT_S + SLACK_S + 10)
        assert told.reported == {0}, told  # (decode rank 1's word is lost with it)
        names = [_name(dep, "prefill", r) for r in range(dep.prefill.world_size)]
        dep.cluster.wait_ready([dep.cluster.spawn(n) for n in names], time.monotonic() + 60.0)
        for r, worker in enumerate(dep.workers):
            worker.register(dep.pcaches[r])
        _restart(dep, _name(dep, "decode", 1), record)
        _register_decode(dep, 1, dep.dcaches[1])
        told = _decode_told(dep, info.request_id, 1, 3 * HEARTBEAT_S + SLACK_S + 10)
        record.update(fault="SIGKILL decode rank 1, then both prefill ranks holding a request; all started again")
        record["report_s"] = round(time.monotonic() - fault, 2)
        record["affected"] = "1 in flight: decode rank 1's new process told again by the barrier service"
        assert told.reusable and not told.ready and not told.duplicates, told
        traffic.ok(2)


@pytest.mark.slow
def test_the_decode_engine_hears_of_every_request_a_prefill_rank_held_when_it_died_and_stays_down(
    record: dict[str, Any],
) -> None:
    """Issue 23, item 5: prefill rank 1 is killed holding a request (rank 0 wrote and arrived) and
    is not restarted. Decode rank 1 never gets a notice from it; the barrier service, seeing it
    stopped, tells decode rank 1 the verdict, so the engine hears every rank of the request
    within a few heartbeats and can reuse its blocks, whether or not rank 1 ever returns."""
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        info, _, _ = traffic.half_done(0)
        fault = _kill(dep, _name(dep, "prefill", 1))
        told = dep.dec.wait(info.request_id, 3 * HEARTBEAT_S + SLACK_S + 10)
        while set(told.reported) != {0, 1}:
            assert dep.dec.collect(3 * HEARTBEAT_S + SLACK_S), f"decode ranks {told.reported} only"
        took = time.monotonic() - fault
        assert told.statuses[1] is Status.FAILED and "rank 1 of group prefill stopped serving" in told.reasons[1]
        assert told.reasons[0] == told.reasons[1], told.reasons  # one ending, whoever tells it
        record.update(fault="SIGKILL prefill rank 1 holding a request, not restarted", report_s=round(took, 2))
        record["affected"] = "1 in flight: decode rank 1 told by the barrier service, its blocks reusable"
        assert took <= 3 * HEARTBEAT_S + SLACK_S, f"decode rank 1 told {took:.1f}s after the kill"
        _serve_again(dep, 1, record)
        traffic.ok(3)
        assert not told.duplicates, told.duplicates  # nothing told twice, also once rank 1 rejoined


@pytest.mark.slow
def test_a_worker_registers_again_with_a_restarted_daemon_whatever_it_sent_meanwhile(
    record: dict[str, Any],
) -> None:
    """Prefill rank 1 is killed while its worker goes on signalling layers: they wait in the worker's
    socket, and the restarted daemon refuses them (the worker has not registered with it yet). The
    worker's registration must still be taken as accepted: the refusals answer the signals."""
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record)
        traffic.ok(2)
        _kill(dep, _name(dep, "prefill", 1))
        info, _, _ = traffic.info()
        traffic.signal(info, [1])  # a step the worker ran while its daemon was down
        _restart(dep, _name(dep, "prefill", 1), record)
        fault = time.monotonic()
        dep.workers[1].register(dep.pcaches[1])
        record.update(fault="SIGKILL prefill rank 1 while its worker signals, then it registers again")
        record["report_s"] = round(time.monotonic() - fault, 2)
        refused = dep.workers[1].errors()
        assert refused and all(e.code is ErrorCode.WRONG_ROLE for e in refused), refused
        record["affected"] = f"{len(refused)} signals sent meanwhile refused; the registration accepted"
        traffic.ok(3)


@pytest.mark.slow
def test_after_a_decode_daemon_restarts_nothing_is_written_into_its_old_registration(
    record: dict[str, Any], transport: str
) -> None:
    """Issue 23, item 8: decode rank 1's daemon is killed and started again; a request comes before
    its engine registered again. Prefill rank 1's link knew the old registration (whose segments
    the engine still maps): the request must wait for the new one, and be ready at decode, never
    written into the old one and told ok on prefill while decode calls it failed."""
    with deploy(faults()) as dep:
        traffic = Traffic(dep, record, transport)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        _kill(dep, _name(dep, "decode", 1))
        _restart(dep, _name(dep, "decode", 1), record)
        dep.wait_until(
            "prefill rank 1's link to decode rank 1 to connect again",
            lambda: dep.status(1)["peers"].get(f"{dep.decode.name}:1", {}).get("connected") is True,
        )
        info, src, dst = traffic.info()
        fault = time.monotonic()
        dep.sched.submit(info)
        traffic.signal(info, range(dep.prefill.world_size))
        _register_decode(dep, 1, dep.dcaches[1])  # the engine registers with the new daemon only now
        out = dep.sched.wait(info.request_id, 20.0)
        told = dep.dec.wait(info.request_id, 20.0)
        record.update(fault="decode rank 1 restarted, a request before its engine registers again")
        record["report_s"] = round(time.monotonic() - fault, 2)
        assert out.ok and told.ready, (out.results, told)
        traffic.verify(src, dst)
        record["affected"] = "1 sent meanwhile: written into the new registration once it came, ready, verified"
        traffic.ok(3)
