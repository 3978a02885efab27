"""Who may say what: forged messages through real daemons take no effect.

Outsiders (no deployment secret) get nothing: no handshake, no answer. Holders of the engine
keys may speak to engine sockets only, and there only in their role: layer signals from the
worker that registered, aborts from the request's scheduler, notices never. Peer sockets take
prefill daemons only.
"""

from __future__ import annotations

import dataclasses

import zmq

from kvxferd import security
from kvxferd.client import DecodeEngine
from kvxferd.protocol import (
    Abort,
    Ack,
    Attach,
    CacheInfo,
    Error,
    ErrorCode,
    Hello,
    KVReady,
    LayerSignal,
    PeerQuery,
    SlotChunk,
    Status,
    StatusQuery,
    TransferResult,
)
from kvxferd.security import Credentials, KeyPair
from tests.hostile.conftest import Hostile

SILENCE_S = 2.0  # an outsider's message is never answered; this long is far past any real answer


def _stranger(daemon_public: bytes) -> Credentials:
    """CURVE keys of no deployment, aimed at this deployment's (public) server key."""
    public, secret = zmq.curve_keypair()
    return Credentials(KeyPair(public, secret), daemon_public, {})


def _silent(attackers: list) -> None:
    """Nothing comes back on any of ``attackers`` within SILENCE_S (one wait for all of them)."""
    poller = zmq.Poller()
    for a in attackers:
        poller.register(a.sock, zmq.POLLIN)
    assert poller.poll(int(SILENCE_S * 1000)) == []


def test_outsiders_get_no_answer_on_any_socket(dep: Hostile, probes) -> None:
    stranger = _stranger(security.credentials(dep.config, "daemon").daemon_public)
    attackers = []
    for endpoint in [*dep.endpoints(), dep.config.peer_endpoint(dep.decode, 0)]:
        for creds in (None, stranger):
            attacker = probes(endpoint, credentials=creds)
            attacker.send(StatusQuery())
            attacker.send(Abort("anything", "forged"))
            attacker.send(KVReady("anything", rank=0))
            attackers.append(attacker)
    _silent(attackers)
    dep.still_fine("after-outsiders")


def test_engine_keys_do_not_open_the_peer_and_barrier_sockets(dep: Hostile, probes) -> None:
    attackers = []
    for endpoint in (dep.config.peer_endpoint(dep.decode, 0), dep.config.barrier_endpoint()):
        attacker = probes(endpoint, credentials=dep.creds)
        attacker.send(PeerQuery("prefill", 0))
        attacker.send(Hello("prefill", 0, 2, "prefill"))
        attackers.append(attacker)
    _silent(attackers)
    dep.still_fine("after-engine-keys-elsewhere")


def test_forged_notices_never_reach_the_decode_engine(dep: Hostile, probes) -> None:
    assert dep.dec is not None
    # on the engine socket: refused, whoever holds the engine keys
    engine_side = probes(dep.config.endpoint(dep.decode, 0), credentials=dep.creds)
    for notice in (KVReady("forged", rank=0), TransferResult("forged", Status.FAILED, "forged", rank=0)):
        answer = engine_side.ask(notice)
        assert isinstance(answer, Error) and answer.code is ErrorCode.WRONG_ROLE
    # on the peer socket, with the daemon keys but not as a prefill rank of this deployment
    daemon = security.credentials(dep.config, "daemon")
    for identity in (b"intruder:0", b"prefill:1", b"decode:0"):
        peer_side = probes(dep.config.peer_endpoint(dep.decode, 0), credentials=daemon, identity=identity)
        answer = peer_side.ask(KVReady("forged", rank=0))
        assert isinstance(answer, Error) and answer.code is ErrorCode.WRONG_ROLE, identity
    dep.dec.collect(0.5)
    assert dep.dec.outcome("forged") is None
    dep.still_fine("after-forged-notices")


def test_only_the_registering_worker_signals_layers(dep: Hostile, probes) -> None:
    assert dep.sched is not None
    attacker = probes(dep.config.endpoint(dep.prefill, 0), credentials=dep.creds)
    step = next(dep.steps)
    dep.sched.submit(CacheInfo("victim", 0, step, 8, (1, 2), (30, 31), dep.peer))
    # layer signals before the worker wrote anything: each refused, nothing copied
    for layer in range(dep.config.kv.num_layers):
        slots = (SlotChunk(0, 0, 8, step),) if layer == 0 else ()
        answer = attacker.ask(LayerSignal(step, layer, slots))
        assert isinstance(answer, Error) and answer.code is ErrorCode.WRONG_ROLE
    assert dep.status(0)["requests"][0]["state"] != "done"
    dep.sched.abort("victim", "the test is done with it")
    assert dep.sched.wait("victim", 10.0).status is Status.ABORTED
    dep.still_fine("after-forged-signals")


def test_an_abort_from_another_connection_is_refused(dep: Hostile, probes) -> None:
    assert dep.sched is not None
    step = next(dep.steps)
    dep.sched.submit(CacheInfo("kept", 0, step, 8, (1, 2), (32, 33), dep.peer))
    dep.wait_until("the request on rank 0", lambda: dep.status(0)["tables"]["requests"] == 1)
    attacker = probes(dep.config.endpoint(dep.prefill, 0), credentials=dep.creds)
    answer = attacker.ask(Abort("kept", "forged"))
    assert isinstance(answer, Error) and answer.code is ErrorCode.WRONG_ROLE
    # an abort of a request no rank has seen yet needs a scheduler connection too
    answer = attacker.ask(Abort("not-yet", "forged"))
    assert isinstance(answer, Error) and answer.code is ErrorCode.WRONG_ROLE
    for worker in dep.workers:
        for layer in range(dep.config.kv.num_layers):
            worker.layer_ready(step, layer, (SlotChunk(0, 0, 8, step),) if layer == 0 else ())
    assert dep.sched.wait("kept", 10.0).ok
    assert dep.dec is not None and dep.dec.wait("kept", 10.0).ready
    # a connection that says it is a scheduler may abort early (the documented way)
    assert isinstance(attacker.ask(Attach("scheduler")), Ack)
    dep.still_fine("after-forged-abort")


PEERS = ["garbage", "tcp://no.such.host:x", "ipc:///tmp/elsewhere.sock", "{rank}", "decode-0", "prefill", "x" * 256]


def test_a_cache_info_whose_peer_is_not_a_decode_group_fails_at_once(dep: Hostile) -> None:
    assert dep.sched is not None
    for i, peer in enumerate(PEERS):
        step = next(dep.steps)
        rid = f"lost-{i}"
        dep.sched.submit(dataclasses.replace(CacheInfo(rid, 0, step, 8, (1, 2), (30, 31), dep.peer), peer=peer))
        out = dep.sched.wait(rid, 10.0)
        assert out.status is Status.FAILED, peer
        assert all(r.code == ErrorCode.UNKNOWN_PEER.value for r in out.refused.values()), out.results
    dep.still_fine("after-unknown-peers")


def test_a_second_engine_at_decode_takes_over_and_the_first_is_told(dep: Hostile) -> None:
    assert dep.dec is not None
    second = DecodeEngine([dep.config.endpoint(dep.decode, r) for r in range(2)], credentials=dep.creds)
    try:
        second.register(dep.dcaches)
        told = [e for _, e in dep.dec.poll(10.0) if isinstance(e, Error)]
        assert told and told[0].code is ErrorCode.NOT_REGISTERED and "another engine" in told[0].detail
        dep.dec, first = second, dep.dec  # the new engine hears the notices now
        dep.still_fine("after-takeover")
        first.collect(0.5)
        assert first.outcome("after-takeover") is None
        first.close()
    finally:
        if dep.dec is not second:
            second.close()
