"""The wire protocol: every message round-trips; every malformed frame is a protocol error."""

from __future__ import annotations

import math

import msgpack
import pytest

from kvxferd.errors import LocalProtocolError, RemoteProtocolError
from kvxferd.protocol import (
    PROTOCOL_VERSION,
    REGISTRY,
    STARTUP_KEY,
    Abort,
    Ack,
    Admit,
    Admitted,
    Arrive,
    Attach,
    BlockOffer,
    CacheInfo,
    CacheLayout,
    Digest,
    Diverged,
    Error,
    ErrorCode,
    Expired,
    Hello,
    KVReady,
    LayerSignal,
    Message,
    OfferDeclined,
    PeerInfo,
    PeerQuery,
    RankView,
    Received,
    Region,
    RegisterCache,
    Release,
    SlotChunk,
    Status,
    StatusQuery,
    StatusReply,
    Terms,
    TransferResult,
    Withdraw,
    decode,
    encode,
)

LAYOUT = CacheLayout(2, 64, 4096)
REGIONS = tuple(Region(layer, kv, "kvx-seg", (2 * layer + kv) * 64 * 4096) for layer in range(2) for kv in (0, 1))
DIGEST = Digest(32, 13, 27262976, "9f2c3b1a0e4d5c6b")
TERMS = Terms(200, 3, 17, "13 blocks #9f2c3b1a0e4d5c6b", "13 blocks #0e4d5c6b9f2c3b1a", "ipc:///d-{rank}.sock", "auto")

EXAMPLES: dict[str, Message] = {
    "layer": LayerSignal(17, 0, (SlotChunk(3, 0, 128, 17), SlotChunk(5, 512, 64, 15))),
    "cache_info": CacheInfo(
        "req-7",
        3,
        17,
        200,
        (10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22),
        tuple(range(40, 53)),
        "ipc:///run/kvxferd/decode-{rank}.sock",
        "shm",
        4,
        ("5d0c9e2a71b4", "a1c3f09b2e77"),
    ),
    "abort": Abort("req-7", "client cancelled", 4),
    "result": TransferResult(
        "req-7", Status.FAILED, "table full", 1, 0, "rdma", 0.4, 2.1, 2.9, 4, ErrorCode.TABLE_FULL.value, 0.2
    ),
    "kv_ready": KVReady("req-7", 0, 1 << 20, 4),
    "received": Received("req-7", 0, 4, Status.FAILED, "old registration", "not_registered"),
    "register": RegisterCache("host", LAYOUT, REGIONS),
    "peer_query": PeerQuery("prefill", 0),
    "peer_info": PeerInfo(
        "decode",
        1,
        "host-a1",
        "gpu",
        LAYOUT,
        tuple(Region(r.layer, r.kv, b"\x01" * 64, 128 + r.offset, 3) for r in REGIONS),
        {"rdma": b"\x00md"},
    ),
    "ack": Ack("register", "5d0c9e2a71b4"),
    "error": Error(ErrorCode.OUT_OF_RANGE, "src block 9000 >= 4096 blocks", "req-7"),
    "hello": Hello("prefill", 1, 2, "prefill"),
    "admit": Admit("prefill", "req-7", 4, 1, TERMS),
    "admitted": Admitted("prefill", "req-7", 4),
    "arrive": Arrive("prefill", "req-7", 4, 1, DIGEST, 12.5),
    "withdraw": Withdraw("prefill", "req-7", 4, 1, Status.ABORTED, "client cancelled"),
    "release": Release("prefill", "req-7", 4, DIGEST),
    "diverged": Diverged(
        "prefill",
        "req-7",
        4,
        Status.ABORTED,
        "aborted: x",
        (RankView(0, Status.OK, DIGEST), RankView(1, Status.ABORTED, reason="x"), RankView(2, Status.OK, terms=TERMS)),
        "ipc:///d-{rank}.sock",
    ),
    "expired": Expired("prefill", "req-7", 4, (1, 3), 30.0, Status.FAILED, "ranks [1, 3] did not report"),
    "status": StatusQuery(),
    "attach": Attach("scheduler"),
    "status_reply": StatusReply("prefill", "prefill", 0, "serving", '{"requests": []}'),
    "block_offer": BlockOffer("xfer-7", "decode", 0, 200, (40, 41), "5d0c9e2a71b4"),
    "offer_declined": OfferDeclined("xfer-7", "the prompt was aborted"),
}


def test_every_message_has_an_example() -> None:
    assert set(EXAMPLES) == set(REGISTRY)


@pytest.mark.parametrize("tag", sorted(EXAMPLES))
def test_round_trip(tag: str) -> None:
    msg = EXAMPLES[tag]
    frame = encode(msg)
    back = decode(frame)
    assert back == msg and type(back) is type(msg)
    assert encode(back) == frame


@pytest.mark.parametrize("tag", sorted(EXAMPLES))
def test_every_message_documents_a_wire_example(tag: str) -> None:
    doc = REGISTRY[tag].__doc__ or ""
    assert "Wire:" in doc and f'"{tag}"' in doc


def raw(*items: object) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)


GOOD = encode(EXAMPLES["cache_info"])
_, _, *CI = msgpack.unpackb(GOOD)

MALFORMED = {
    "empty": b"",
    "truncated": GOOD[:-3],
    "not msgpack": b"\xc1\xc1\xc1",
    "trailing bytes": GOOD + b"\x00",
    "not an array": msgpack.packb({"tag": "abort"}),
    "too short": raw(PROTOCOL_VERSION),
    "wrong version": raw(PROTOCOL_VERSION + 1, "abort", "r", ""),
    "version as string": raw(str(PROTOCOL_VERSION), "abort", "r", ""),
    "unknown tag": raw(PROTOCOL_VERSION, "launch_missiles", 1),
    "tag not a string": raw(PROTOCOL_VERSION, 7, "r"),
    "missing fields": raw(PROTOCOL_VERSION, "cache_info", "r", 3),
    "extra fields": raw(PROTOCOL_VERSION, "abort", "r", "why", 0, "extra"),
    "negative instance": raw(PROTOCOL_VERSION, "abort", "r", "why", -1),
    "instance not an int": raw(PROTOCOL_VERSION, "kv_ready", "r", 0, 0, "1"),
    "refusal code on ok": raw(PROTOCOL_VERSION, "result", "r", "ok", "", 0, 0, "", 0, 0, 0, 0, "table_full"),
    "unknown refusal code": raw(PROTOCOL_VERSION, "result", "r", "failed", "x", 0, 0, "", 0, 0, 0, 0, "teapot"),
    "admit without terms": raw(PROTOCOL_VERSION, "admit", "g", "k", 0, 0, None),
    "terms with bad transport": raw(PROTOCOL_VERSION, "admit", "g", "k", 0, 0, [1, 0, 0, "b", "b", "p", "pigeon"]),
    "diverged as ok": raw(PROTOCOL_VERSION, "diverged", "g", "k", 0, "ok", "why", [], ""),
    "expired without reason": raw(PROTOCOL_VERSION, "expired", "g", "k", 0, [1], 1.0, "failed", ""),
    "view with terms and digest": raw(
        PROTOCOL_VERSION,
        "diverged",
        "g",
        "k",
        0,
        "failed",
        "x",
        [[0, "ok", [1, 1, 1, "f"], [1, 0, 0, "b", "b", "p", "auto"], ""]],
    ),
    "wrong type": raw(PROTOCOL_VERSION, "cache_info", CI[0], "3", *CI[2:]),
    "bool as int": raw(PROTOCOL_VERSION, "cache_info", CI[0], True, *CI[2:]),
    "negative block id": raw(PROTOCOL_VERSION, "cache_info", *CI[:4], [-1, *CI[4][1:]], *CI[5:]),
    "block id too large": raw(PROTOCOL_VERSION, "cache_info", *CI[:4], [1 << 63, *CI[4][1:]], *CI[5:]),
    "block lists differ": raw(PROTOCOL_VERSION, "cache_info", *CI[:4], CI[4][:-1], *CI[5:]),
    "duplicate destination": raw(PROTOCOL_VERSION, "cache_info", *CI[:5], [40] * len(CI[5]), *CI[6:]),
    "no blocks": raw(PROTOCOL_VERSION, "cache_info", *CI[:4], [], [], *CI[6:]),
    "unknown transport": raw(PROTOCOL_VERSION, "cache_info", *CI[:7], "carrier-pigeon"),
    "empty request id": raw(PROTOCOL_VERSION, "abort", "", ""),
    "nested not an array": raw(PROTOCOL_VERSION, "layer", 1, 0, [7]),
    "nested wrong arity": raw(PROTOCOL_VERSION, "layer", 1, 0, [[3, 0]]),
    "zero token count": raw(PROTOCOL_VERSION, "layer", 1, 0, [[3, 0, 0, 1]]),
    "start step after step": raw(PROTOCOL_VERSION, "layer", 1, 0, [[3, 0, 8, 2]]),
    "slot table on layer 1": raw(PROTOCOL_VERSION, "layer", 1, 1, [[3, 0, 8, 1]]),
    "slot twice in a step": raw(PROTOCOL_VERSION, "layer", 1, 0, [[3, 0, 8, 1], [3, 8, 8, 1]]),
    "unknown status": raw(PROTOCOL_VERSION, "result", "r", "meh", "why"),
    "failure without reason": raw(PROTOCOL_VERSION, "result", "r", "failed", ""),
    "NaN timing": raw(PROTOCOL_VERSION, "result", "r", "ok", "", 0, 0, "", math.nan),
    "unknown error code": raw(PROTOCOL_VERSION, "error", "teapot", "x"),
    "missing region": raw(PROTOCOL_VERSION, "register", "host", [2, 64, 4096], [[0, 0, "s", 0, 0]]),
    "arrive without digest": raw(PROTOCOL_VERSION, "arrive", "g", "k", 0, 0, None),
    "withdraw as ok": raw(PROTOCOL_VERSION, "withdraw", "g", "k", 0, 0, "ok", "why"),
    "rank outside world": raw(PROTOCOL_VERSION, "hello", "g", 2, 2, "prefill"),
    "string too long": raw(PROTOCOL_VERSION, "abort", "r" * 300, ""),
    "map key not a string": raw(PROTOCOL_VERSION, "peer_info", "d", 0, "h", "host", [2, 64, 4096], [], {1: b""}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frames_raise_a_remote_protocol_error(case: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(MALFORMED[case])
    assert str(info.value)  # says what is wrong


def test_oversize_frames_are_refused_before_parsing() -> None:
    frame = encode(Abort("r", "x" * 4000))
    assert decode(frame, max_bytes=len(frame)) == Abort("r", "x" * 4000)
    with pytest.raises(RemoteProtocolError, match="exceeds the 100-byte limit"):
        decode(frame, max_bytes=100)


def test_errors_name_the_message_and_field() -> None:
    with pytest.raises(RemoteProtocolError, match=r"CacheInfo\.src_blocks\[0\]: -1 is outside"):
        decode(MALFORMED["negative block id"])
    with pytest.raises(RemoteProtocolError, match=f"version {PROTOCOL_VERSION + 1} is not supported"):
        decode(MALFORMED["wrong version"])


def test_constructors_validate_locally_too() -> None:
    with pytest.raises(LocalProtocolError, match=r"CacheInfo\.num_tokens"):
        CacheInfo("r", 0, 0, 0, (1,), (2,), "p")
    with pytest.raises(LocalProtocolError, match="only layer 0 carries a slot table"):
        LayerSignal(3, 2, (SlotChunk(0, 0, 1, 3),))
    # lists are accepted and stored as tuples, so messages stay hashable and immutable
    msg = CacheInfo("r", 0, 0, 1, [1], [2], "p")  # type: ignore[arg-type]
    assert msg.src_blocks == (1,) and hash(msg)
    with pytest.raises(LocalProtocolError, match=r"CacheInfo\.dst_generations\[1\]: must not be empty"):
        CacheInfo("r", 0, 0, 1, (1,), (2,), "p", dst_generations=("a", ""))
    with pytest.raises(LocalProtocolError, match=r"CacheInfo\.dst_generations: 4097 items"):
        CacheInfo("r", 0, 0, 1, (1,), (2,), "p", dst_generations=("a",) * 4097)


# -- bounds at the edge: every refusal is a short, clean protocol error ----------------------------


@pytest.mark.parametrize(
    "frame",
    [
        raw(PROTOCOL_VERSION, "T" * 5000),  # an unknown tag quoted in the error
        raw("V" * 5000, "abort", "r", ""),  # a version that is a long string
        raw(PROTOCOL_VERSION, "result", "r", "x" * 5000, "", 0),  # a long value in a choice field
        raw(PROTOCOL_VERSION, "error", "y" * 5000, "detail", ""),
    ],
)
def test_a_long_value_in_an_error_text_is_clipped_never_raised(frame: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(frame)
    assert len(str(info.value)) < 1200
    Error(ErrorCode.BAD_MESSAGE, str(info.value))  # the answer to the sender can always be built


def test_long_reasons_and_details_are_cut_not_refused() -> None:
    long = "z" * 20_000
    assert len(Abort("r", long).reason) == len(Withdraw("g", "k", 0, 0, "failed", long).reason) <= 4096
    assert len(Error(ErrorCode.INTERNAL, long, long).detail) <= 4096
    assert Error(ErrorCode.INTERNAL, "").detail == "(no detail)"
    # an ending built from an abort's reason (the verdict's text) still fits a result
    result = TransferResult("r", Status.ABORTED, "aborted: " + Abort("r", long).reason)
    assert len(result.reason) <= 4096


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e300, (1 << 63) - 1, (1 << 64) - 1])
def test_numbers_off_the_wire_are_finite_and_in_range(value: float) -> None:
    frame = raw(PROTOCOL_VERSION, "arrive", "g", "k", 0, 0, [1, 1, 64, "fp"], value)
    with pytest.raises(RemoteProtocolError, match="timeout_s"):
        decode(frame)


def test_list_counts_are_checked_before_any_element_is_built() -> None:
    slots = [[i, 0, 16, 1] for i in range(5000)]
    with pytest.raises(RemoteProtocolError, match="5000 items, at most 4096"):
        decode(raw(PROTOCOL_VERSION, "layer", 1, 0, slots))
    # elements that would each be refused are never looked at: the count fails first
    with pytest.raises(RemoteProtocolError, match="items, at most"):
        decode(raw(PROTOCOL_VERSION, "layer", 1, 0, [None] * 5000))


def test_block_ids_and_offsets_are_bounded_so_no_arithmetic_overflows() -> None:
    with pytest.raises(RemoteProtocolError, match="dst_blocks"):
        decode(raw(PROTOCOL_VERSION, "cache_info", "r", 0, 1, 16, [1], [(1 << 63) - 2], "d", "auto", 0))
    with pytest.raises(RemoteProtocolError, match="offset"):
        decode(raw(PROTOCOL_VERSION, "register", "host", [2, 64, 4096], [[0, 0, "s", 1 << 60, 0]]))


def test_deep_or_huge_msgpack_is_refused_while_parsing() -> None:
    # [3, "abort", [[[[...]]]], ""] nested 100,000 deep, written by hand (msgpack will not pack it)
    frame = b"\x94" + msgpack.packb(PROTOCOL_VERSION) + msgpack.packb("abort") + b"\x91" * 100_000 + b"\x90\xa0"
    with pytest.raises(RemoteProtocolError):
        decode(frame, max_bytes=1 << 20)
    with pytest.raises(RemoteProtocolError, match="not a msgpack frame"):  # a header claiming 2**32 items
        decode(b"\x92\x03\xdd\xff\xff\xff\xff")


def test_regions_that_share_a_handle_must_not_overlap() -> None:
    layout = CacheLayout(1, 4, 100)  # each region 400 bytes
    fine = (Region(0, 0, "seg", 0), Region(0, 1, "seg", 400))
    assert RegisterCache("host", layout, fine).regions == fine
    with pytest.raises(LocalProtocolError, match="overlap"):
        RegisterCache("host", layout, (Region(0, 0, "seg", 0), Region(0, 1, "seg", 399)))
    # the same offsets in different segments are not an overlap
    assert RegisterCache("host", layout, (Region(0, 0, "a", 0), Region(0, 1, "b", 0)))


def test_a_list_far_over_its_limit_is_refused_from_its_header_before_a_single_item_is_built() -> None:
    """Issue 23, item 15: a layer signal of a million empty slots fits in 1 MiB; parsing it whole
    built a million lists (a third of a second of the loop) before the count was checked. The count
    in the array's header is checked first: nothing of the list is built."""
    import tracemalloc

    frame = b"\x95" + msgpack.packb(PROTOCOL_VERSION) + msgpack.packb("layer") + b"\x01\x00"
    frame += b"\xdd" + (1_048_000).to_bytes(4, "big") + b"\x90" * 1_048_000
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError, match=r"LayerSignal\.slots has 1048000 items, at most 4096"):
            decode(frame, max_bytes=2 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(frame), f"{peak} bytes allocated to refuse it (the parser's copy of the frame aside)"


def test_no_request_may_take_the_barrier_s_start_up_key_as_its_id() -> None:
    """The barrier's start-up round is keyed by STARTUP_KEY: a request of that name would have its
    verdicts taken for the start-up round's (dropped: it could never write) and its words mixed
    into that round. It is refused where it comes in, naming the reason."""
    with pytest.raises(LocalProtocolError, match="reserved"):
        CacheInfo(STARTUP_KEY, 0, 1, 16, (0,), (0,), "decode")
    with pytest.raises(LocalProtocolError, match="reserved"):
        Abort(STARTUP_KEY)
