"""GPU KV caches: describe an engine's GPU KV tensors to its daemon with CUDA IPC handles.

An engine keeps, per layer, a K and a V tensor ``[num_blocks, kv_heads,
block_tokens, head_dim]`` on a GPU (torch CUDA tensors or CuPy arrays, each
block contiguous inside; blocks may be padded), or one tensor ``[num_layers,
2, num_blocks, ...]``. The layout is read off the tensors' shapes and strides.
:func:`registration` turns them into a :class:`~kvxferd.protocol.RegisterCache`
whose regions carry, for each tensor, the 64-byte IPC handle of the CUDA
allocation that holds it and the tensor's byte offset inside that allocation:
allocators (torch's, CuPy's) carve tensors out of larger allocations, and a
handle always names the whole allocation.

Torch tensors use torch's own sharing call, which reports handle and offset.
CuPy arrays use ``cudaIpcGetMemHandle`` on the allocation's base, found with
the driver's ``cuMemGetAddressRange``. torch and CuPy are imported only here,
only when called. Untested on a GPU here: see the project notes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from kvxferd.errors import TransportError
from kvxferd.protocol import CacheLayout, Region, RegisterCache


def _allocation_base(ptr: int) -> int:
    """Start of the CUDA allocation containing device pointer ``ptr``."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise TransportError(f"the CUDA driver library is not available: {exc}") from None
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    status = libcuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if status != 0:
        raise TransportError(f"cuMemGetAddressRange failed for pointer {ptr:#x} (CUresult {status})")
    return int(base.value)


def _describe(tensor: Any, what: str) -> tuple[bytes, int, int, tuple[int, int, int]]:
    """(IPC handle, offset in its allocation, device, (blocks, block bytes, block stride)) of one GPU
    tensor (blocks contiguous inside, maybe padded: :func:`kvxferd.kvcache.block_layout`)."""
    from kvxferd.kvcache import block_layout

    module = type(tensor).__module__
    if not module.startswith(("torch", "cupy")):
        raise TransportError(f"{what} is a {type(tensor).__name__}; pass torch CUDA tensors or CuPy arrays")
    if module.startswith("torch") and not tensor.is_cuda:
        raise TransportError(f"{what} is on {tensor.device}, not on a GPU")
    try:
        blocks = block_layout(tensor, what)
    except ValueError as exc:
        raise TransportError(str(exc)) from None
    if module.startswith("torch"):
        shared = tensor.untyped_storage()._share_cuda_()  # (device, handle, size, storage offset, ...)
        device, handle, storage_offset = int(shared[0]), bytes(shared[1]), int(shared[3])
        offset = storage_offset + tensor.storage_offset() * tensor.element_size()
        return handle, offset, device, blocks
    import cupy

    ptr = int(tensor.data.ptr)
    base = _allocation_base(ptr)
    with cupy.cuda.Device(tensor.device.id):
        handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(base))
    return handle, ptr - base, int(tensor.device.id), blocks


def registration(kv: Any | Sequence[tuple[Any, Any]], *, order: str = "heads") -> RegisterCache:
    """The RegisterCache for GPU KV tensors: per layer (K, V), or one ``[L, 2, blocks, ...]`` tensor
    (``order``: what is outermost inside a block, ``heads`` for ``[blocks, heads, tokens, dim]``,
    ``tokens`` for ``[blocks, tokens, heads, dim]``; as the config's ``kv.order``)."""
    pairs: list[tuple[Any, Any]]
    if isinstance(kv, Sequence):
        pairs = [(k, v) for k, v in kv]
    else:
        if kv.ndim < 3 or kv.shape[1] != 2:
            raise TransportError("a single KV tensor must be shaped [num_layers, 2, num_blocks, ...]")
        pairs = [(kv[layer, 0], kv[layer, 1]) for layer in range(kv.shape[0])]
    if not pairs:
        raise TransportError("no layers given")
    regions, shapes = [], set()
    for layer, (k, v) in enumerate(pairs):
        for index, tensor in enumerate((k, v)):
            handle, offset, device, shape = _describe(tensor, f"layer {layer} {'KV'[index]}")
            shapes.add(shape)
            regions.append(Region(layer, index, handle, offset, device))
    if len(shapes) != 1:
        raise TransportError(f"every K and V tensor must have the same blocks, got {sorted(shapes)}")
    ((blocks, nbytes, stride),) = shapes
    layout = CacheLayout(len(pairs), blocks, nbytes, order=order, block_stride=0 if stride == nbytes else stride)
    return RegisterCache("gpu", layout, tuple(regions))
