"""Package hygiene: light import, no engine imported eagerly."""

from __future__ import annotations

import subprocess
import sys


def test_import_localroute_imports_no_engine() -> None:
    code = (
        "import sys, localroute, localroute.server, localroute.cli, localroute.routing, localroute.settings;"
        "heavy = [m for m in ('llama_cpp', 'torch', 'vllm', 'transformers') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == ""


def test_version_is_exported() -> None:
    import localroute

    assert localroute.__all__ == ["__version__"] and localroute.__version__
