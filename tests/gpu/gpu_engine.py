"""An engine process owning GPU KV tensors, for the cuda_ipc tests.

    python -m tests.gpu.gpu_engine [slice heads|tokens]

Creates a source and a destination cache as torch CUDA tensors, prints the two
RegisterCache frames (hex, one per line), then for every line "check L S D N"
on stdin prints "ok" if dst[L, :, D:D+N] equals src[L, :, S:S+N] and the rest of
dst is still zero, else "bad". With ``slice``, the source holds 2 heads and the
destination 1 (heads outermost in a block, or tokens), and "check" expects head 1
of the source blocks in head 0 of the destination blocks (groups of different sizes).
"""

from __future__ import annotations

import sys

import torch

from kvxferd.gpucache import registration
from kvxferd.protocol import encode

SHAPE = (3, 2, 32, 2, 4, 16)  # layers, K|V, blocks, heads, tokens, head_dim


def shapes(mode: list[str]) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """(source shape, destination shape, tokens outermost)."""
    if not mode:
        return SHAPE, SHAPE, False
    tokens = mode[1] == "tokens"
    src = (3, 2, 32, 4, 2, 16) if tokens else SHAPE
    dst = (3, 2, 32, 4, 1, 16) if tokens else (3, 2, 32, 1, 4, 16)
    return src, dst, tokens


def main() -> None:
    src_shape, dst_shape, tokens = shapes(sys.argv[1:])
    src = torch.randn(src_shape, device="cuda", dtype=torch.float16)
    pad = torch.empty(1 << 20, device="cuda", dtype=torch.uint8)  # so dst sits inside a shared allocation
    dst = torch.zeros(dst_shape, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    order = "tokens" if tokens else "heads"
    print(encode(registration(src, order=order)).hex(), flush=True)
    print(encode(registration(dst, order=order)).hex(), flush=True)
    expect = torch.zeros_like(dst)
    for line in sys.stdin:
        _, layer, s, d, n = line.split()
        layer_i, s_i, d_i, n_i = int(layer), int(s), int(d), int(n)
        if src_shape == dst_shape:
            expect[layer_i, :, d_i : d_i + n_i] = src[layer_i, :, s_i : s_i + n_i]
        elif tokens:  # [.., block, token, head, dim]: head 1 of each token into head 0
            expect[layer_i, :, d_i : d_i + n_i, :, 0] = src[layer_i, :, s_i : s_i + n_i, :, 1]
        else:
            expect[layer_i, :, d_i : d_i + n_i, 0] = src[layer_i, :, s_i : s_i + n_i, 1]
        torch.cuda.synchronize()
        print("ok" if torch.equal(dst, expect) else "bad", flush=True)
    del pad


if __name__ == "__main__":
    main()
