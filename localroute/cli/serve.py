"""`localroute serve`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import logging
import sys

from localroute.cli.common import add_config_flag, settings_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    add_config_flag(p)
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument(
        "--backend", choices=["llama_cpp", "vllm", "transformers"], default=None,
        help="engine for every local tier (vllm needs localroute[gpu], transformers localroute[hf])",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from localroute.server import create_app
    from localroute.server.connections import ensure_fd_limit, server_config
    from localroute.service import build_tiers

    settings = settings_from(args, host=args.host, port=args.port, backend=args.backend)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Load the engines before uvicorn starts: a missing extra or model is then a LocalrouteError that
    # the CLI prints as one line and exits 2, not a lifespan traceback.
    app = create_app(settings, tiers=build_tiers(settings))
    sys.setswitchinterval(settings.switch_interval_s)  # see the setting: the engine thread's GIL wait
    ensure_fd_limit(settings.max_connections)
    server = uvicorn.Server(server_config(app, settings))  # with the header deadline and connection cap
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass
    return 0 if server.started else 1  # not started: uvicorn has logged why (e.g. the port is taken)
