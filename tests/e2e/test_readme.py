"""The README's engine-side example runs as written against a live deployment."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shutil
import tempfile
from pathlib import Path

from kvxferd.client import _Group
from kvxferd.config import dump, load
from kvxferd.demo.launch import Cluster
from kvxferd.shm import SHM_DIR

ROOT = Path(__file__).resolve().parents[2]


def test_readme_engine_example_runs() -> None:
    text = (ROOT / "README.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "PrefillScheduler" in c]
    run_dir = Path(tempfile.mkdtemp(prefix="kvx-", dir="/tmp"))
    config = dataclasses.replace(load(None), run_dir=str(run_dir))
    path = run_dir / "deploy.yaml"
    path.write_text(dump(config))
    cluster = Cluster(config, path, run_dir, "WARNING")
    before = set(SHM_DIR.iterdir())
    out = io.StringIO()
    namespace: dict[str, object] = {}
    try:
        cluster.start(60)
        with contextlib.redirect_stdout(out):
            exec(compile(code.replace('"deploy.yaml"', repr(str(path))), "README.md", "exec"), namespace)
    finally:
        for value in namespace.values():  # close the clients the example leaves open
            for obj in value if isinstance(value, list) else [value]:
                if isinstance(obj, _Group):
                    obj.close()
        codes = cluster.stop()
        for seg in set(SHM_DIR.iterdir()) - before:  # the example leaves its caches to the reader
            seg.unlink()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert out.getvalue().split() == ["True", "True"]
    assert set(codes.values()) == {0}
