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

#: Upper bound for block ids, slots, steps and other counters on the wire.
MAX_ID = (1 << 63) - 1
#: Longest request id / group name / key we accept.
MAX_NAME = 256
#: Longest free-text field (reasons, details).
MAX_TEXT = 4096
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
    return LocalProtocolError(f"{owner}.{field}: {problem}")


def uint(owner: str, field: str, value: Any, *, low: int = 0, high: int = MAX_ID) -> int:
    if type(value) is not int:  # bool is an int subclass; refuse it too
        raise fail(owner, field, f"expected an integer, got {type(value).__name__}")
    if value < low or value > high:
        raise fail(owner, field, f"{value} is outside [{low}, {high}]")
    return value


def number(owner: str, field: str, value: Any, *, low: float = 0.0) -> float:
    if type(value) not in (int, float):
        raise fail(owner, field, f"expected a number, got {type(value).__name__}")
    if not value >= low:  # also rejects NaN
        raise fail(owner, field, f"{value} is below {low}")
    return float(value)


def text(owner: str, field: str, value: Any, *, limit: int = MAX_TEXT, empty: bool = True) -> str:
    if type(value) is not str:
        raise fail(owner, field, f"expected a string, got {type(value).__name__}")
    if len(value) > limit:
        raise fail(owner, field, f"{len(value)} characters, at most {limit} allowed")
    if not empty and not value:
        raise fail(owner, field, "must not be empty")
    return value


def name(owner: str, field: str, value: Any) -> str:
    return text(owner, field, value, limit=MAX_NAME, empty=False)


def choice(owner: str, field: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise fail(owner, field, f"{value!r} is not one of {', '.join(allowed)}")
    return value


def blob(owner: str, field: str, value: Any, *, limit: int = MAX_BLOB) -> bytes:
    if type(value) is not bytes:
        raise fail(owner, field, f"expected bytes, got {type(value).__name__}")
    if len(value) > limit:
        raise fail(owner, field, f"{len(value)} bytes, at most {limit} allowed")
    return value


def sequence(owner: str, field: str, value: Any, *, limit: int = MAX_ITEMS) -> tuple[Any, ...]:
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
        out[name(owner, f"{field} key", key)] = blob(owner, f"{field}[{key!r}]", item)
    return out
