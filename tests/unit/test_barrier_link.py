"""A rank's barrier link over real (inproc) sockets: nothing the service sends is dropped by a wait."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from kvxferd.protocol import STARTUP_KEY, Ack, Digest, Expired, Release, Status, Withdraw, decode, encode
from kvxferd.runtime.barrier_link import BarrierLink


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[bytes], BarrierLink]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    service = ctx.socket(zmq.ROUTER)
    service.bind("inproc://barrier")
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt_string(zmq.IDENTITY, BarrierLink.identity("g", 1))
    sock.connect("inproc://barrier")
    link = BarrierLink(sock, "inproc://barrier", group="g", rank=1, world_size=2, role="prefill", max_frame=1 << 20)
    yield service, link
    for s in (sock, service):
        s.close(linger=0)
    ctx.term()


def test_verdicts_sent_behind_a_joiners_release_reach_it_after_start_up(
    pair: tuple[zmq.Socket[bytes], BarrierLink],
) -> None:
    service, link = pair
    mine = Digest(0, 0, 0, "fp")
    late = Expired("g", "r7", 0, (1,), 4.0, Status.FAILED, "rank 1 of group g restarted before reporting", "d")
    # all queued before the link reads anything: its first read gets them in one batch
    for msg in (Ack("hello run2"), Release("g", STARTUP_KEY, 0, mine), late):
        service.send_multipart([BarrierLink.identity("g", 1).encode(), encode(msg)])
    link.startup("fp", 0.5, lambda: False)  # raises if the Release was dropped with the Ack's batch
    assert link.epoch == "run2" and link.serving == "fp"
    assert link.recv_ready() == [late]
    assert link.recv_ready() == []
    # what the link sent: its Hello and its arrival at the start-up key
    sent = [decode(service.recv_multipart()[1]) for _ in range(2)]
    assert [type(m).__name__ for m in sent] == ["Hello", "Arrive"]


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_verdicts_told_to_a_decode_rank_while_it_starts_reach_it_once_it_serves(
    pair: tuple[zmq.Socket[bytes], BarrierLink], role: str
) -> None:
    """A decode rank's new process hears, from its Hello on, what the service told its
    predecessor; those verdicts come before the start-up round's own verdict, and a wait for that
    one dropped them. A decode link keeps them for when it serves (a prefill link is sent what it
    must learn after its start-up verdict, and drops the rest as before)."""
    service, link = pair
    link.role = role
    mine = Digest(0, 0, 0, "fp")
    told = [Expired("g", f"r{i}", 0, (1,), 4.0, Status.FAILED, "rank 1 of group g stopped", "d") for i in range(3)]
    for msg in (told[0], Ack("hello run2"), told[1], told[2], Release("g", STARTUP_KEY, 0, mine)):
        service.send_multipart([BarrierLink.identity("g", 1).encode(), encode(msg)])
    link.startup("fp", 0.5, lambda: False)
    assert link.recv_ready() == (told if role == "decode" else [])


def test_a_word_the_socket_refuses_is_kept_and_sent_once_the_service_takes_it(tmp_path: Path) -> None:
    # issue 23, item 11: a DEALER with no connection up (IMMEDIATE), or a full queue, refuses a send
    endpoint = f"ipc://{tmp_path}/barrier.sock"
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt_string(zmq.IDENTITY, BarrierLink.identity("g", 1))
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.connect(endpoint)
    link = BarrierLink(sock, endpoint, group="g", rank=1, world_size=2, role="prefill", max_frame=1 << 20)
    service = ctx.socket(zmq.ROUTER)
    try:
        word = Withdraw("g", "r1", 0, 1, Status.FAILED, "refused", peer="d")
        link.send(word)
        assert len(link.unsent) == 1 and link.unsent.next_deadline() is not None
        due = link.unsent.next_deadline() or 0.0
        link.retry(due - 0.1)  # (not due yet: nothing changes)
        assert len(link.unsent) == 1
        service.bind(endpoint)
        for i in range(1000):  # each retry is one send attempt, 0.2 s later on the link's clock
            if not len(link.unsent):
                break
            link.retry(due + 0.2 * i)
            service.poll(10)  # (waits for the connection to come up, if the word is not there)
        assert len(link.unsent) == 0, "the kept word was never sent"
        assert service.poll(5000), "the kept word never reached the service"
        _, frame = service.recv_multipart()
        assert decode(frame) == word and len(link.unsent) == 0
    finally:
        for s in (sock, service):
            s.close(linger=0)
        ctx.term()
