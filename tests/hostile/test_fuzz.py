"""Mutated valid messages against every socket kind of a running deployment.

10 examples of 200 frames each (2,000 inputs per run), spread over the prefill engine socket,
the decode engine socket, the decode peer socket and the barrier service, each sent with the
keys that socket accepts (so the frames get past the handshake to the decoder and handlers).
After every 200: every daemon alive and serving, and a legitimate request moves verified bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvxferd import security
from tests.hostile.conftest import HOSTILE, Hostile, Probe
from tests.integration.conftest import deploy
from tests.unit.test_codec_fuzz import byte_level, structural

BATCH = 200
counter = itertools.count()


@pytest.fixture(scope="module")
def target() -> Iterator[tuple[Hostile, list[Probe]]]:
    with deploy(HOSTILE, kind=Hostile) as dep:
        assert isinstance(dep, Hostile)
        dep.steps = itertools.count(1)
        daemon = security.credentials(dep.config, "daemon")
        probes = [
            Probe(dep.config.endpoint(dep.prefill, 0), credentials=dep.creds),
            Probe(dep.config.endpoint(dep.decode, 1), credentials=dep.creds),
            Probe(dep.config.peer_endpoint(dep.decode, 0), credentials=daemon, identity=b"fuzz:0"),
            Probe(dep.config.barrier_endpoint(), credentials=daemon, identity=b"fuzz:1"),
        ]
        try:
            yield dep, probes
        finally:
            for p in probes:
                p.close()


@settings(
    max_examples=10,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(st.lists(st.one_of(structural(), byte_level()), min_size=BATCH, max_size=BATCH))
def test_mutated_messages_on_every_socket_leave_every_daemon_serving(
    target: tuple[Hostile, list[Probe]], frames: list[bytes]
) -> None:
    dep, probes = target
    for i, frame in enumerate(frames):
        probes[i % len(probes)].send(frame)
    dep.still_fine(f"fuzz-{next(counter)}")
    for p in probes:  # drop the answers (errors, mostly) so nothing piles up between examples
        while p.sock.poll(0):
            p.sock.recv()
