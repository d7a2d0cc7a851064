"""How long the modules the shadow path would import lazily take to import, each in a fresh
interpreter that has already imported what `serve` has (the app, the shadow evaluator, the
scorers): what a first use on the event loop would stall every request for.

    python scripts/lazy_imports.py [--repeat 3] [MODULE ...]   (default: scipy.stats jsonschema)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import time, localroute.server.app, localroute.monitoring.shadow, localroute.evaluation.agreement
import localroute.server.live_quality
t = time.perf_counter()
import importlib; importlib.import_module(MODULE)
print(time.perf_counter() - t)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", default=["scipy.stats", "jsonschema"])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    out = {}
    for module in args.modules:
        runs = [float(subprocess.run([sys.executable, "-c", PROBE.replace("MODULE", repr(module))],
                                     capture_output=True, text=True, check=True).stdout.strip())
                for _ in range(args.repeat)]
        out[module] = {"median_s": round(statistics.median(runs), 3), "runs_s": [round(r, 3) for r in runs]}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
