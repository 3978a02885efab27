"""Pure msgpack codec: message objects to frames and back.

A frame is one msgpack array ``[PROTOCOL_VERSION, tag, *fields]``; nested
structs are arrays of their fields, lists of structs are arrays of arrays.
No pickle, no maps of field names: the field order is the schema, and any
change to it bumps :data:`PROTOCOL_VERSION`.

:func:`decode` never returns a half-valid object: anything wrong with a frame
(truncated, not msgpack, wrong version, unknown tag, wrong field count or
type, out-of-range values, oversize) raises
:class:`~kvxferd.errors.RemoteProtocolError` naming the problem.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from kvxferd.errors import LocalProtocolError, RemoteProtocolError
from kvxferd.protocol import barrier, fields, messages
from kvxferd.protocol.base import PROTOCOL_VERSION, Message, Struct

#: Default largest frame accepted (bytes).
DEFAULT_MAX_FRAME = 4 << 20

_MESSAGE_TYPES: tuple[type[Message], ...] = (
    messages.LayerSignal,
    messages.CacheInfo,
    messages.Abort,
    messages.TransferResult,
    messages.KVReady,
    messages.Received,
    messages.RegisterCache,
    messages.PeerQuery,
    messages.PeerInfo,
    messages.Ack,
    messages.Error,
    messages.Attach,
    messages.StatusQuery,
    messages.StatusReply,
    messages.BlockOffer,
    messages.OfferDeclined,
    barrier.Hello,
    barrier.Admit,
    barrier.Admitted,
    barrier.Arrive,
    barrier.Withdraw,
    barrier.Release,
    barrier.Diverged,
    barrier.Expired,
)

#: Tag → message class, for every message of the protocol.
REGISTRY: dict[str, type[Message]] = {cls.TAG: cls for cls in _MESSAGE_TYPES}
assert len(REGISTRY) == len(_MESSAGE_TYPES), "duplicate message tag"


_SCHEMAS: dict[type, tuple[tuple[str, ...], int]] = {}


def _schema(cls: Any) -> tuple[tuple[str, ...], int]:
    """Field names in wire order, and how many of them are required (cached per class)."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        fields = dataclasses.fields(cls)
        required = sum(
            1 for fl in fields if fl.default is dataclasses.MISSING and fl.default_factory is dataclasses.MISSING
        )
        schema = _SCHEMAS[cls] = (tuple(fl.name for fl in fields), required)
    return schema


def _to_wire(obj: Struct) -> list[Any]:
    nested = obj.NESTED
    out: list[Any] = []
    for name in _schema(type(obj))[0]:
        value = getattr(obj, name)
        if name in nested and value is not None:
            value = [_to_wire(v) for v in value] if isinstance(nested[name], list) else _to_wire(value)
        out.append(value)
    return out


#: per struct class: (position, name, what it holds) of each field holding structs (cached)
_NESTED: dict[type, tuple[tuple[int, str, Any], ...]] = {}


def _nested(cls: Any) -> tuple[tuple[int, str, Any], ...]:
    found = _NESTED.get(cls)
    if found is None:
        names = _schema(cls)[0]
        found = _NESTED[cls] = tuple((i, n, cls.NESTED[n]) for i, n in enumerate(names) if n in cls.NESTED)
    return found


def _from_wire(cls: type[Any], items: Any, where: str) -> Any:
    if not isinstance(items, (list, tuple)):
        raise RemoteProtocolError(f"{where}: expected an array for {cls.__name__}, got {type(items).__name__}")
    names, required = _schema(cls)
    if not required <= len(items) <= len(names):
        raise RemoteProtocolError(
            f"{where}: {cls.__name__} takes {required}..{len(names)} fields ({', '.join(names)}), got {len(items)}"
        )
    values = list(items)
    for i, name, kind in _nested(cls):
        if i >= len(values) or values[i] is None:
            continue
        if isinstance(kind, list):
            if not isinstance(values[i], (list, tuple)):
                raise RemoteProtocolError(f"{where}: {cls.__name__}.{name} must be an array")
            limit = cls.LIMITS.get(name, fields.MAX_ITEMS)
            if len(values[i]) > limit:  # counted before a single element is built
                raise RemoteProtocolError(f"{where}: {cls.__name__}.{name} has {len(values[i])} items, at most {limit}")
            values[i] = tuple(_from_wire(kind[0], v, f"{where}.{name}[{j}]") for j, v in enumerate(values[i]))
        else:
            values[i] = _from_wire(kind, values[i], f"{where}.{name}")
    try:
        return cls(*values)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"{where}: {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:  # a check that let a value through to a builtin
        text = fields.clip(str(exc), 200)
        raise RemoteProtocolError(f"{where}: {cls.__name__}: {type(exc).__name__}: {text}") from None


def _check_count(cls: type[Any], name: str, frame: bytes, at: int, where: str) -> None:
    """The item count an array header at ``frame[at]`` claims, against the field's own limit."""
    if at >= len(frame):
        return  # truncated: the parser says so
    head = frame[at]
    if 0x90 <= head <= 0x9F:
        count = head & 0x0F
    elif head in (0xDC, 0xDD):
        size = 2 if head == 0xDC else 4
        count = int.from_bytes(frame[at + 1 : at + 1 + size], "big")
    else:
        return  # not an array: the struct's own check says what it is
    limit = cls.LIMITS.get(name, fields.MAX_ITEMS)
    if count > limit:
        raise RemoteProtocolError(f"{where}: {cls.__name__}.{name} has {count} items, at most {limit}")


def encode(msg: Message) -> bytes:
    """Serialise one message into a frame."""
    if type(msg).TAG not in REGISTRY:
        raise LocalProtocolError(f"{type(msg).__name__} is not a protocol message")
    frame: bytes = msgpack.packb([PROTOCOL_VERSION, msg.TAG, *_to_wire(msg)], use_bin_type=True)
    return frame


#: a frame up to this long is first parsed in one call (most of a request's messages are layer
#: signals of about 12 bytes): it cannot hold more items than bytes, so the field-by-field parse
#: of the general path, which counts a long list before building any of it, has nothing to bound
#: here. Only what that parse accepts is taken; anything else goes the general way, which says
#: what is wrong in its own words.
SMALL_FRAME = 256
_SMALL = {
    "raw": False,
    "use_list": True,
    "strict_map_key": True,
    "max_str_len": fields.MAX_BLOB,
    "max_bin_len": fields.MAX_BLOB,
    "max_array_len": fields.MAX_BLOCKS,
    "max_map_len": 64,
    "max_ext_len": 0,
}


def decode(frame: bytes, *, max_bytes: int = DEFAULT_MAX_FRAME) -> Message:
    """Parse and validate one frame; raises RemoteProtocolError on anything wrong."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError(f"frame must be bytes, got {type(frame).__name__}")
    if len(frame) > max_bytes:
        raise RemoteProtocolError(f"frame of {len(frame)} bytes exceeds the {max_bytes}-byte limit")
    if not frame:
        raise RemoteProtocolError("empty frame")
    if len(frame) <= _LAYER_LONGEST and frame[: len(_LAYER_HEAD)] == _LAYER_HEAD:
        sig = _bare_layer(bytes(frame))
        if sig is not None:
            return sig
    if len(frame) <= SMALL_FRAME:
        msg = _small(frame)
        if msg is not None:
            return msg
    return _general(frame)


#: ``[5, "layer", step, layer, []]``: a layer signal with no slot table (every layer after the
#: first: 31 of a 32-layer request's 41 messages), the one message worth a parser of its own
_LAYER_HEAD = bytes([0x95, PROTOCOL_VERSION, 0xA5]) + b"layer"
_LAYER_LONGEST = len(_LAYER_HEAD) + 9 + 9 + 1
#: msgpack's unsigned integer heads: the bytes that follow each
_UINT_SIZE = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def _uint_at(frame: bytes, at: int) -> tuple[int, int]:
    """The unsigned integer encoded at ``frame[at]`` and where the next item starts; (-1, 0) if
    none is (a signed or other head: the general path says what it is)."""
    if at >= len(frame):
        return -1, 0
    head = frame[at]
    if head < 0x80:
        return head, at + 1
    size = _UINT_SIZE.get(head)
    if size is None or at + 1 + size > len(frame):
        return -1, 0
    return int.from_bytes(frame[at + 1 : at + 1 + size], "big"), at + 1 + size


def _bare_layer(frame: bytes) -> Message | None:
    """A layer signal with no slot table, built without the general parse, or None if ``frame``
    is anything else or anything about it is wrong (the general path then says what). It takes
    exactly what the general path takes to the same message: a step in ``[0, MAX_ID]``, a layer
    in ``[0, 2**16]``, an empty slot table, nothing after it (tests/unit/test_codec_fuzz.py)."""
    step, at = _uint_at(frame, len(_LAYER_HEAD))
    layer, at = _uint_at(frame, at) if step >= 0 else (-1, 0)
    if not (0 <= step <= fields.MAX_ID and 0 <= layer <= 1 << 16) or frame[at:] != b"\x90":
        return None
    return messages.LayerSignal.checked(step, layer)


def _small(frame: bytes) -> Message | None:
    """A short frame parsed in one call and built, or None if anything about it is not as it
    should be (the general path then finds what, and says so)."""
    try:
        items = msgpack.unpackb(frame, **_SMALL)
        if type(items) is not list or len(items) < 2 or items[0] != PROTOCOL_VERSION or type(items[0]) is not int:
            return None
        cls = REGISTRY.get(items[1]) if type(items[1]) is str else None
        if cls is None or len(items) - 2 > len(_schema(cls)[0]):
            return None
        msg: Message = _from_wire(cls, items[2:], items[1])
    except Exception:
        return None
    return msg


def _general(frame: bytes) -> Message:
    """Parse ``frame`` field by field, counting each list of structs before building any of it."""
    unpacker = msgpack.Unpacker(
        raw=False,
        use_list=True,
        strict_map_key=True,
        # Bounds applied while parsing, before any object is built: no string, blob, list or map off
        # the wire can be larger than the largest field that may hold it.
        max_buffer_size=len(frame),
        max_str_len=fields.MAX_BLOB,
        max_bin_len=fields.MAX_BLOB,
        max_array_len=fields.MAX_BLOCKS,
        max_map_len=64,
        max_ext_len=0,
    )
    unpacker.feed(frame)
    try:
        count = unpacker.read_array_header()
        if count < 2:
            raise RemoteProtocolError("a frame must be an array [version, tag, fields...]")
        version, tag = unpacker.unpack(), unpacker.unpack()
        if version != PROTOCOL_VERSION or type(version) is not int:
            raise RemoteProtocolError(
                f"protocol version {fields.show(version)} is not supported (this side speaks {PROTOCOL_VERSION})"
            )
        cls = REGISTRY.get(tag) if isinstance(tag, str) else None
        if cls is None:
            raise RemoteProtocolError(f"unknown message tag {fields.show(tag)}")
        names = _schema(cls)[0]
        if count - 2 > len(names):
            raise RemoteProtocolError(f"{tag}: {cls.__name__} takes at most {len(names)} fields, got {count - 2}")
        items: list[Any] = [version, tag]
        for name in names[: count - 2]:
            if isinstance(cls.NESTED.get(name), list):  # a list of structs: its count before any item
                _check_count(cls, name, frame, unpacker.tell(), tag)
            items.append(unpacker.unpack())
    except RemoteProtocolError:
        raise
    except msgpack.OutOfData:
        raise RemoteProtocolError("not a msgpack frame (truncated)") from None
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError, OverflowError) as exc:
        raise RemoteProtocolError(f"not a msgpack frame ({type(exc).__name__}: {fields.clip(str(exc), 200)})") from None
    if unpacker.tell() != len(frame):
        raise RemoteProtocolError("trailing bytes after the message")
    msg: Message = _from_wire(cls, items[2:], tag)
    return msg
