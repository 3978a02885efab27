"""The wire protocol: typed, self-validating messages and a pure msgpack codec.

Importing this package loads msgpack and the standard library, nothing else.
"""

from kvxferd.protocol.barrier import Arrive, Digest, Diverged, Expired, Hello, RankView, Release, Verdict, Withdraw
from kvxferd.protocol.base import (
    MEMORY_KINDS,
    PROTOCOL_VERSION,
    ROLES,
    TRANSPORTS,
    ErrorCode,
    Message,
    Status,
    Struct,
)
from kvxferd.protocol.codec import DEFAULT_MAX_FRAME, REGISTRY, decode, encode
from kvxferd.protocol.messages import (
    Abort,
    Ack,
    CacheInfo,
    CacheLayout,
    Error,
    KVReady,
    LayerSignal,
    PeerInfo,
    PeerQuery,
    Region,
    RegisterCache,
    SlotChunk,
    StatusQuery,
    StatusReply,
    TransferResult,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "MEMORY_KINDS",
    "PROTOCOL_VERSION",
    "REGISTRY",
    "ROLES",
    "TRANSPORTS",
    "Abort",
    "Ack",
    "Arrive",
    "CacheInfo",
    "CacheLayout",
    "Digest",
    "Diverged",
    "Error",
    "ErrorCode",
    "Expired",
    "Hello",
    "KVReady",
    "LayerSignal",
    "Message",
    "PeerInfo",
    "PeerQuery",
    "RankView",
    "Region",
    "RegisterCache",
    "Release",
    "SlotChunk",
    "Status",
    "StatusQuery",
    "StatusReply",
    "Struct",
    "TransferResult",
    "Verdict",
    "Withdraw",
    "decode",
    "encode",
]
