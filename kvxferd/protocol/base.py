"""Base types of the wire protocol: the version, the message base classes, enums.

Every message is a frozen, slotted dataclass deriving from :class:`Message`
with a unique ``TAG``. Values nested inside messages (a slot table entry, a
digest, a memory region) derive from :class:`Struct`. Both travel as msgpack
arrays of their fields in declaration order; a message's array is prefixed
with the protocol version and its tag (see :mod:`kvxferd.protocol.codec`).

``NESTED`` maps a field name to the struct type it holds: ``Digest`` for one
(or ``None`` where the field allows it), ``[SlotChunk]`` for a list of them.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

from kvxferd.protocol import fields as f

#: Wire protocol version. Bumped on any incompatible change to any message;
#: independent of the package version.
PROTOCOL_VERSION = 5

#: the named barrier every group passes at a cold start (digest: the config's fingerprint); no
#: request may be called that (see request_id)
STARTUP_KEY = "ready"


def request_id(owner: str, value: object) -> str:
    """A request's name: any name but :data:`STARTUP_KEY`, the barrier service's own round."""
    name = f.name(owner, "request_id", value)
    if name == STARTUP_KEY:
        raise f.fail(owner, "request_id", f"{STARTUP_KEY!r} is reserved for the barrier service's start-up round")
    return name


#: Transport names a request may ask for. ``auto`` lets the daemon choose.
TRANSPORTS = ("auto", "shm", "cuda_ipc", "rdma")

#: Where a registered KV cache lives.
MEMORY_KINDS = ("host", "gpu")

#: Roles a daemon can play.
ROLES = ("prefill", "decode")

#: One attempt at a request, ``(request id, instance)``: what every table of a daemon, the
#: clients and the connector are keyed by. A request id reused with a new instance is a new key.
Key = tuple[str, int]


class Status(enum.StrEnum):
    """How a request ended."""

    OK = "ok"
    FAILED = "failed"
    ABORTED = "aborted"


class ErrorCode(enum.StrEnum):
    """Codes carried by :class:`~kvxferd.protocol.messages.Error` replies."""

    BAD_MESSAGE = "bad_message"  # malformed frame or invalid field
    WRONG_ROLE = "wrong_role"  # message not accepted by this daemon's role
    UNKNOWN_REQUEST = "unknown_request"  # abort / query for a request we do not hold
    DUPLICATE_REQUEST = "duplicate_request"  # cache_info for a request already in flight
    SLOT_BUSY = "slot_busy"  # cache_info names a slot+step another request holds
    TABLE_FULL = "table_full"  # a bounded table is full; the request was failed
    OUT_OF_RANGE = "out_of_range"  # block id / layer outside the registered layout
    BAD_LAYOUT = "bad_layout"  # block count does not match the token count
    STALE_SIGNAL = "stale_signal"  # signal for a step that has ended or never began
    NOT_REGISTERED = "not_registered"  # no KV memory registered yet
    UNKNOWN_PEER = "unknown_peer"  # a cache_info's peer names no decode group of the deployment
    CONFLICT = "conflict"  # e.g. a barrier group announced with two world sizes
    UNAVAILABLE = "unavailable"  # the service is starting or shutting down
    INTERNAL = "internal"  # a bug: logged with a traceback


class Struct:
    """A value nested inside messages; travels as an array of its fields."""

    __slots__ = ()
    NESTED: ClassVar[dict[str, Any]] = {}
    #: most items of a list-of-structs field, checked by the codec before any item is built
    #: (fields not named here: ``fields.MAX_ITEMS``)
    LIMITS: ClassVar[dict[str, int]] = {}


class Message(Struct):
    """A top-level message; travels as ``[version, TAG, *fields]``."""

    __slots__ = ()
    TAG: ClassVar[str] = ""


def store(obj: object, field: str, value: object) -> None:
    """Replace a field of a frozen dataclass during ``__post_init__``."""
    object.__setattr__(obj, field, value)
