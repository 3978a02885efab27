"""The cache shape the transport contract tests use on both sides."""

from kvxferd.kvcache import KVShape

SHAPE = KVShape(num_layers=3, num_blocks=32, kv_heads=2, block_tokens=4, head_dim=16, dtype="float32")
