"""A decode-side peer in its own process, for the transport contract tests.

    python -m tests.integration.peer_target TRANSPORT

Creates a host KV cache, exposes it over TRANSPORT, prints the PeerInfo (hex of the
encoded frame) on stdout, then waits. On SIGTERM it releases its cache (unlinks the
segment) and exits: what an engine that lets its cache go does.
"""

from __future__ import annotations

import signal
import sys
import threading

from kvxferd.config import TransportConfig
from kvxferd.kvcache import HostKVCache
from kvxferd.protocol import PeerInfo, encode
from kvxferd.runtime.peers import host_id
from kvxferd.transports import load
from tests.integration.transport_shape import SHAPE


def main() -> None:
    name = sys.argv[1]
    cache = HostKVCache.create(SHAPE)
    reg = cache.registration()
    transport = load(name)(TransportConfig(), reg)
    blob = transport.publish()
    info = PeerInfo("decode", 0, host_id(), "host", reg.layout, reg.regions, {name: blob} if blob else {})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(encode(info).hex(), flush=True)
    stop.wait()
    transport.close()
    cache.close()
    cache.unlink()


if __name__ == "__main__":
    main()
