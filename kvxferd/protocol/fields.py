"""Field checks shared by every message constructor.

Messages validate themselves in ``__post_init__`` with these helpers. Each
helper names the message and the field in its error, and returns the value in
its canonical form (sequences become tuples), so a frozen message can store the
result with ``object.__setattr__``.

Errors are :class:`~kvxferd.errors.LocalProtocolError`; the codec re-raises
them as remote errors when the values came off the wire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvxferd.errors import LocalProtocolError

#: Upper bound for slots, steps, byte counts and other counters on the wire.
MAX_ID = (1 << 63) - 1
#: Upper bound for a block id (a cache has at most ``1 << 31`` blocks, see CacheLayout).
MAX_BLOCK_ID = (1 << 31) - 1
#: Largest byte offset of a region inside what its handle maps (256 TiB).
MAX_OFFSET = 1 << 48
#: Largest number accepted in a float field (seconds, milliseconds): about 31 years in seconds.
MAX_NUMBER = 1e9
#: Most slots one forward step may name (a batch).
MAX_SLOTS = 4096
#: Longest request id / group name / key we accept.
MAX_NAME = 256
#: Longest free-text field (reasons, details).
MAX_TEXT = 4096
#: Most ranks a group may have (a list with one entry per rank is at most this long).
MAX_RANKS = 4096
#: Most block ids one request may name.
MAX_BLOCKS = 1 << 20
#: Most entries in any other list field (slot tables, regions, views).
MAX_ITEMS = 1 << 16
#: Largest opaque blob (transport metadata, IPC handles).
MAX_BLOB = 1 << 20


def clip(value: str, limit: int = MAX_TEXT) -> str:
    """``value`` cut to at most ``limit`` characters, marked where it was cut. Never raises."""
    if len(value) <= limit:
        return value
    mark = f"... [cut from {len(value)} characters]"
    return value[: max(0, limit - len(mark))] + mark[:limit]


def fail(owner: str, field: str, problem: str) -> LocalProtocolError:
    return LocalProtocolError(clip(f"{owner}.{field}: {problem}", MAX_TEXT // 4))


def show(value: Any) -> str:
    """A short, safe rendering of a value from the wire for an error text."""
    try:
        return clip(repr(value), 64)
    except Exception:  # a hostile __repr__ cannot come off the wire, but an error text must never fail
        return f"<{type(value).__name__}>"


def uint(owner: str, field: str, value: Any, *, low: int = 0, high: int = MAX_ID) -> int:
    if type(value) is not int:  # bool is an int subclass; refuse it too
        raise fail(owner, field, f"expected an integer, got {type(value).__name__}")
    if value < low or value > high:
        raise fail(owner, field, f"{show(value)} is outside [{low}, {high}]")
    return value


def flag(owner: str, field: str, value: Any) -> bool:
    if type(value) is not bool:
        raise fail(owner, field, f"expected true or false, got {type(value).__name__}")
    return value


def number(owner: str, field: str, value: Any, *, low: float = 0.0, high: float = MAX_NUMBER) -> float:
    if type(value) not in (int, float):
        raise fail(owner, field, f"expected a number, got {type(value).__name__}")
    if type(value) is int and not low <= value <= high:  # a huge int would overflow float()
        raise fail(owner, field, f"{show(value)} is outside [{low:g}, {high:g}]")
    out = float(value)
    if not low <= out <= high:  # also rejects NaN and the infinities
        raise fail(owner, field, f"{show(value)} is outside [{low:g}, {high:g}]")
    return out


def text(owner: str, field: str, value: Any, *, limit: int = MAX_TEXT, empty: bool = True) -> str:
    if type(value) is not str:
        raise fail(owner, field, f"expected a string, got {type(value).__name__}")
    if len(value) > limit:
        raise fail(owner, field, f"{len(value)} characters, at most {limit} allowed")
    if not empty and not value:
        raise fail(owner, field, "must not be empty")
    return value


def reason(owner: str, field: str, value: Any, *, empty: bool = True) -> str:
    """A free-text reason or detail: cut to :data:`MAX_TEXT` instead of refused, so an error
    text built from other texts can never itself fail. (The codec bounds every string off the
    wire before it is built, see :mod:`kvxferd.protocol.codec`.)"""
    if type(value) is not str:
        raise fail(owner, field, f"expected a string, got {type(value).__name__}")
    if not empty and not value:
        raise fail(owner, field, "must not be empty")
    return clip(value)


def name(owner: str, field: str, value: Any) -> str:
    return text(owner, field, value, limit=MAX_NAME, empty=False)


def choice(owner: str, field: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise fail(owner, field, f"{show(value)} is not one of {', '.join(allowed)}")
    return value


def blob(owner: str, field: str, value: Any, *, limit: int = MAX_BLOB) -> bytes:
    if type(value) is not bytes:
        raise fail(owner, field, f"expected bytes, got {type(value).__name__}")
    if len(value) > limit:
        raise fail(owner, field, f"{len(value)} bytes, at most {limit} allowed")
    return value


def sequence(owner: str, field: str, value: Any, *, limit: int = MAX_ITEMS) -> tuple[Any, ...]:
    kind = type(value)
    if kind is tuple or kind is list:  # (what the codec builds: the abstract check below is slower)
        if len(value) > limit:
            raise fail(owner, field, f"{len(value)} items, at most {limit} allowed")
        return value if kind is tuple else tuple(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise fail(owner, field, f"expected a list, got {type(value).__name__}")
    if len(value) > limit:
        raise fail(owner, field, f"{len(value)} items, at most {limit} allowed")
    return tuple(value)


def uints(owner: str, field: str, value: Any, *, limit: int = MAX_BLOCKS, high: int = MAX_ID) -> tuple[int, ...]:
    items = sequence(owner, field, value, limit=limit)
    # Block lists run to thousands of ids: check them in bulk, name the first bad one only on failure.
    if items and not (all(type(v) is int for v in items) and min(items) >= 0 and max(items) <= high):
        for i, item in enumerate(items):
            uint(owner, f"{field}[{i}]", item, high=high)
    return items


def items_of(owner: str, field: str, value: Any, kind: type, *, limit: int = MAX_ITEMS) -> tuple[Any, ...]:
    items = sequence(owner, field, value, limit=limit)
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise fail(owner, f"{field}[{i}]", f"expected {kind.__name__}, got {type(item).__name__}")
    return items


def blob_map(owner: str, field: str, value: Any) -> dict[str, bytes]:
    if not isinstance(value, Mapping):
        raise fail(owner, field, f"expected a map, got {type(value).__name__}")
    if len(value) > 64:
        raise fail(owner, field, f"{len(value)} entries, at most 64 allowed")
    out: dict[str, bytes] = {}
    for key, item in value.items():
        out[name(owner, f"{field} key", key)] = blob(owner, f"{field}[{show(key)}]", item)
    return out
