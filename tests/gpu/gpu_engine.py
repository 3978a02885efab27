"""An engine process owning GPU KV tensors, for the cuda_ipc tests.

    python -m tests.gpu.gpu_engine

Creates a source and a destination cache as torch CUDA tensors, prints the two
RegisterCache frames (hex, one per line), then for every line "check L S D N"
on stdin prints "ok" if dst[L, :, D:D+N] equals src[L, :, S:S+N] and the rest of
dst is still zero, else "bad".
"""

from __future__ import annotations

import sys

import torch

from kvxferd.gpucache import registration
from kvxferd.protocol import encode

SHAPE = (3, 2, 32, 2, 4, 16)  # layers, K|V, blocks, heads, tokens, head_dim


def main() -> None:
    src = torch.randn(SHAPE, device="cuda", dtype=torch.float16)
    pad = torch.empty(1 << 20, device="cuda", dtype=torch.uint8)  # so dst sits inside a shared allocation
    dst = torch.zeros(SHAPE, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    print(encode(registration(src)).hex(), flush=True)
    print(encode(registration(dst)).hex(), flush=True)
    expect = torch.zeros_like(dst)
    for line in sys.stdin:
        _, layer, s, d, n = line.split()
        layer_i, s_i, d_i, n_i = int(layer), int(s), int(d), int(n)
        expect[layer_i, :, d_i : d_i + n_i] = src[layer_i, :, s_i : s_i + n_i]
        torch.cuda.synchronize()
        print("ok" if torch.equal(dst, expect) else "bad", flush=True)
    del pad


if __name__ == "__main__":
    main()
