"""A rank's KV cache in host shared memory, laid out the way engines use it.

One POSIX shared-memory segment per rank holds, for every layer, a K and a V
tensor shaped ``[num_blocks, kv_heads, block_tokens, head_dim]`` (heads
outermost in a block, HND; ``order="tokens"``: ``[num_blocks, block_tokens,
kv_heads, head_dim]``, NHD):

    segment = layer 0 K | layer 0 V | layer 1 K | layer 1 V | ...

or, with the ``packed`` layout, one tensor per layer shaped ``[num_blocks,
kv_heads, block_tokens, 2 * head_dim]`` holding K and V together (vLLM's CPU
backend keeps its cache so).

Block ``b`` of one of them is ``kv_heads * block_tokens * head_dim`` elements,
contiguous, so a run of consecutive blocks is one contiguous byte range:
exactly what the transports copy. The engine creates the cache and owns it;
it hands the daemon a :class:`~kvxferd.protocol.RegisterCache` describing it.
numpy views are always available; torch views are built on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from kvxferd.config import DTYPE_BYTES, Config
from kvxferd.protocol import CacheLayout, Region, RegisterCache
from kvxferd.shm import Segment, unique_name

if TYPE_CHECKING:
    import torch

_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16, "uint8": np.uint8}


@dataclass(frozen=True)
class KVShape:
    """Shape of one rank's cache."""

    num_layers: int
    num_blocks: int
    kv_heads: int  # on this rank
    block_tokens: int
    head_dim: int
    dtype: str = "bfloat16"
    kv_layout: str = "split"  # or "packed": K and V of a block in one region (see the module's doc)
    order: str = "heads"  # or "tokens": what is outermost inside a block
    block_pad: int = 0  # bytes of padding after every block (an engine that aligns its blocks)

    @classmethod
    def from_config(cls, config: Config, world_size: int) -> KVShape:
        kv = config.kv
        return cls(
            kv.num_layers,
            kv.num_blocks,
            kv.heads_per_rank(world_size),
            kv.block_tokens,
            kv.head_dim,
            kv.dtype,
            kv.layout,
            kv.order,
        )

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def planes(self) -> int:
        return 2 if self.kv_layout == "split" else 1

    @property
    def row_dim(self) -> int:
        """Elements of one token of one head in one region: ``head_dim``, twice that when packed."""
        return self.head_dim * (3 - self.planes)

    @property
    def block_bytes(self) -> int:
        return self.kv_heads * self.block_tokens * self.row_dim * self.itemsize

    @property
    def block_stride(self) -> int:
        """Bytes from one block's start to the next."""
        return self.block_bytes + self.block_pad

    @property
    def region_bytes(self) -> int:
        return self.num_blocks * self.block_stride

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.planes * self.region_bytes

    @property
    def layout(self) -> CacheLayout:
        stride = self.block_stride if self.block_pad else 0
        return CacheLayout(self.num_layers, self.num_blocks, self.block_bytes, self.planes, self.order, stride)

    @property
    def tensor_shape(self) -> tuple[int, int, int, int, int, int]:
        """``[layer, K|V, num_blocks, kv_heads, block_tokens, head_dim]``; packed:
        ``[layer, 1, num_blocks, kv_heads, block_tokens, 2 * head_dim]``; token-major: tokens
        before heads."""
        inner = (self.kv_heads, self.block_tokens) if self.order == "heads" else (self.block_tokens, self.kv_heads)
        return (self.num_layers, self.planes, self.num_blocks, *inner, self.row_dim)


def block_layout(tensor: Any, what: str = "the tensor") -> tuple[int, int, int]:
    """``(num_blocks, block_bytes, block_stride)`` of one KV tensor whose first dimension is the
    blocks, from its shape and strides (numpy, CuPy or torch, on any device): every block must be
    contiguous inside; blocks may be padded (a first stride larger than a block). So an engine
    hands over its tensors, and kvxferd reads the layout off them. Raises ValueError, naming
    ``what``, for a tensor it cannot describe."""
    shape = tuple(int(d) for d in tensor.shape)
    if type(tensor).__module__.startswith("torch"):
        itemsize = int(tensor.element_size())
        strides = tuple(int(s) * itemsize for s in tensor.stride())
    else:  # numpy, CuPy: strides in bytes
        itemsize, strides = int(tensor.itemsize), tuple(int(s) for s in tensor.strides)
    if len(shape) < 2 or shape[0] < 1:
        raise ValueError(f"{what} must be shaped [num_blocks, ...], got {list(shape)}")
    block = itemsize
    for dim, stride in zip(reversed(shape[1:]), reversed(strides[1:]), strict=True):
        if dim > 1 and stride != block:
            raise ValueError(
                f"{what} is not contiguous inside a block (shape {list(shape)}, strides {list(strides)} bytes)"
            )
        block *= dim
    stride = strides[0] if shape[0] > 1 else block
    if stride < block:
        raise ValueError(f"{what}'s blocks overlap: {stride} bytes apart, each {block} bytes")
    return shape[0], block, stride


class HostKVCache:
    """An engine's KV cache for one rank, in one shared-memory segment."""

    def __init__(self, shape: KVShape, segment: Segment) -> None:
        self.shape = shape
        self.segment = segment

    @classmethod
    def create(cls, shape: KVShape, name: str | None = None) -> HostKVCache:
        return cls(shape, Segment.create(name or unique_name("kvx-cache"), shape.nbytes))

    @classmethod
    def attach(cls, shape: KVShape, name: str) -> HostKVCache:
        return cls(shape, Segment.attach(name, min_size=shape.nbytes))

    @property
    def name(self) -> str:
        return self.segment.name

    def registration(self) -> RegisterCache:
        """The message that hands this cache to the rank's daemon."""
        s = self.shape
        regions = tuple(
            Region(layer, kv, self.name, (s.planes * layer + kv) * s.region_bytes)
            for layer in range(s.num_layers)
            for kv in range(s.planes)
        )
        return RegisterCache("host", s.layout, regions)

    def raw(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """Bytes as ``[layer, K|V, num_blocks, block_bytes]`` (``K|V`` has length 1 when packed; a
        view that skips the padding of padded blocks)."""
        s = self.shape
        flat = np.frombuffer(self.segment.buffer, dtype=np.uint8, count=s.nbytes)
        out = flat.reshape(s.num_layers, s.planes, s.num_blocks, s.block_stride)
        return out[..., : s.block_bytes] if s.block_pad else out

    def numpy(self) -> np.ndarray[Any, Any]:
        """Elements as ``[layer, K|V, num_blocks, kv_heads, block_tokens, head_dim]`` (as
        :attr:`KVShape.tensor_shape`: tokens before heads in a token-major cache).

        numpy has no bfloat16: bf16 caches come back as uint16 bit patterns. A padded cache
        comes back as bytes (its last dimension: the bytes of one row), a view that skips the padding.
        """
        s = self.shape
        if s.block_pad:  # (the padding may not be a whole number of elements)
            blocks = self.raw()
            inner = s.tensor_shape[3:5]
            row = s.row_dim * s.itemsize
            strides = (*blocks.strides[:3], inner[1] * row, row, 1)
            out: np.ndarray[Any, Any] = np.lib.stride_tricks.as_strided(
                blocks, shape=(*s.tensor_shape[:5], row), strides=strides
            )
            return out
        dtype = _NUMPY_DTYPES.get(s.dtype, np.uint8)
        flat = np.frombuffer(self.segment.buffer, dtype=dtype, count=s.nbytes // np.dtype(dtype).itemsize)
        if dtype is np.uint8 and s.itemsize != 1:
            return flat.reshape(*s.tensor_shape[:5], s.row_dim * s.itemsize)
        return flat.reshape(s.tensor_shape)

    def torch(self) -> torch.Tensor:
        """A torch view (no copy) shaped like :meth:`numpy`, in the cache's real dtype."""
        import torch  # lazy: torch is heavy and optional

        s = self.shape
        if s.block_pad:
            raise ValueError("a padded cache has no torch view here (use numpy(), which gives its bytes)")
        dtype = getattr(torch, s.dtype)
        flat = torch.frombuffer(self.segment.buffer, dtype=dtype, count=s.nbytes // s.itemsize)
        return flat.view(s.tensor_shape)

    def close(self) -> None:
        self.segment.close()

    def unlink(self) -> None:
        self.segment.unlink()

    def __enter__(self) -> HostKVCache:
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.segment.__exit__(*exc)
