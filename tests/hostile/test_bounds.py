"""Single messages that crashed, hung or starved a daemon: each refused with a short, clear error,
the daemon alive, and a legitimate request still moving verified bytes."""

from __future__ import annotations

import math
import os

import msgpack

from kvxferd import security
from kvxferd.protocol import (
    PROTOCOL_VERSION,
    Arrive,
    CacheInfo,
    Digest,
    Error,
    ErrorCode,
    Hello,
    SlotChunk,
    Status,
    Withdraw,
)
from tests.hostile.conftest import Hostile


def raw(*items: object) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)


def _sockets(dep: Hostile) -> list[tuple[str, object]]:
    daemon = security.credentials(dep.config, "daemon")
    engine = [(dep.config.endpoint(g, r), dep.creds) for g in dep.config.groups for r in range(g.world_size)]
    return [*engine, (dep.config.barrier_endpoint(), daemon), (dep.config.peer_endpoint(dep.decode, 0), daemon)]


LONG = [
    raw(PROTOCOL_VERSION, "T" * 5000),
    raw(PROTOCOL_VERSION, "result", "r", "x" * 5000, "", 0),
    raw(PROTOCOL_VERSION, "register", "m" * 5000, [2, 64, 4096], []),
    raw(PROTOCOL_VERSION, "withdraw", "g", "k", 0, 0, "s" * 5000, "why"),
    raw(PROTOCOL_VERSION, "layer", 1, 0, [[i, 0, 4, 1] for i in range(5000)]),  # too many slots
    raw(PROTOCOL_VERSION, "cache_info", "r", 0, 1, 4, [1], [(1 << 63) - 2], "decode", "auto", 0),
    b"\x92\x03\xdd\xff\xff\xff\xff",  # a header claiming 4 billion items
]


def test_long_and_huge_values_are_refused_with_short_errors_on_every_socket(dep: Hostile, probes) -> None:
    for endpoint, creds in _sockets(dep):
        attacker = probes(endpoint, credentials=creds)
        for frame in LONG:
            answer = attacker.ask(frame)
            assert isinstance(answer, Error) and answer.code is ErrorCode.BAD_MESSAGE, (endpoint, answer)
            assert len(answer.detail) < 1200
    dep.still_fine("after-long-values")


def test_numbers_that_are_not_finite_or_far_too_large_never_reach_the_barrier_core(dep: Hostile, probes) -> None:
    daemon = security.credentials(dep.config, "daemon")
    attacker = probes(dep.config.barrier_endpoint(), credentials=daemon, identity=b"probe:0")
    assert not isinstance(attacker.ask(Hello("probe", 0, 1, "prefill")), Error)
    for value in (math.inf, 1e300, (1 << 63) - 1, math.nan, -1.0):
        answer = attacker.ask(raw(PROTOCOL_VERSION, "arrive", "probe", "k", 0, 0, [1, 1, 64, "fp"], value))
        assert isinstance(answer, Error) and answer.code is ErrorCode.BAD_MESSAGE and "timeout_s" in answer.detail
    dep.still_fine("after-huge-timeouts")


def test_long_reasons_are_cut_so_no_verdict_text_overflows(dep: Hostile, probes) -> None:
    assert dep.sched is not None
    # an abort with a reason as long as the protocol allows: every rank ends it, nobody dies
    step = next(dep.steps)
    dep.sched.submit(CacheInfo("long-abort", 0, step, 8, (1, 2), (30, 31), dep.peer))
    dep.sched.abort("long-abort", "r" * 4096)
    out = dep.sched.wait("long-abort", 10.0)
    assert out.status is Status.ABORTED and all(len(r.reason) <= 4096 for r in out.results.values())
    # two withdrawals with long reasons end a key of another group at the barrier
    daemon = security.credentials(dep.config, "daemon")
    ranks = [probes(dep.config.barrier_endpoint(), credentials=daemon, identity=f"probe2:{r}".encode()) for r in (0, 1)]
    for r, p in enumerate(ranks):
        assert not isinstance(p.ask(Hello("probe2", r, 2, "prefill")), Error)
    for r, p in enumerate(ranks):
        p.send(Withdraw("probe2", "k", 0, r, "failed", "w" * 4096))
    verdicts = [p.recv() for p in ranks]
    assert all(v is not None and not isinstance(v, Error) for v in verdicts), verdicts
    dep.still_fine("after-long-reasons")


def test_bad_later_layer_signals_read_in_a_burst_are_each_answered(dep: Hostile) -> None:
    """A worker's signals after layer 0 read in one go are handed to the core together: each bad
    one still gets its own answer (a layer past the model's, a step not begun), in order, and the
    good ones around them still count."""
    dep.legit("before-the-burst")
    worker = dep.workers[0]
    layers = dep.config.kv.num_layers
    far = 10**5
    for layer in (1, layers, 2, layers + 7):
        worker.layer_ready(far, layer)  # not begun: each is stale (and two are past the model)
    errors = []
    for _ in range(20):
        errors += worker.errors()
        if len(errors) >= 4:
            break
        worker.backlog += worker.poll(0.5)
    codes = [e.code for e in errors]
    assert codes == [ErrorCode.STALE_SIGNAL, ErrorCode.OUT_OF_RANGE, ErrorCode.STALE_SIGNAL, ErrorCode.OUT_OF_RANGE]
    assert str(layers + 7) in errors[3].detail
    dep.still_fine("after-the-burst")


def test_a_step_far_ahead_does_not_make_real_signals_stale(dep: Hostile) -> None:
    dep.legit("sets-the-step-window")  # the worker's first step sets the window; later ones must stay near
    worker = dep.workers[0]
    for step in ((1 << 63) - 1, 10**6 + 100):
        worker.layer_ready(step, 0, (SlotChunk(7, 0, 4, step),))
    errors = []
    for _ in range(20):
        errors += worker.errors()
        if len(errors) >= 2:
            break
        worker.backlog += worker.poll(0.5)
    assert [e.code for e in errors] == [ErrorCode.OUT_OF_RANGE] * 2, errors
    dep.still_fine("after-far-steps")


def test_one_group_filling_its_barrier_keys_does_not_starve_another(dep: Hostile, probes) -> None:
    max_keys = dep.config.barrier.max_keys
    daemon = security.credentials(dep.config, "daemon")
    attacker = probes(dep.config.barrier_endpoint(), credentials=daemon, identity=b"hog:0")
    assert not isinstance(attacker.ask(Hello("hog", 0, 2, "prefill")), Error)
    digest = Digest(1, 1, 64, "fp")
    for i in range(max_keys + 10):
        attacker.send(Arrive("hog", f"k{i}", 0, 0, digest, 86400.0))
    refused = 0
    while (answer := attacker.recv(5.0)) is not None:
        assert isinstance(answer, Error) and answer.code is ErrorCode.TABLE_FULL
        refused += 1
        if refused == 10:
            break
    assert refused == 10
    dep.still_fine("after-key-hog")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_large_frames_do_not_pile_up_in_memory(dep: Hostile, probes) -> None:
    daemon = next(d for d in dep.cluster.daemons if d.name == "prefill-0")
    before = _rss_kib(daemon.popen.pid)
    frame_bytes = dep.config.limits.max_frame_bytes
    big = raw(PROTOCOL_VERSION, "abort", "r", os.urandom(frame_bytes - 64).hex()[: frame_bytes - 64])
    attackers = [probes(dep.config.endpoint(dep.prefill, 0), credentials=dep.creds) for _ in range(4)]
    for a in attackers:
        for _ in range(100):
            a.send(big)
    for a in attackers:  # every one of them answered: the daemon read all 400 and kept none
        for _ in range(100):
            assert a.recv() is not None
    grown_mib = (_rss_kib(daemon.popen.pid) - before) / 1024
    assert grown_mib < 64, f"prefill-0 grew by {grown_mib:.0f} MiB"
    dep.still_fine("after-large-frames")
