"""What a prefill rank's core knows about its rank: sizes, bounds and timeouts, from the config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RankSettings:
    """What the core needs to know about its rank; the runtime builds it from the config."""

    group: str
    rank: int
    world_size: int
    num_layers: int
    num_blocks: int  # blocks in this rank's (source) cache
    block_tokens: int  # tokens per block
    block_bytes: int  # bytes of one block of one region (K or V; both when packed), one layer, this rank
    max_requests: int = 4096
    max_ended: int = 16384  # endings remembered (see ended_memory_s); the config's default is larger
    max_pending_signals: int = 4096
    max_steps: int = 1024
    max_step_gap: int = 1 << 16  # a layer-0 signal this far past the last step is refused, not adopted
    pending_timeout_s: float = 30.0  # a half job waiting for its other half; an abort waiting for its request
    progress_timeout_s: float = 30.0  # a job, or its drain, without progress
    verdict_timeout_s: float = 60.0  # an admission, arrival or withdrawal without a verdict
    planes: int = 2  # regions per layer: K and V (2), or one holding both (1)

    @property
    def ended_memory_s(self) -> float:
        """How long an ending is remembered: past any straggler the barrier could still answer."""
        return self.pending_timeout_s + self.verdict_timeout_s

    @property
    def who(self) -> str:
        return f"{self.group} rank {self.rank}"
