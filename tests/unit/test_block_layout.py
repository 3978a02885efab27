"""An engine hands over its KV tensors; kvxferd reads the block layout off their shape and strides
(issue 24: layouts the engine describes), padded blocks included, for numpy and torch alike."""

from __future__ import annotations

import numpy as np
import pytest

from kvxferd.kvcache import block_layout


def test_a_contiguous_cache_is_its_blocks_back_to_back() -> None:
    cache = np.zeros((32, 2, 4, 16), dtype=np.float16)  # [blocks, heads, tokens, dim]
    assert block_layout(cache) == (32, 2 * 4 * 16 * 2, 2 * 4 * 16 * 2)


def test_padded_blocks_give_their_stride_and_a_block_torn_inside_is_refused() -> None:
    room = np.zeros((32, 300), dtype=np.uint8)  # each block padded to 300 bytes
    blocks = room[:, :256].view(np.float16).reshape(32, 2, 4, 16)
    assert block_layout(blocks) == (32, 256, 300)
    torn = np.zeros((32, 4, 2, 16), dtype=np.float16).transpose(0, 2, 1, 3)  # heads and tokens swapped in place
    with pytest.raises(ValueError, match="not contiguous inside a block"):
        block_layout(torn, "layer 3 K")
    with pytest.raises(ValueError, match=r"shaped \[num_blocks"):
        block_layout(np.zeros(8, dtype=np.float16))


def test_torch_tensors_are_read_the_same_way() -> None:
    torch = pytest.importorskip("torch")
    cache = torch.zeros((64, 8, 16, 2, 32), dtype=torch.bfloat16)[:, :, :, :, :]  # [blocks, tokens, heads, ...]
    assert block_layout(cache) == (64, 8 * 16 * 2 * 32 * 2, 8 * 16 * 2 * 32 * 2)
    padded = torch.zeros((64, 9000), dtype=torch.uint8)[:, :8192].view(torch.bfloat16).view(64, 4, 16, 64)
    assert block_layout(padded) == (64, 8192, 9000)
