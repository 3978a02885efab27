"""Which transport a request to a peer uses, and what a malformed rdma peer blob does."""

from __future__ import annotations

import msgpack
import pytest

from kvxferd.errors import TransportError, TransportUnavailable
from kvxferd.transports import REGISTRY, choose, load


@pytest.mark.parametrize(
    ("requested", "prefer", "local", "peer", "same_host", "expected"),
    [
        ("auto", "auto", "host", "host", True, "shm"),
        ("auto", "auto", "gpu", "gpu", True, "cuda_ipc"),
        ("auto", "auto", "host", "host", False, "rdma"),
        ("auto", "auto", "gpu", "gpu", False, "rdma"),
        ("auto", "auto", "host", "gpu", True, "rdma"),  # mixed memory on one host: only rdma moves it
        ("auto", "rdma", "host", "host", True, "rdma"),  # the config's preference
        ("shm", "rdma", "host", "host", True, "shm"),  # the request's own choice wins
        ("cuda_ipc", "auto", "host", "host", True, "cuda_ipc"),
    ],
)
def test_choose(requested: str, prefer: str, local: str, peer: str, same_host: bool, expected: str) -> None:
    assert choose(requested, prefer, local_memory=local, peer_memory=peer, same_host=same_host) == expected


def test_every_registered_transport_imports_lazily_or_says_why_not() -> None:
    for name in REGISTRY:
        reason = ""
        try:
            cls = load(name)
        except TransportUnavailable as exc:  # e.g. NIXL not installed: the reason must say so
            reason = str(exc)
        if reason:
            assert name in reason or "not installed" in reason
        else:
            assert cls.name == name
    with pytest.raises(TransportUnavailable, match="unknown transport 'pigeon'"):
        load("pigeon")


@pytest.mark.parametrize(
    "blob",
    [
        b"\xc1",
        msgpack.packb([99, "a", b"md", "DRAM", []]),
        msgpack.packb([1, "a", b"md", "SSD", []]),
        msgpack.packb([1, "a", b"md", "DRAM", [[0, 0, "x", 0]]]),
        msgpack.packb({"agent": "a"}),
    ],
)
def test_malformed_rdma_blob_is_a_transport_error(blob: bytes) -> None:
    rdma = pytest.importorskip("kvxferd.transports.rdma")
    with pytest.raises(TransportError, match="rdma metadata is malformed"):
        rdma.PeerBlob.unpack(blob)
