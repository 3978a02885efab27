"""The codec fuzzed directly: whatever a frame holds, decoding it returns a valid message or
raises :class:`RemoteProtocolError` with a short text. Nothing else escapes, nothing hangs.

Inputs are mutations of every valid example message, structural (a field replaced by a hostile
value, a list grown or cut) and byte-level (bytes flipped, inserted, removed), so most of them get
past msgpack and reach the field checks.
"""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvxferd.errors import RemoteProtocolError
from kvxferd.protocol import Error, ErrorCode, LayerSignal, Message, SlotChunk, codec, decode, encode
from tests.unit.test_protocol import EXAMPLES

FRAMES = [encode(msg) for _, msg in sorted(EXAMPLES.items())]

HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1 << 31, (1 << 63) - 1, -(1 << 63), (1 << 64) - 1, 1 << 48]),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", ".", "..", "../../etc/passwd", "a/b", "x" * 5000, "\x00", "ok", "auto", "shm"]),
    st.text(max_size=40),
    st.binary(max_size=64),
    st.lists(st.integers(min_value=-2, max_value=1 << 40), max_size=6),
    st.dictionaries(st.text(max_size=4), st.binary(max_size=4), max_size=3),
)


def _paths(value: Any, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


def _replace(value: Any, path: tuple[int, ...], new: Any) -> Any:
    if not path:
        return new
    copy = list(value)
    copy[path[0]] = _replace(copy[path[0]], path[1:], new)
    return copy


@st.composite
def structural(draw: st.DrawFn) -> bytes:
    items = msgpack.unpackb(draw(st.sampled_from(FRAMES)), raw=False)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(items)
        path = draw(st.sampled_from(paths))
        if path == (0,) and draw(st.booleans()):
            continue  # mostly keep the version, so the field checks are reached
        items = _replace(items, path, draw(HOSTILE))
    if draw(st.booleans()) and len(items) > 2:
        items = items[: draw(st.integers(2, len(items)))] + draw(st.lists(HOSTILE, max_size=2))
    packed: bytes = msgpack.packb(items, use_bin_type=draw(st.booleans()))
    return packed


@st.composite
def byte_level(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(frame) - 1)))
        if op == "flip" and frame:
            frame[at] = draw(st.integers(0, 255))
        elif op == "insert":
            frame[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif frame:
            del frame[at : at + draw(st.integers(1, 8))]
    return bytes(frame)


def _decodes_cleanly(frame: bytes) -> None:
    try:
        msg = decode(frame)
    except RemoteProtocolError as exc:
        text = str(exc)
        assert 0 < len(text) < 1200
        Error(ErrorCode.BAD_MESSAGE, text)  # the daemon's answer can always be built
        return
    assert isinstance(msg, Message)
    assert decode(encode(msg)) == msg  # what is accepted is a valid message in every respect


FUZZ = settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@FUZZ
@given(structural())
def test_structural_mutations_decode_or_fail_cleanly(frame: bytes) -> None:
    _decodes_cleanly(frame)


@FUZZ
@given(byte_level())
def test_byte_mutations_decode_or_fail_cleanly(frame: bytes) -> None:
    _decodes_cleanly(frame)


def _outcome(parse: Any, frame: bytes) -> Any:
    try:
        return parse(frame)
    except RemoteProtocolError as exc:
        return str(exc)


@FUZZ
@given(st.one_of(structural(), byte_level()))
def test_a_short_frame_parsed_at_once_ends_as_the_field_by_field_parse_does(frame: bytes) -> None:
    """Frames up to SMALL_FRAME take a quicker parse: what it accepts, and every error text, is
    the general parse's own."""
    quick = _outcome(decode, frame)
    assert quick == _outcome(_general, frame)


def _general(frame: bytes) -> Any:
    """``decode`` with every quicker parse turned off."""
    small, longest, codec.SMALL_FRAME, codec._LAYER_LONGEST = codec.SMALL_FRAME, codec._LAYER_LONGEST, 0, 0
    try:
        return decode(frame)
    finally:
        codec.SMALL_FRAME, codec._LAYER_LONGEST = small, longest


#: every way msgpack may write an unsigned integer (positive fixint, then 1, 2, 4 and 8 bytes,
#: whatever the value's size: the padded forms are valid msgpack too), and a signed one
_HEADS = [b"", b"\xcc", b"\xcd", b"\xce", b"\xcf", b"\xd3"]


def _uint(value: int, head: bytes) -> bytes:
    size = {b"": 0, b"\xcc": 1, b"\xcd": 2, b"\xce": 4, b"\xcf": 8, b"\xd3": 8}[head]
    if head == b"":
        return bytes([value & 0x7F])
    return head + (value % (1 << (8 * size))).to_bytes(size, "big")


@st.composite
def layer_frames(draw: st.DrawFn) -> bytes:
    """Frames shaped like a layer signal without a slot table, at and around every bound: any
    integer head, values about 0, 2**16 and 2**63, a tail that is or is not the empty table."""
    edges = st.sampled_from([0, 1, 127, 128, 255, 256, 65535, 65536, 65537, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])
    values = st.one_of(edges, st.integers(min_value=0, max_value=(1 << 64) - 1))
    step, layer = draw(values), draw(values)
    frame = codec._LAYER_HEAD + _uint(step, draw(st.sampled_from(_HEADS))) + _uint(layer, draw(st.sampled_from(_HEADS)))
    frame += draw(st.sampled_from([b"\x90", b"\x91\x90", b"", b"\x90\x00", b"\xc0", b"\xdc\x00\x00"]))
    cut = draw(st.integers(min_value=0, max_value=len(frame)))
    return frame if draw(st.booleans()) else frame[:cut]


@settings(FUZZ, max_examples=2_000)
@given(layer_frames())
def test_a_layer_signal_parsed_by_its_own_parser_ends_as_the_general_parse_does(frame: bytes) -> None:
    """The commonest frame has a parser of its own: it takes exactly what the general parse
    takes, to the same signal, and leaves the rest (with its error text) to it."""
    assert _outcome(decode, frame) == _outcome(_general, frame)
    taken = codec._bare_layer(frame)
    if taken is not None:
        assert taken == _general(frame)
        assert type(taken.step) is int and type(taken.layer) is int and taken.slots == ()


def test_the_layer_signals_a_worker_sends_take_their_own_parser() -> None:
    """(The property above would hold if that parser never took anything.)"""
    for step, layer in [(0, 1), (17, 31), (1 << 40, 1 << 16), ((1 << 63) - 1, 0)]:
        sig = LayerSignal(step, layer)
        assert codec._bare_layer(encode(sig)) == sig
    assert codec._bare_layer(encode(LayerSignal(5, 0, (SlotChunk(0, 0, 16, 5),)))) is None
    small, general = codec.SMALL_FRAME, codec._general
    codec.SMALL_FRAME, codec._general = 0, None  # type: ignore[assignment]  # (decode takes it before either)
    try:
        assert decode(encode(LayerSignal(17, 3))) == LayerSignal(17, 3)
    finally:
        codec.SMALL_FRAME, codec._general = small, general


def test_every_example_message_short_enough_takes_the_quick_parse() -> None:
    """(The property above would hold if the quick parse never took anything: every valid example
    of up to SMALL_FRAME bytes, a layer signal among them, is taken by it, equal to the original.)"""
    pairs = zip(FRAMES, sorted(EXAMPLES.items()), strict=True)
    short = [(frame, msg) for frame, (_, msg) in pairs if len(frame) <= codec.SMALL_FRAME]
    assert any(isinstance(msg, LayerSignal) for _, msg in short)
    for frame, msg in short:
        assert codec._small(frame) == msg
