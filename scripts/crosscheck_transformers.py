"""Cross-check the transformers tier against the llama.cpp tier on the same GGUF.

For each prompt, llama.cpp decodes greedily; transformers then scores those very tokens
(teacher-forced, so one early disagreement does not derail the comparison) and we report the
per-token |logprob difference| and how often transformers' own argmax is llama.cpp's token. The
tolerances in tests/backends/test_transformers.py come from this script's output.

    .venv/bin/python scripts/crosscheck_transformers.py [--device cpu|cuda] [--max-tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localroute.backends.base import load_backend
from localroute.settings import REPO_ROOT, Settings, TierSettings
from localroute.types import GenerationRequest, SamplingParams

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Is this review positive? 'Great phone, battery lasts all day.' Answer yes or no.",
    "List three primary colors.",
    "Translate 'good morning' to Spanish.",
    "What is 12 times 7?",
    "Name a fruit that is yellow.",
    "Summarise: The meeting moved to Friday because the room was booked.",
    "Extract the city from: 'I flew from Boston to Denver last week.'",
    "Give me a JSON object with keys name and age.",
)


async def crosscheck(model: str, device: str, max_tokens: int) -> dict[str, Any]:
    settings = Settings(models_dir=REPO_ROOT / "models", n_ctx=1024, n_parallel=4, torch_device=device)
    llama = load_backend(TierSettings(name="llama", kind="llama_cpp", model=model), settings)
    torch_tier = load_backend(TierSettings(name="hf", kind="transformers", model=model), settings)
    diffs: list[float] = []
    agree = total = first_agree = 0
    try:
        for text in PROMPTS:
            request = GenerationRequest(messages=({"role": "user", "content": text},),
                                        params=SamplingParams(max_tokens=max_tokens, temperature=0))
            ref = await llama.generate(request)
            cont = [t.token_id for t in ref.tokens]
            if not cont:
                continue
            logprobs, argmax = torch_tier.engine.score(llama.prompt_tokens(request), cont)  # type: ignore[attr-defined]
            diffs += [abs(a - t.logprob) for a, t in zip(logprobs, ref.tokens, strict=True)]
            agree += sum(int(a == c) for a, c in zip(argmax, cont, strict=True))
            total += len(cont)
            own = await torch_tier.generate(request)
            first_agree += int(bool(own.tokens) and own.tokens[0].token_id == cont[0])
        health = torch_tier.health()
    finally:
        await llama.aclose()
        await torch_tier.aclose()
    d = np.array(diffs)
    return {
        "model": model,
        "device": health["device"],
        "dtype": health["dtype"],
        "prompts": len(PROMPTS),
        "tokens": total,
        "abs_logprob_diff": {"mean": round(float(d.mean()), 4), "p50": round(float(np.median(d)), 4),
                             "p95": round(float(np.quantile(d, 0.95)), 4), "max": round(float(d.max()), 4)},
        "argmax_agreement": round(agree / total, 4),
        "first_token_agreement": f"{first_agree}/{len(PROMPTS)}",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description="transformers vs llama.cpp on the same GGUF")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = asyncio.run(crosscheck(args.model, args.device, args.max_tokens))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        d = out["abs_logprob_diff"]
        print(f"{out['model']} on {out['device']} ({out['dtype']}), {out['tokens']} tokens over {out['prompts']} prompts")
        print(f"|dlogprob| mean {d['mean']}  p50 {d['p50']}  p95 {d['p95']}  max {d['max']} nats")
        print(f"argmax agreement {out['argmax_agreement']:.1%}; first greedy token equal {out['first_token_agreement']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
