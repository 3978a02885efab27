"""Typed config: defaults, the shipped files, and errors that name the file and key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from kvxferd.config import Config, load, loads
from kvxferd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_demo_file_is_the_embedded_default() -> None:
    assert load(ROOT / "configs" / "demo.yaml") == load(None) == Config()


def test_reference_file_loads_to_the_defaults() -> None:
    assert load(ROOT / "configs" / "reference.yaml") == Config()


def _keys(cls: type, prefix: str = "") -> set[str]:
    out = set()
    for fl in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[fl.name]
        args = getattr(kind, "__args__", ())
        inner = args[0] if args else kind
        key = f"{prefix}{fl.name}"
        out.add(key)
        if dataclasses.is_dataclass(inner):
            out |= _keys(inner, key + ".")
    return out


def _yaml_keys(data: object, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(data, dict):
        for k, v in data.items():
            out.add(prefix + k)
            out |= _yaml_keys(v, prefix + k + ".")
    elif isinstance(data, list):
        for item in data:
            out |= _yaml_keys(item, prefix)
    return out


def test_reference_file_lists_every_key() -> None:
    data = yaml.safe_load((ROOT / "configs" / "reference.yaml").read_text())
    assert _yaml_keys(data) == _keys(Config)


def test_templates_and_derived_sizes() -> None:
    cfg = loads("run_dir: /tmp/kv-{uid}\nkv: {kv_heads: 8, head_dim: 128, block_tokens: 16, dtype: bfloat16}")
    group = cfg.group("prefill")
    assert cfg.endpoint(group, 1).startswith("ipc:///tmp/kv-") and cfg.endpoint(group, 1).endswith("/prefill-1.sock")
    assert cfg.kv.block_bytes(group.world_size) == 4 * 16 * 128 * 2
    with pytest.raises(ConfigError, match="rank 2 is outside group 'prefill' of 2"):
        cfg.endpoint(group, 2)


def test_fingerprint_ignores_logging_but_not_layout() -> None:
    base = Config().fingerprint()
    assert loads("logging: {level: DEBUG}").fingerprint() == base
    assert loads("kv: {num_layers: 9}").fingerprint() != base


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("kv: {num_layers: 0}", "kv.num_layers", "must be positive"),
        ("kv: {bogus: 1}", "kv.bogus", "unknown key"),
        ("kv: {dtype: int4}", "kv.dtype", "is not one of"),
        ("timeouts: {pending_s: soon}", "timeouts.pending_s", "expected a number"),
        ("limits: {max_requests: 1.5}", "limits.max_requests", "expected int"),
        ("groups: [{name: a, role: chef, world_size: 1, endpoint: 'ipc://a'}]", "groups[0].role", "not prefill"),
        ("groups: [{name: a, role: decode, world_size: 2, endpoint: 'ipc://a'}]", "groups[0].endpoint", "{rank}"),
        ("groups: [{name: a, role: decode, world_size: 3, endpoint: 'ipc://a{rank}'}]", "groups[0]", "do not split"),
        ("groups: {name: a}", "groups", "expected a list"),
        (
            "groups: [{name: p, role: prefill, world_size: 2, endpoint: 'ipc://p{rank}', memory: gpu},"
            " {name: d, role: decode, world_size: 4, endpoint: 'ipc://d{rank}', memory: gpu}]",
            "groups",
            "prefill group 'p' has 2 ranks and decode group 'd' has 4: writing between groups of different "
            "sizes slices KV heads, which this version does for host memory only",
        ),
        (
            "kv: {order: tokens}\ngroups: [{name: p, role: prefill, world_size: 2, endpoint: 'ipc://p{rank}'},"
            " {name: d, role: decode, world_size: 4, endpoint: 'ipc://d{rank}'}]",
            "kv.order",
            "only shm copies in this version (rdma would need a descriptor per token); set transport.prefer: shm",
        ),
        ("kv: {order: sideways}", "kv.order", "is not one of heads, tokens"),
        (
            "kv: {kv_heads: 4}\ngroups: [{name: p, role: prefill, world_size: 6, endpoint: 'ipc://p{rank}'}]",
            "groups[0]",
            "6 ranks, more than the 4 KV heads but not a multiple of them",
        ),
        ("groups: [{name: a, role: decode}]", "groups[0].world_size", "missing"),
        ("barrier: {endpoint: 'http://x'}", "barrier.endpoint", "is not an ipc"),
        ("barrier: {timeout_s: 60}", "timeouts.verdict_s", "must exceed barrier.timeout_s (60s <= 60s)"),
        ("transport: {prefer: pigeon}", "transport.prefer", "is not one of"),
        ("transport: {rdma_staging_mb: -1}", "transport.rdma_staging_mb", "not a whole number of MiB in 0..65536"),
        ("transport: {rdma_staging_mb: 99999}", "transport.rdma_staging_mb", "not a whole number of MiB"),
        ("version: 2", "version", "not supported"),
        ("- just\n- a list", None, "expected a mapping"),
    ],
)
def test_errors_name_file_and_key(text: str, key: str | None, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(text, source="deploy.yaml")
    err = info.value
    assert err.source == "deploy.yaml"
    assert err.key == key
    assert problem in err.problem
    assert str(err).startswith("deploy.yaml")


def test_unreadable_file_and_bad_yaml() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load("/nonexistent/kvxferd.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        loads("a: [1,", source="x.yaml")


def test_group_lookup() -> None:
    cfg = Config()
    assert cfg.group(role="decode").name == "decode"
    with pytest.raises(ConfigError, match="no group named 'x'"):
        cfg.group("x")
    with pytest.raises(ConfigError, match="say which group"):
        cfg.group()


def test_decode_peer_endpoints_and_the_names_a_cache_info_may_use() -> None:
    config = loads("")
    decode = config.group(role="decode")
    assert config.peer_endpoint(decode, 1).endswith("decode-1-peer.sock")
    assert config.peer_endpoint(decode, 1) != config.endpoint(decode, 1)
    assert config.decode_group_named(decode.name) is decode
    assert config.decode_group_named(config.peer_template(decode)) is decode
    for other in ("prefill", config.endpoint(decode, 0), "tcp://elsewhere:1", ""):
        assert config.decode_group_named(other) is None, other
    with pytest.raises(ConfigError, match="not a decode group"):
        config.peer_endpoint(config.group(role="prefill"), 0)
    tcp = """
groups:
  - {name: p, role: prefill, world_size: 1, endpoint: "tcp://127.0.0.1:7001"}
  - {name: d, role: decode, world_size: 1, endpoint: "tcp://127.0.0.1:7002"}
"""
    with pytest.raises(ConfigError, match="peer_endpoint"):
        loads(tcp)
