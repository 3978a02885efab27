"""The rdma blob a decode daemon publishes is untrusted input at prefill: every bad one is a
TransportError with a short text, never an OverflowError, MemoryError or a crash."""

from __future__ import annotations

import math

import msgpack
import pytest

from kvxferd.errors import TransportError
from kvxferd.transports.rdma import BLOB_VERSION, PeerBlob

GOOD = PeerBlob("agent-d0", b"\x01" * 32, "DRAM", ((0, 0, 4096, 0), (0, 1, 8192, 0)))


def test_a_good_blob_round_trips() -> None:
    assert PeerBlob.unpack(GOOD.pack()) == GOOD


@pytest.mark.parametrize(
    "items",
    [
        [BLOB_VERSION, "a", b"m", "DRAM", [[0, 0, math.inf, 0]]],
        [BLOB_VERSION, "a", b"m", "DRAM", [[0, 0, 1e300, 0]]],
        [BLOB_VERSION, "a", b"m", "DRAM", [[0, 0, -1, 0]]],
        [BLOB_VERSION, "a", b"m", "DRAM", [[0, 2, 4096, 0]]],
        [BLOB_VERSION, "a", b"m", "DRAM", [[0, 0, 4096]]],
        [BLOB_VERSION, "a", b"m", "DRAM", [[True, 0, 4096, 0]]],
        [BLOB_VERSION, "a", "not bytes", "DRAM", []],
        [BLOB_VERSION, "", b"m", "DRAM", []],
        [BLOB_VERSION, "a" * 5000, b"m", "DRAM", []],
        [BLOB_VERSION + 1, "a", b"m", "DRAM", []],
        [BLOB_VERSION, "a", b"m", "HBM", []],
        [BLOB_VERSION, "a", b"m", "DRAM"],
        {"a": 1},
    ],
)
def test_bad_blobs_are_transport_errors(items: object) -> None:
    with pytest.raises(TransportError, match="malformed") as info:
        PeerBlob.unpack(msgpack.packb(items, use_bin_type=True))
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    "blob",
    [
        b"\x95\x01\xa1a\xc6\x40\x00\x00\x00",  # a bin claiming 1 GiB inside a 9-byte blob
        b"\x95\x01\xa1a\xc4\x01m\xa4DRAM\xdd\xff\xff\xff\xff",  # 4 billion regions claimed
        b"",
        b"\xc1",
    ],
)
def test_sizes_claimed_by_a_blob_are_checked_before_anything_is_allocated(blob: bytes) -> None:
    with pytest.raises(TransportError, match="malformed"):
        PeerBlob.unpack(blob)
