"""Transports, registered by import string and imported only when used.

``shm`` needs nothing beyond numpy; ``cuda_ipc`` needs CuPy and a GPU;
``rdma`` needs NIXL. A CPU machine never imports CUDA.
"""

from __future__ import annotations

import importlib

from kvxferd.errors import TransportUnavailable
from kvxferd.transports.base import Completion, Transport

#: name -> "module:Class"
REGISTRY: dict[str, str] = {
    "shm": "kvxferd.transports.shm:ShmTransport",
    "cuda_ipc": "kvxferd.transports.cuda_ipc:CudaIpcTransport",
    "rdma": "kvxferd.transports.rdma:RdmaTransport",
}


def load(name: str) -> type[Transport]:
    """The transport class called ``name``; raises TransportUnavailable saying why it cannot be used."""
    target = REGISTRY.get(name)
    if target is None:
        raise TransportUnavailable(f"unknown transport {name!r} (known: {', '.join(REGISTRY)})")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TransportUnavailable(f"transport {name!r} cannot be imported: {exc}") from None
    cls: type[Transport] = getattr(module, attr)
    return cls


def choose(requested: str, prefer: str, *, local_memory: str, peer_memory: str, same_host: bool) -> str:
    """Pick the transport for one request to one peer.

    A request's explicit choice wins, then the config's ``prefer``; ``auto``
    means: same host and both caches on GPUs -> cuda_ipc; same host and both in
    host memory -> shm; anything else -> rdma.
    """
    choice = requested if requested != "auto" else prefer
    if choice != "auto":
        return choice
    if same_host and local_memory == peer_memory == "gpu":
        return "cuda_ipc"
    if same_host and local_memory == peer_memory == "host":
        return "shm"
    return "rdma"


__all__ = ["REGISTRY", "Completion", "Transport", "choose", "load"]
