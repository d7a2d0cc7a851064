"""The shadow path's lazy imports are done at start-up, in a worker thread, not on the event loop
at first use: scipy.stats (the live quality gauges' interval, computed in the async /metrics
handler) and jsonschema (the json scorer, run by a shadow worker). Checked in a fresh interpreter,
where nothing else imported them yet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localroute.settings import REPO_ROOT

PROBE = """
import json, sys
from localroute.routing import Tier
from localroute.server import create_app
from localroute.settings import Settings, TierSettings
from tests.conftest import serve_app
from tests.fakes import ScriptedBackend
from tests.fault_upstream import refused_url

mods = ("scipy.stats", "jsonschema")
before = {m: m in sys.modules for m in mods}
frontier = TierSettings(name="frontier", kind="openai", model="gold", base_url=refused_url(),
                        input_usd_per_mtok=1.0, output_usd_per_mtok=1.0)
settings = Settings(tiers=[TierSettings(name="local", kind="llama_cpp", model="local"), frontier],
                    shadow_sample_rate=float(sys.argv[1]), categories={"extract": {"scorer": "json"}})
tiers = [Tier("local", ScriptedBackend("local", "{}", [-0.1]), -100.0),
         Tier("frontier", ScriptedBackend("frontier", "{}", [-0.01], local=False), None)]
with serve_app(create_app(settings, tiers=tiers)):
    after = {m: m in sys.modules for m in mods}
print(json.dumps({"before": before, "after": after}))
"""


def probe(rate: float) -> dict[str, dict[str, bool]]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE, str(rate)], env=env, cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_shadowing_imports_its_lazy_modules_at_start_up() -> None:
    on = probe(1.0)
    assert on["before"] == {"scipy.stats": False, "jsonschema": False}  # the probe can tell
    assert on["after"] == {"scipy.stats": True, "jsonschema": True}
    assert probe(0.0)["after"] == {"scipy.stats": False, "jsonschema": False}  # no shadowing: no start-up cost


def test_a_preload_that_fails_never_stops_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lazily imported module that is missing, or whose import raises something else (a broken
    scipy: an ABI mismatch, a missing shared library), is left for its first use."""
    from localroute.server.live_quality import _preload

    (tmp_path / "lr_broken_mod.py").write_text("raise OSError('libopenblas.so: cannot open shared object file')\n")
    (tmp_path / "lr_ok_mod.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _preload(["lr_missing_mod", "lr_broken_mod", "lr_ok_mod"])
    assert "lr_ok_mod" in sys.modules and "lr_broken_mod" not in sys.modules
