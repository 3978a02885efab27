"""One typed configuration, loaded once: YAML → frozen dataclasses, validated at load.

A file describes a deployment: the barrier service, the groups (a prefill and
a decode instance, each with its TP world size and endpoint template), the
model's KV layout, transports, table bounds, timeouts and logging. Every
daemon of the deployment reads the same file and picks its group and rank on
the command line. Keys left out take the defaults below; the defaults *are*
the demo deployment (a 2-rank prefill and a 2-rank decode group on host
memory, one host), so ``load(None)`` is what ``kvxferd demo`` runs.

Endpoint templates may use ``{run_dir}``, ``{rank}`` and ``{uid}``; ``run_dir``
may use ``{uid}``. Errors name the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvxferd.errors import ConfigError

if TYPE_CHECKING:
    from kvxferd.core.rankmap import Cut, RankMap

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1}
TRANSPORT_CHOICES = ("auto", "shm", "cuda_ipc", "rdma")
KV_LAYOUTS = ("split", "packed")
BLOCK_ORDERS = ("heads", "tokens")
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR")


def _need(cond: bool, key: str, problem: str) -> None:
    if not cond:
        raise ConfigError(problem, key=key)


def _positive(obj: object, *names: str) -> None:
    for name in names:
        _need(getattr(obj, name) > 0, name, f"must be positive, got {getattr(obj, name)}")


def _endpoint_ok(value: str) -> bool:
    return value.startswith(("ipc://", "tcp://", "inproc://"))


@dataclass(frozen=True)
class GroupConfig:
    """One instance: a TP group of daemons with one role."""

    name: str
    role: str
    world_size: int
    endpoint: str  # engine-facing ROUTER of each rank
    memory: str = "host"  # where this instance's KV cache lives: host | gpu
    #: decode groups: the ROUTER prefill daemons talk to (default: the endpoint's ipc path + "-peer")
    peer_endpoint: str = ""

    def __post_init__(self) -> None:
        _need(bool(self.name), "name", "must not be empty")
        _need(self.role in ("prefill", "decode"), "role", f"{self.role!r} is not prefill or decode")
        _need(1 <= self.world_size <= 4096, "world_size", f"{self.world_size} is not in 1..4096")
        _need(_endpoint_ok(self.endpoint), "endpoint", f"{self.endpoint!r} is not an ipc://, tcp:// or inproc:// URL")
        _need(self.world_size == 1 or "{rank}" in self.endpoint, "endpoint", "needs {rank} when world_size > 1")
        _need(self.memory in ("host", "gpu"), "memory", f"{self.memory!r} is not host or gpu")
        if self.role == "decode" and not self.peer_endpoint:
            _need(
                self.endpoint.startswith("ipc://"),
                "peer_endpoint",
                "is required for a decode group whose endpoint is not ipc://",
            )
            path = self.endpoint.removesuffix(".sock")
            object.__setattr__(self, "peer_endpoint", f"{path}-peer" + (".sock" if path != self.endpoint else ""))
        if self.peer_endpoint:
            _need(self.role == "decode", "peer_endpoint", "only a decode group has a peer endpoint")
            _need(_endpoint_ok(self.peer_endpoint), "peer_endpoint", f"{self.peer_endpoint!r} is not a URL")
            _need(self.peer_endpoint != self.endpoint, "peer_endpoint", "must differ from the endpoint")
            _need(
                self.world_size == 1 or "{rank}" in self.peer_endpoint,
                "peer_endpoint",
                "needs {rank} when world_size > 1",
            )


@dataclass(frozen=True)
class BarrierConfig:
    endpoint: str = "ipc://{run_dir}/barrier.sock"
    timeout_s: float = 30.0  # a round still open this long expires; verdicts are remembered as long
    max_keys: int = 65536
    # the verdicts of the last timeout_s, kept across a restart of the service ("": not kept)
    journal: str = "{run_dir}/barrier-journal"

    def __post_init__(self) -> None:
        _need(_endpoint_ok(self.endpoint), "endpoint", f"{self.endpoint!r} is not an ipc:// or tcp:// URL")
        _positive(self, "timeout_s", "max_keys")


@dataclass(frozen=True)
class KVConfig:
    """The model's KV cache. Heads are split evenly across a group's TP ranks."""

    num_layers: int = 8
    kv_heads: int = 8  # KV heads of the whole model
    head_dim: int = 64
    block_tokens: int = 16
    num_blocks: int = 512  # blocks per rank's cache
    dtype: str = "bfloat16"
    # split: each layer keeps K and V in two regions of blocks; packed: one region per layer whose
    # blocks hold K and V together (vLLM's CPU backend)
    layout: str = "split"
    # the cache is the same on every rank (a latent, MLA-style cache): not split by heads; each
    # decode rank gets it from one prefill rank
    replicated: bool = False
    # what is outermost inside a block: heads ([heads, tokens, dim], HND) or tokens ([tokens, heads,
    # dim], NHD); matters only where groups of different sizes slice heads
    order: str = "heads"

    def __post_init__(self) -> None:
        _positive(self, "num_layers", "kv_heads", "head_dim", "block_tokens", "num_blocks")
        _need(self.dtype in DTYPE_BYTES, "dtype", f"{self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        _need(self.layout in KV_LAYOUTS, "layout", f"{self.layout!r} is not one of {', '.join(KV_LAYOUTS)}")
        _need(self.order in BLOCK_ORDERS, "order", f"{self.order!r} is not one of {', '.join(BLOCK_ORDERS)}")

    @property
    def planes(self) -> int:
        """Regions per layer: 2 (K, V) when split, 1 when packed."""
        return 2 if self.layout == "split" else 1

    def heads_per_rank(self, world_size: int) -> int:
        """KV heads each of ``world_size`` ranks holds: an even share, or one head (replicated on
        ``world_size / kv_heads`` ranks) above the head count, or all of a replicated cache."""
        if self.replicated:
            return self.kv_heads
        if world_size > self.kv_heads:
            if world_size % self.kv_heads:
                raise ConfigError(
                    f"{world_size} ranks, more than the {self.kv_heads} KV heads but not a multiple of them: "
                    "each head must be held by the same number of ranks",
                    key="kv.kv_heads",
                )
            return 1
        if self.kv_heads % world_size:
            raise ConfigError(f"{self.kv_heads} KV heads do not split over {world_size} ranks", key="kv.kv_heads")
        return self.kv_heads // world_size

    @property
    def head_bytes(self) -> int:
        """Bytes of one head in one block of one region (K or V when split, both when packed)."""
        return self.block_tokens * self.head_dim * DTYPE_BYTES[self.dtype] * (3 - self.planes)

    def block_bytes(self, world_size: int) -> int:
        """Bytes of one block of one region of one layer on one rank: K (or V) when split,
        K and V together when packed."""
        return self.heads_per_rank(world_size) * self.head_bytes


@dataclass(frozen=True)
class TransportConfig:
    prefer: str = "auto"  # auto | shm | cuda_ipc | rdma; a request's own choice wins unless auto
    warm_peers: bool = True  # open the decode peers this config names once the engine registers its cache
    rdma_interface: str = "lo"  # network device UCX may use (UCX_NET_DEVICES)
    rdma_tls: str = "tcp"  # UCX transports (UCX_TLS); e.g. rc,ud,cuda_copy on RDMA NICs
    rdma_log_level: str = "WARN"
    rdma_wake_ms: int = 100  # decode: longest sleep of NIXL's progress thread between UCX events
    #: prefill: host memory (MiB) through which a slice of each block (the KV heads a decode rank
    #: with fewer of them takes) is gathered into one contiguous run, so the write is one RDMA
    #: operation per run instead of one per block; 0: no staging (one operation per block)
    rdma_staging_mb: int = 64
    write_timeout_s: float = 10.0  # a write not done by then fails (a hung peer is otherwise never noticed)

    def __post_init__(self) -> None:
        _need(self.prefer in TRANSPORT_CHOICES, "prefer", f"{self.prefer!r} is not one of {TRANSPORT_CHOICES}")
        _need(bool(self.rdma_interface), "rdma_interface", "must name a network device")
        _need(
            self.rdma_log_level in ("TRACE", "DEBUG", "INFO", "WARN", "ERROR"),
            "rdma_log_level",
            f"{self.rdma_log_level!r} is not one of TRACE, DEBUG, INFO, WARN, ERROR",
        )
        _positive(self, "rdma_wake_ms", "write_timeout_s")
        _need(
            type(self.rdma_staging_mb) is int and 0 <= self.rdma_staging_mb <= 1 << 16,
            "rdma_staging_mb",
            f"{self.rdma_staging_mb!r} is not a whole number of MiB in 0..65536",
        )


@dataclass(frozen=True)
class LimitsConfig:
    max_requests: int = 4096  # requests in flight per rank
    #: endings a rank remembers (each for pending_s + verdict_s, so a repeated or late message of an
    #: ended instance is recognised): a rank ends at most this many per pending_s + verdict_s, and
    #: refuses new cache_infos (table_full) while the memory is full of endings younger than that
    max_ended: int = 65536
    max_pending_signals: int = 4096  # parked layer-0 slots without a cache_info
    max_steps: int = 1024  # forward steps with work in progress
    max_frame_bytes: int = 1 << 20  # largest control message accepted (a 128-layer registration is ~8 KiB)
    max_step_gap: int = 1 << 16  # a layer-0 signal this many steps past the last one is refused
    #: bytes of messages one connection may have queued before the daemon reads them (ZMQ
    #: counts messages: the queue holds max(16, this // max_frame_bytes) of them)
    max_queue_bytes: int = 64 << 20
    #: clients one daemon holds over all its sockets (the barrier service: at least every rank of
    #: the config, plus 16); a new one past it is refused in its handshake. With the above, what
    #: all of a daemon's connections can queue is max_connections x queue_messages x max_frame_bytes
    max_connections: int = 16

    def __post_init__(self) -> None:
        _positive(
            self,
            "max_connections",
            "max_requests",
            "max_ended",
            "max_pending_signals",
            "max_steps",
            "max_frame_bytes",
            "max_step_gap",
            "max_queue_bytes",
        )
        _need(self.max_frame_bytes <= 64 << 20, "max_frame_bytes", "at most 64 MiB")

    @property
    def queue_messages(self) -> int:
        return max(16, self.max_queue_bytes // self.max_frame_bytes)  # 64 with the defaults


@dataclass(frozen=True)
class TimeoutsConfig:
    pending_s: float = 30.0  # cache_info or layer-0 signal waiting for its other half; an early abort
    progress_s: float = 30.0  # a job without progress (layers, write completions)
    verdict_s: float = 60.0  # an admission, arrival or withdrawal waiting for the barrier's answer
    startup_s: float = 60.0  # the start-up barrier (all ranks of the group up)
    peer_s: float = 10.0  # answer to a peer query
    peer_idle_s: float = 300.0  # a decode link unused this long is closed (a later write opens it again)
    shutdown_s: float = 5.0  # graceful shutdown before forcing
    heartbeat_s: float = 1.0  # a serving rank tells the barrier service it runs; 3 missed: not live

    def __post_init__(self) -> None:
        _positive(
            self,
            "pending_s",
            "progress_s",
            "verdict_s",
            "startup_s",
            "peer_s",
            "peer_idle_s",
            "shutdown_s",
            "heartbeat_s",
        )


@dataclass(frozen=True)
class SecurityConfig:
    """The deployment secret every process derives its CURVE keys from (see kvxferd.security)."""

    secret_file: str = "{run_dir}/secret"  # created (mode 600) by the first process that needs it

    def __post_init__(self) -> None:
        _need(bool(self.secret_file), "secret_file", "must name a file")


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"  # TRACE logs every message

    def __post_init__(self) -> None:
        _need(self.level.upper() in LOG_LEVELS, "level", f"{self.level!r} is not one of {', '.join(LOG_LEVELS)}")


def _demo_groups() -> tuple[GroupConfig, ...]:
    return (
        GroupConfig("prefill", "prefill", 2, "ipc://{run_dir}/prefill-{rank}.sock"),
        GroupConfig("decode", "decode", 2, "ipc://{run_dir}/decode-{rank}.sock"),
    )


@dataclass(frozen=True)
class Config:
    version: int = 1
    run_dir: str = "/tmp/kvxferd-{uid}"  # where ipc:// sockets live
    groups: tuple[GroupConfig, ...] = field(default_factory=_demo_groups)
    barrier: BarrierConfig = field(default_factory=BarrierConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _need(self.version == 1, "version", f"config version {self.version} is not supported (1 is)")
        _need(bool(self.groups), "groups", "at least one group is needed")
        names = [g.name for g in self.groups]
        _need(len(set(names)) == len(names), "groups", "group names must be unique")
        for i, group in enumerate(self.groups):
            try:
                self.kv.heads_per_rank(group.world_size)
            except ConfigError as exc:
                raise ConfigError(f"group {group.name!r}: {exc.problem}", key=f"groups[{i}]") from None
        self._check_rank_maps()
        # a rank gives up waiting for a verdict after verdict_s; the service decides within its round
        # timeout: a rank must never give up first, or it may end a request the others end otherwise
        _need(
            self.timeouts.verdict_s > self.barrier.timeout_s,
            "timeouts.verdict_s",
            f"must exceed barrier.timeout_s ({self.timeouts.verdict_s:g}s <= {self.barrier.timeout_s:g}s): "
            "a rank would give up on a verdict before the barrier service decides",
        )

    def _check_rank_maps(self) -> None:
        """Every prefill group can write to every decode group: the map between their ranks is
        decided here, at load, and one this build cannot serve is refused naming both groups."""
        for p in (g for g in self.groups if g.role == "prefill"):
            for d in (g for g in self.groups if g.role == "decode"):
                m = self.rank_map(p, d)
                gpu = [g.name for g in (p, d) if g.memory == "gpu"]
                sliced = not m.identity and not self.kv.replicated
                if sliced and self.kv.order == "tokens" and self.transport.prefer != "shm":
                    raise ConfigError(
                        f"prefill group {p.name!r} has {p.world_size} ranks and decode group {d.name!r} has "
                        f"{d.world_size}, and kv.order is tokens: the heads a rank writes are then "
                        f"{self.kv.block_tokens} separate pieces of every block, which only shm copies in this "
                        "version (rdma would need a descriptor per token); set transport.prefer: shm, or use a "
                        "heads-major cache (kv.order: heads)",
                        key="kv.order",
                    )
                if not m.identity and gpu:
                    raise ConfigError(
                        f"prefill group {p.name!r} has {p.world_size} ranks and decode group {d.name!r} has "
                        f"{d.world_size}: writing between groups of different sizes slices KV heads, which this "
                        f"version does for host memory only (shm, rdma), and {', '.join(map(repr, gpu))} keeps its "
                        "cache in GPU memory (cuda_ipc); give both groups the same world_size",
                        key="groups",
                    )

    def rank_map(self, prefill: GroupConfig, decode: GroupConfig) -> RankMap:
        """Which rank of ``prefill`` writes which heads of which rank of ``decode``."""
        from kvxferd.core.rankmap import Group, rank_map

        return rank_map(
            Group(prefill.name, prefill.world_size),
            Group(decode.name, decode.world_size),
            self.kv.kv_heads,
            replicated=self.kv.replicated,
        )

    def cuts(self, prefill: GroupConfig, rank: int, decode: GroupConfig) -> dict[int, Cut | None]:
        """What rank ``rank`` of ``prefill`` writes into ``decode``: decode rank -> the bytes of
        each block (None: whole blocks)."""
        from kvxferd.core.rankmap import cut_of

        src, dst = self.kv.block_bytes(prefill.world_size), self.kv.block_bytes(decode.world_size)
        head = src if self.kv.replicated else self.kv.head_bytes
        tokens = self.kv.block_tokens if self.kv.order == "tokens" else 1
        return {s.decode: cut_of(s, head, src, dst, tokens) for s in self.rank_map(prefill, decode).writes_of(rank)}

    def targets(self) -> dict[tuple[str, str], dict[int, tuple[int, ...]]]:
        """(prefill group, decode group) -> prefill rank -> the decode ranks it writes into."""
        out: dict[tuple[str, str], dict[int, tuple[int, ...]]] = {}
        for p in (g for g in self.groups if g.role == "prefill"):
            for d in (g for g in self.groups if g.role == "decode"):
                m = self.rank_map(p, d)
                out[(p.name, d.name)] = {r: tuple(s.decode for s in m.writes_of(r)) for r in range(p.world_size)}
        return out

    def writers(self, decode: GroupConfig, rank: int) -> dict[bytes, str]:
        """The identity of every prefill rank that writes into rank ``rank`` of ``decode`` -> its group."""
        return {
            f"{p.name}:{w}".encode(): p.name
            for p in self.groups
            if p.role == "prefill"
            for w in self.rank_map(p, decode).writers_of(rank)
        }

    # -- lookups ------------------------------------------------------------

    def group(self, name: str | None = None, *, role: str | None = None) -> GroupConfig:
        """The group called ``name``, or the only group with ``role``."""
        if name is not None:
            for g in self.groups:
                if g.name == name:
                    return g
            raise ConfigError(f"no group named {name!r} (have {', '.join(g.name for g in self.groups)})")
        matches = [g for g in self.groups if role is None or g.role == role]
        if len(matches) != 1:
            raise ConfigError(f"say which group: {len(matches)} groups match (use --group)")
        return matches[0]

    def expand(self, template: str, rank: int | None = None) -> str:
        uid = str(os.getuid())
        run_dir = self.run_dir.format(uid=uid)
        values = {"uid": uid, "run_dir": run_dir, "rank": "{rank}" if rank is None else str(rank)}
        try:
            return template.format(**values)
        except (KeyError, IndexError) as exc:
            raise ConfigError(f"template {template!r} uses an unknown placeholder {exc}") from None

    def endpoint(self, group: GroupConfig, rank: int) -> str:
        if not 0 <= rank < group.world_size:
            raise ConfigError(f"rank {rank} is outside group {group.name!r} of {group.world_size} ranks")
        return self.expand(group.endpoint, rank)

    def peer_template(self, group: GroupConfig) -> str:
        """The group's endpoint with ``{rank}`` left in: what a CacheInfo names as its peer."""
        return self.expand(group.endpoint)

    def peer_endpoint(self, group: GroupConfig, rank: int) -> str:
        """Where prefill daemons reach decode ``rank`` of ``group``."""
        if group.role != "decode":
            raise ConfigError(f"group {group.name!r} is not a decode group")
        self.endpoint(group, rank)  # checks the rank
        return self.expand(group.peer_endpoint, rank)

    def decode_group_named(self, peer: str) -> GroupConfig | None:
        """The decode group a CacheInfo's ``peer`` names: its name or its endpoint template."""
        for g in self.groups:
            if g.role == "decode" and peer in (g.name, self.peer_template(g)):
                return g
        return None

    def barrier_endpoint(self) -> str:
        return self.expand(self.barrier.endpoint)

    def resolved_run_dir(self) -> Path:
        return Path(self.expand(self.run_dir))

    def fingerprint(self) -> str:
        """Hash of everything ranks of a deployment must agree on (logging excluded)."""
        data = dataclasses.asdict(self)
        data.pop("logging")
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["groups"] = [dict(g) for g in data["groups"]]
        return data


# -- loading ------------------------------------------------------------------


def _build(cls: Any, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a YAML mapping, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {type(data).__name__}", key=path or None)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"unknown key (known: {', '.join(sorted(known))})", key=key)
    for fl in dataclasses.fields(cls):
        if fl.name not in data and fl.default is dataclasses.MISSING and fl.default_factory is dataclasses.MISSING:
            raise ConfigError("required key is missing", key=f"{path}.{fl.name}" if path else fl.name)
    values = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        values[name] = _coerce(hints[name], value, key)
    try:
        return cls(**values)
    except ConfigError as exc:
        raise exc.within(prefix=path) from None


def _coerce(kind: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key)
    if origin is tuple:
        item_kind = typing.get_args(kind)[0]
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {type(value).__name__}", key=key)
        return tuple(_coerce(item_kind, v, f"{key}[{i}]") for i, v in enumerate(value))
    if kind is float:
        if type(value) not in (int, float):
            raise ConfigError(f"expected a number, got {value!r}", key=key)
        return float(value)
    if kind in (int, str, bool):
        if type(value) is not kind:
            raise ConfigError(f"expected {kind.__name__}, got {value!r}", key=key)
        return value
    if origin in (typing.Union, types.UnionType):
        raise AssertionError("config fields are not unions")  # keep the schema simple
    raise AssertionError(f"unhandled config type {kind!r} at {key}")


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate a config file; ``None`` gives the embedded default."""
    if path is None:
        return Config()
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=source) from None
    return loads(text, source=source)


def loads(text: str, *, source: str = "<string>") -> Config:
    import yaml  # lazy: keeps `import kvxferd` fast

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=source) from None
    if data is None:
        data = {}
    try:
        return typing.cast(Config, _build(Config, data, ""))
    except ConfigError as exc:
        raise exc.within(source=source) from None


def dump(config: Config) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
