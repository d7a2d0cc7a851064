"""`localroute bench`: throughput and latency of localroute against the raw engines, one sweep."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from localroute.cli.common import add_config_flag, print_json, settings_from
from localroute.errors import ConfigError


def _levels(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="serving benchmark: localroute vs llama-cpp-python / llama-server")
    add_config_flag(p)
    p.add_argument("--url", default=None, help="benchmark a running endpoint (…/v1) instead of starting one")
    p.add_argument("--model", default="localroute/cascade", help="model id sent with --url")
    p.add_argument("--server-pid", type=int, default=None, help="pid of the --url server, for its peak RSS")
    p.add_argument("--local-model", default="smollm2-135m", help="registry name or GGUF path for started servers")
    p.add_argument("--concurrency", type=_levels, default=[1, 4, 16], help="levels to sweep, e.g. 1,4,16")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--num-requests", type=int, default=None, help="requests per level (default 32)")
    group.add_argument("--duration", type=float, default=None, help="seconds per level instead")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (ignore_eos is sent)")
    p.add_argument("--no-ignore-eos", action="store_true", help="let answers stop at EOS")
    p.add_argument("--dataset", type=Path, default=None, help="jsonl prompts (turns/prompt/question/instruction)")
    p.add_argument("--input-len", type=int, default=64, help="words per synthetic prompt without --dataset")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: settings)")
    p.add_argument("--n-ctx", type=int, default=1024, help="context per sequence for every engine")
    p.add_argument("--vs", action="append", default=[], metavar="BASELINE",
                   help="also measure llama-cpp-python, llama-server=/path/to/llama-server, vllm (GPU hosts) or "
                   "localroute-thread (localroute with engine_isolation=thread); repeatable")
    p.add_argument("--backend", choices=["llama_cpp", "vllm", "transformers"], default="llama_cpp",
                   help="engine of the localroute server the bench starts (vllm beside --vs vllm on a GPU host)")
    p.add_argument("--overhead-requests", type=int, default=20, help="non-streaming requests for router overhead")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up before each level")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every level N times per target, targets interleaved; report medians (noisy machines)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--save-result", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--plot", type=Path, default=None, help="write throughput and p99 latency plots (PNG)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from localroute.bench import BenchConfig, run_bench
    from localroute.bench.report import plot, print_report
    from localroute.registry import resolve_model_path

    settings = settings_from(args)
    if args.url is None or args.vs:
        model_path = resolve_model_path(args.local_model, settings.models_dir)
    else:
        model_path = Path(args.local_model)
    for value in (args.num_requests, args.max_tokens, args.n_ctx):
        if value is not None and value < 1:
            raise ConfigError("--num-requests, --max-tokens and --n-ctx must be >= 1")
    cfg = BenchConfig(
        concurrency=args.concurrency,
        model_path=model_path,
        n_threads=args.threads or settings.n_threads,
        num_requests=args.num_requests if args.num_requests is not None or args.duration else 32,
        duration_s=args.duration,
        max_tokens=args.max_tokens,
        n_ctx=args.n_ctx,
        dataset=args.dataset,
        input_len=args.input_len,
        url=args.url,
        model=args.model,
        server_pid=args.server_pid,
        baselines=list(args.vs),
        backend=args.backend,
        ignore_eos=not args.no_ignore_eos,
        warmup=not args.no_warmup,
        overhead_requests=args.overhead_requests,
        repeats=args.repeats,
        extra_buffers=settings.llama_extra_buffers,
    )
    # SIGTERM unwinds like Ctrl-C, so the servers the run started are stopped, never left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run_bench(cfg)
    if args.save_result:
        args.save_result.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print_json(result)
    else:
        print_report(result)
    return 0
