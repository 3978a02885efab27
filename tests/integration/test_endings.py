"""Every request instance ends once, the same everywhere, through real daemons and the client library.

Each test drives a 2+2 deployment (barrier service, two prefill and two decode
daemons as processes) the way a scheduler with a bug, a slow rank or a
cancelling user would, and checks what each engine saw: the exact statuses and
reasons on both prefill ranks, one notice per decode rank with the same status,
and, where the ranks disagreed, decode memory left exactly as it was.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from kvxferd.client import DecodeOutcome, PrefillOutcome
from kvxferd.protocol import CacheInfo, ErrorCode, SlotChunk, Status, block_summary
from tests.integration.conftest import SMALL, Deployment, deploy, fill

# A short barrier timeout, so an instance one rank never got expires within the test.
ENDINGS = SMALL + "barrier: {timeout_s: 3}\n"
WAIT_S = 15.0  # well below every timeout that could also end these requests (pending_s 20, verdict_s 40)


@pytest.fixture
def dep() -> Iterator[Deployment]:
    with deploy(ENDINGS) as d:
        yield d


def _info(dep: Deployment, rid: str, slot: int, step: int, tokens: int, src: list[int], dst: list[int]) -> CacheInfo:
    return CacheInfo(rid, slot, step, tokens, tuple(src), tuple(dst), dep.peer)


def _run_step(dep: Deployment, step: int, *chunks: SlotChunk) -> None:
    """Both model workers compute ``step``: every layer is written and signalled."""
    for worker in dep.workers:
        for layer in range(dep.config.kv.num_layers):
            worker.layer_ready(step, layer, chunks if layer == 0 else ())


def _decode_memory(dep: Deployment) -> list[np.ndarray]:
    return [c.raw().copy() for c in dep.dcaches]


def _complete(dep: Deployment, rid: str, instance: int = 0) -> PrefillOutcome:
    """Wait until every prefill rank reported the instance (not only until it was decided)."""
    assert dep.sched is not None
    deadline = time.monotonic() + WAIT_S
    out = dep.sched.wait(rid, WAIT_S, instance)
    while not out.complete:
        assert time.monotonic() < deadline, f"ranks {set(range(2)) - set(out.results)} never reported {rid}"
        dep.sched.collect(0.2)
    return out


def _decode_ended(dep: Deployment, rid: str, instance: int = 0) -> DecodeOutcome:
    """Wait until every decode rank reported the instance."""
    assert dep.dec is not None
    out = dep.dec.wait(rid, WAIT_S, instance)
    deadline = time.monotonic() + WAIT_S
    while not out.reusable:
        assert time.monotonic() < deadline, f"decode ranks {set(range(2)) - out.reported} never reported {rid}"
        dep.dec.collect(0.2)
    return out


def _assert_idle(dep: Deployment) -> None:
    for rank in range(2):
        tables = dep.status(rank)["tables"]
        assert tables["requests"] == tables["parked_infos"] == tables["writes"] == 0, tables


def _assert_no_anomalies(dep: Deployment) -> None:
    assert dep.sched is not None and dep.dec is not None
    assert not dep.sched.anomalies and not dep.dec.anomalies, (list(dep.sched.anomalies), list(dep.dec.anomalies))


# -- case 1: a refusal is an ending, told to decode ------------------------------------------------


def _bad_layout(x: CacheInfo) -> CacheInfo:
    return replace(x, num_tokens=x.num_tokens + 4)  # one more block than the cache_info names


def _out_of_range(x: CacheInfo) -> CacheInfo:
    return replace(x, src_blocks=(64, *x.src_blocks[1:]))  # the cache has blocks 0..63


def _too_few_registrations(x: CacheInfo) -> CacheInfo:
    return replace(x, dst_generations=("a1c3f09b2e77",))  # names decode rank 0's only; rank 1 writes rank 1


@pytest.mark.parametrize(
    ("code", "change", "detail"),
    [
        (ErrorCode.BAD_LAYOUT, _bad_layout, "request x: 14 tokens need 4 blocks of 4 tokens, cache_info names 3"),
        (ErrorCode.OUT_OF_RANGE, _out_of_range, "request x: source block 64 is outside this rank's 64 blocks"),
        (
            ErrorCode.BAD_LAYOUT,
            _too_few_registrations,
            "request x: dst_generations names the registrations of 1 decode ranks; prefill rank 1 writes into "
            "decode ranks [1]",
        ),
    ],
)
def test_a_cache_info_one_rank_refuses_ends_failed_everywhere_and_decode_can_reuse_its_blocks(
    dep: Deployment, code: ErrorCode, change: object, detail: str
) -> None:
    assert dep.sched is not None and dep.dec is not None
    before = _decode_memory(dep)
    x = _info(dep, "x", 0, 1, 10, [1, 2, 3], [20, 21, 22])
    dep.sched.submit(x, ranks=[0])
    dep.sched.submit(change(x), ranks=[1])  # type: ignore[operator]
    _run_step(dep, 1, SlotChunk(0, 0, 10, 1))

    decided = dep.sched.wait("x", WAIT_S)  # returns at the refusal, without waiting for rank 0
    assert set(decided.refused) == {1}
    assert (decided.refused[1].code, decided.refused[1].reason) == (code.value, detail)
    out = _complete(dep, "x")
    assert {r: (res.status, res.reason) for r, res in out.results.items()} == {
        0: (Status.FAILED, f"rank 1 failed: {detail}"),
        1: (Status.FAILED, detail),
    }
    dec = _decode_ended(dep, "x")
    assert not dec.ready and dec.statuses == {0: Status.FAILED, 1: Status.FAILED}
    assert all(np.array_equal(a, b) for a, b in zip(before, _decode_memory(dep), strict=True))
    assert any(e.code is code for _, e in dep.sched.errors)
    _assert_idle(dep)
    _assert_no_anomalies(dep)


def test_a_slot_another_request_holds_on_one_rank_is_refused_and_told(dep: Deployment) -> None:
    assert dep.sched is not None
    holder = _info(dep, "holder", 0, 1, 4, [5], [30])
    dep.sched.submit(holder, ranks=[1])  # only rank 1 ever hears of it: it expires after 3 s
    dep.sched.submit(_info(dep, "x", 0, 1, 4, [1], [20]))
    decided = dep.sched.wait("x", WAIT_S)
    assert decided.refused[1].code == ErrorCode.SLOT_BUSY.value
    assert "already belongs to request holder" in decided.refused[1].reason
    dec = _decode_ended(dep, "x")
    assert dec.statuses == {0: Status.FAILED, 1: Status.FAILED}
    # the holder itself ends too: expired, and even decode rank 0 (whose prefill rank never held it) is told
    held = _decode_ended(dep, "holder")
    assert held.statuses == {0: Status.FAILED, 1: Status.FAILED}
    assert "rank 0 of group prefill did not report within 3s (admission)" in held.reasons[0]
    assert _complete(dep, "x").results[0].status is Status.FAILED
    _assert_idle(dep)


def test_a_cache_info_refused_while_its_rank_shuts_down_is_told_to_decode(dep: Deployment) -> None:
    assert dep.sched is not None
    dep.sched.submit(_info(dep, "hold", 1, 1, 4, [2], [31]))  # in flight on rank 1: its drain cannot finish at once
    dep.wait_until("rank 1 to hold the request", lambda: dep.status(1)["tables"]["requests"] == 1)
    rank1 = next(d for d in dep.cluster.daemons if d.name == "prefill-1")
    rank1.popen.send_signal(signal.SIGTERM)
    dep.wait_until("rank 1 to drain", lambda: dep.status(1)["state"] == "draining")
    dep.sched.submit(_info(dep, "x", 0, 2, 4, [1], [20]))
    decided = dep.sched.wait("x", WAIT_S)
    assert (decided.refused[1].code, decided.refused[1].reason) == (
        "unavailable",
        "the prefill daemon is shutting down",
    )
    assert _decode_ended(dep, "x").statuses == {0: Status.FAILED, 1: Status.FAILED}
    out = _complete(dep, "x")
    assert out.results[0].reason == "rank 1 failed: the prefill daemon is shutting down"
    # what rank 1 still held when it stopped (it never got its layers) ends with one verdict: rank 0
    # reports it, and so does rank 1 if it ended before its drain ran out (else it exited without
    # waiting, and is gone for it); both decode ranks hear the same
    assert rank1.popen.wait(WAIT_S) == 0
    hold = dep.sched.wait("hold", WAIT_S)
    while 0 not in hold.results:
        assert dep.sched.collect(WAIT_S), "rank 0 never reported 'hold'"
    assert len({(r.status, r.reason) for r in hold.results.values()}) == 1 and set(hold.results) | set(hold.gone) == {
        0,
        1,
    }
    assert hold.results[0].status is Status.FAILED
    told = _decode_ended(dep, "hold")
    assert told.statuses == {0: Status.FAILED, 1: Status.FAILED}
    assert told.reasons[0] == told.reasons[1] and hold.results[0].reason in told.reasons[0], told.reasons


# -- cases 2 and 3: aborts, in any order ----------------------------------------------------------


def test_an_abort_and_its_cache_info_in_either_order_end_aborted_on_every_rank(dep: Deployment) -> None:
    assert dep.sched is not None
    x = _info(dep, "x", 0, 1, 4, [1], [20])
    dep.sched.submit(x, ranks=[0])
    dep.sched.abort("x", "client cancelled", ranks=[0])
    dep.sched.abort("x", "client cancelled", ranks=[1])
    dep.sched.submit(x, ranks=[1])
    out = _complete(dep, "x")
    assert {r: (res.status, res.reason) for r, res in out.results.items()} == {
        0: (Status.ABORTED, "aborted: client cancelled"),
        1: (Status.ABORTED, "aborted: client cancelled"),
    }
    dec = _decode_ended(dep, "x")
    assert dec.statuses == {0: Status.ABORTED, 1: Status.ABORTED}
    _assert_idle(dep)
    _assert_no_anomalies(dep)


def test_an_abort_that_overtakes_its_cache_info_ends_it_at_once_and_nothing_is_written(dep: Deployment) -> None:
    assert dep.sched is not None
    before = _decode_memory(dep)
    dep.sched.abort("x", "client cancelled")
    dep.sched.submit(_info(dep, "x", 0, 1, 4, [1], [20]))
    _run_step(dep, 1, SlotChunk(0, 0, 4, 1))
    out = _complete(dep, "x")  # within WAIT_S: no timeout was needed to end it
    assert {(res.status, res.reason) for res in out.results.values()} == {(Status.ABORTED, "aborted: client cancelled")}
    assert _decode_ended(dep, "x").statuses == {0: Status.ABORTED, 1: Status.ABORTED}
    assert all(np.array_equal(a, b) for a, b in zip(before, _decode_memory(dep), strict=True))
    _assert_idle(dep)


# -- cases 4 and 5: no byte before agreement ---------------------------------------------------------


@pytest.mark.parametrize("field", ["dst_blocks", "num_tokens"])
def test_ranks_with_different_cache_infos_write_nothing_and_fail_naming_the_field(dep: Deployment, field: str) -> None:
    """Rank 1's scheduler names block 40, which belongs to a live request v on decode (case 4), or
    11 tokens instead of 10 in the same 3 blocks (case 5). Nothing is written, v's blocks included."""
    assert dep.sched is not None and dep.dec is not None
    for r in range(2):
        fill(dep.pcaches[r], [1, 2, 3, 9], seed=r)
    dep.sched.submit(_info(dep, "v", 5, 1, 4, [9], [40]))
    _run_step(dep, 1, SlotChunk(5, 0, 4, 1))
    assert dep.sched.wait("v", WAIT_S).ok and dep.dec.wait("v", WAIT_S).ready
    before = _decode_memory(dep)

    x = _info(dep, "x", 0, 2, 10, [1, 2, 3], [20, 21, 22])
    odd = replace(x, dst_blocks=(20, 21, 40)) if field == "dst_blocks" else replace(x, num_tokens=11)
    dep.sched.submit(x, ranks=[0])
    dep.sched.submit(odd, ranks=[1])
    _run_step(dep, 2, SlotChunk(0, 0, 10, 2))
    out = _complete(dep, "x")
    if field == "dst_blocks":
        values = f"rank 0: {block_summary(x.dst_blocks)}; rank 1: {block_summary(odd.dst_blocks)}"
    else:
        values = "rank 0: 10; rank 1: 11"
    reason = f"ranks disagree on the cache_info: {field} ({values}); nothing was written"
    assert {r: (res.status, res.reason) for r, res in out.results.items()} == {
        0: (Status.FAILED, reason),
        1: (Status.FAILED, reason),
    }
    assert all(res.bytes == 0 for res in out.results.values())
    dec = _decode_ended(dep, "x")
    assert dec.statuses == {0: Status.FAILED, 1: Status.FAILED}
    assert all(np.array_equal(a, b) for a, b in zip(before, _decode_memory(dep), strict=True))
    _assert_idle(dep)
    _assert_no_anomalies(dep)


# -- case 6: instances ----------------------------------------------------------------------------------


def test_an_id_reused_after_an_expiry_starts_clean_and_the_old_instance_is_never_credited(dep: Deployment) -> None:
    assert dep.sched is not None and dep.dec is not None
    for r in range(2):
        fill(dep.pcaches[r], [1, 2], seed=20 + r)
    # instance 0 reaches rank 0 only: the admission round expires after the barrier's 3 s
    old = _info(dep, "x", 0, 1, 8, [1, 2], [20, 21])
    dep.sched.submit(old, ranks=[0])
    _run_step(dep, 1, SlotChunk(0, 0, 8, 1))
    reason = "rank 1 of group prefill did not report within 3s (admission)"
    dec_old = _decode_ended(dep, "x")  # both decode ranks are told, rank 1's by a prefill rank that never held it
    assert dec_old.statuses == {0: Status.FAILED, 1: Status.FAILED}
    assert dec_old.reasons == {0: f"failed: {reason}", 1: f"failed: {reason}"}

    # the id is reused at once, as instance 1, and completes
    new = replace(old, slot=1, step=2, dst_blocks=(30, 31), instance=1)
    dep.sched.submit(new)
    _run_step(dep, 2, SlotChunk(1, 0, 8, 2))
    assert dep.sched.wait("x", WAIT_S, instance=1).ok
    dec_new = dep.dec.wait("x", WAIT_S, instance=1)
    assert dec_new.ready and dec_new is not dec_old
    for r in range(2):
        assert np.array_equal(dep.pcaches[r].raw()[:, :, [1, 2]], dep.dcaches[r].raw()[:, :, [30, 31]])

    # instance 0's cache_info finally reaches rank 1: it is answered with the same ending, told to no one else
    dep.sched.submit(old, ranks=[1])
    out = _complete(dep, "x", 0)
    assert {r: (res.status, res.reason) for r, res in out.results.items()} == {
        0: (Status.FAILED, reason),
        1: (Status.FAILED, reason),
    }
    dep.sched.abort("x", "too late", instance=0)  # a late abort of the old instance changes nothing
    dep.dec.collect(0.5)
    assert dep.dec.outcome("x", 0) is dec_old and dec_old.statuses == {0: Status.FAILED, 1: Status.FAILED}
    assert dep.dec.outcome("x", 1) is dec_new and dec_new.ready
    _assert_idle(dep)
    _assert_no_anomalies(dep)
