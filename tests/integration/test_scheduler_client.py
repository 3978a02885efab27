"""The scheduler client against one fake prefill rank: what it returns when results arrive between
submits (the rank answers each cache_info at once, as a refusing rank does)."""

from __future__ import annotations

import zmq

from kvxferd import security
from kvxferd.client import PrefillScheduler, credentials
from kvxferd.config import Config
from kvxferd.protocol import CacheInfo, Status, TransferResult, decode, encode
from tests.hostile.test_guards import ONE_BY_ONE
from tests.threads import run_dir

ANSWER_MS = 5000


def test_each_decided_outcome_is_returned_once_when_results_come_between_submits() -> None:
    """A refusal that reaches the scheduler while it submits the next request is decided then and
    handed out at the next collect, once. (It was added to the scheduler's list of early outcomes
    together with that whole list, doubling it at every submit: a flood of refused requests grew
    the scheduler to gigabytes within seconds, and CI killed the run.)"""
    with run_dir(ONE_BY_ONE) as config:
        _one_rank_answering_every_cache_info_at_once(config)


def _one_rank_answering_every_cache_info_at_once(config: Config) -> None:
    endpoint = config.endpoint(config.group("prefill"), 0)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    rank = ctx.socket(zmq.ROUTER)
    rank.setsockopt(zmq.LINGER, 0)
    security.credentials(config, "daemon").server(rank, "engine")
    rank.bind(endpoint)
    sched = PrefillScheduler([endpoint], credentials=credentials(config))
    try:
        assert rank.poll(ANSWER_MS), "the scheduler never said who it is"
        rank.recv_multipart()  # its Attach
        count, handed = 24, []
        for i in range(count):
            sched.submit(CacheInfo(f"r{i}", i, i + 1, 8, (i,), (i,), "decode"))
            assert rank.poll(ANSWER_MS), f"cache_info {i} never came"
            who, frame = rank.recv_multipart()
            info = decode(frame)
            assert isinstance(info, CacheInfo) and info.request_id == f"r{i}"
            refusal = TransferResult(info.request_id, Status.FAILED, "table full", 0, code="table_full")
            rank.send_multipart([who, encode(refusal)])
            assert sched.channels[0].sock.poll(ANSWER_MS), f"the refusal of r{i} never came back"
        handed += sched.collect(0.0)
        ids = [out.request_id for out in handed]
        assert sorted(ids) == sorted(f"r{i}" for i in range(count)), ids
        assert all(out.decided and out.refused for out in handed)
        assert sched.collect(0.0) == []  # nothing is handed out twice
    finally:
        sched.close()
        rank.close()
        ctx.term()
