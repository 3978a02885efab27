"""Groups of different sizes under faults (issue 24), through real daemons.

A 2-rank prefill group writes into a 1-rank decode group: each prefill rank holds one of the
model's 2 KV heads and writes it into its half of every decode block. The decode rank's engine is
told of a request once, only when both writers stopped: when one dies, the barrier service speaks
for it (naming it), and the engine hears the failure once the other one's notice is in too.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from kvxferd.protocol import Status
from tests.faults.test_processes import (
    BARRIER_S,
    HEARTBEAT_S,
    SLACK_S,
    Traffic,
    _kill,
    _name,
    _outcome_on,
    _serve_again,
    _wait_state,
    faults,
)
from tests.integration.conftest import Deployment, deploy

TWO_INTO_ONE = """
groups:
  - {name: prefill, role: prefill, world_size: 2, endpoint: "ipc://{run_dir}/prefill-{rank}.sock", memory: host}
  - {name: decode, role: decode, world_size: 1, endpoint: "ipc://{run_dir}/decode-{rank}.sock", memory: host}
"""


def two_into_one() -> str:
    return TWO_INTO_ONE + faults()


def heads_in_place(dep: Deployment, src: int, dst: int) -> None:
    """Decode block ``dst`` holds prefill rank 0's head, then rank 1's, of their block ``src``."""
    got = dep.dcaches[0].numpy().view(np.uint8)  # [layer, K|V, block, head, token, bytes]
    for rank, cache in enumerate(dep.pcaches):
        mine = cache.numpy().view(np.uint8)[:, :, src, 0]
        assert np.array_equal(got[:, :, dst, rank], mine), f"head of prefill rank {rank} not in place"


class Wide(Traffic):
    """Traffic whose bytes are checked head by head (each prefill rank's head in its slice)."""

    def verify(self, src: int, dst: int) -> None:
        assert self.dep.dec is not None
        heads_in_place(self.dep, src, dst)


@pytest.mark.slow
def test_two_writers_fill_one_decode_block_and_the_engine_hears_once() -> None:
    with deploy(two_into_one()) as dep:
        assert dep.dcaches[0].shape.kv_heads == 2 and dep.pcaches[0].shape.kv_heads == 1
        Wide(dep, {"verified": 0}).ok(4)


@pytest.mark.slow
def test_a_writer_killed_mid_request_is_spoken_for_and_the_engine_hears_once_when_both_stopped(
    record: dict[str, Any],
) -> None:
    """Prefill rank 0 writes everything and arrives; rank 1 is killed before it writes anything.
    The barrier service ends the round once rank 1 is silent for 3 heartbeats and tells the decode
    rank, naming rank 1 absent; rank 0 hears the verdict and sends its failure. The engine hears of
    the request exactly once, failed, and may reuse the block; then rank 1 comes back and serves."""
    with deploy(two_into_one()) as dep:
        traffic = Wide(dep, record)
        assert dep.sched is not None and dep.dec is not None
        traffic.ok(2)
        info, _, _ = traffic.info()
        dep.sched.submit(info)
        traffic.signal(info, [0])
        _wait_state(dep, 0, info.request_id, "arrived")
        killed = _kill(dep, _name(dep, "prefill", 1))
        told = dep.dec.wait(info.request_id, 3 * HEARTBEAT_S + BARRIER_S + SLACK_S)
        record.update(fault="SIGKILL one of two writers of a decode rank mid-request")
        record["report_s"] = round(time.monotonic() - killed, 2)
        assert told.reusable and not told.ready and told.statuses[0] is Status.FAILED, told
        assert _outcome_on(dep, info.request_id, 0, 20.0).results[0].status is Status.FAILED
        dep.dec.collect(0.5)  # whatever else comes for it within half a second
        assert not dep.dec.outcome(info.request_id).duplicates, "the engine heard of it twice"
        _serve_again(dep, 1, record)
        traffic.ok(3)
