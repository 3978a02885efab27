"""The pure core and the protocol import no I/O or accelerator stack; the package imports fast."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["zmq", "torch", "cupy", "nixl", "nixl_cu12", "numpy", "yaml", "threading", "socket", "asyncio", "time"]


def _fresh(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def test_core_and_protocol_load_no_io_accelerator_or_clock_modules() -> None:
    out = _fresh(
        "import sys, json\n"
        "before = set(sys.modules)\n"
        "import kvxferd.core, kvxferd.protocol\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules and m not in before)))\n"
    )
    assert json.loads(out) == []


def test_core_sources_import_only_the_standard_library_and_the_protocol() -> None:
    import ast
    from pathlib import Path

    import kvxferd.core

    allowed_prefixes = ("kvxferd.core", "kvxferd.protocol", "kvxferd.errors", "__future__")
    stdlib = sys.stdlib_module_names
    for path in Path(kvxferd.core.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                ok = name.startswith(allowed_prefixes) or name.split(".")[0] in stdlib
                assert ok, f"{path.name} imports {name}"
                assert name.split(".")[0] not in ("threading", "socket", "time", "asyncio", "selectors"), name


def test_import_kvxferd_is_fast_and_light() -> None:
    out = _fresh(
        "import sys, time, json\n"
        "t = time.perf_counter()\n"
        "import kvxferd\n"
        "dt = time.perf_counter() - t\n"
        "heavy = ('zmq', 'torch', 'cupy', 'nixl_cu12', 'yaml', 'msgpack')\n"
        "print(json.dumps([dt, [m for m in heavy if m in sys.modules]]))\n"
    )
    seconds, loaded = json.loads(out)
    assert loaded == []
    assert seconds < 0.5


def test_every_name_the_core_exports_loads_and_a_client_loads_only_what_it_uses() -> None:
    import kvxferd.core

    assert all(getattr(kvxferd.core, name) is not None for name in kvxferd.core.__all__)
    out = _fresh(
        "import sys, json\nimport kvxferd.client\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('kvxferd.core'))))\n"
    )
    assert json.loads(out) == ["kvxferd.core", "kvxferd.core.memory"]
