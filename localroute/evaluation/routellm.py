"""Our routers against RouteLLM on RouteLLM's own recorded outcomes (Mixtral-8x7B weak, GPT-4-1106
strong; MMLU, GSM8K, MT-Bench), with RouteLLM's metrics: APGR, CPT(50%), CPT(80%).

Each experiment trains on one part and evaluates on another: a held-out half of the same dataset,
or another dataset altogether (train MMLU, evaluate GSM8K). Random and oracle routing are scored
on the same rows in the same run, and every figure carries a bootstrap 95% interval over the
evaluation rows. RouteLLM's listed contaminated prompts are excluded. The published RouteLLM
figures are printed beside ours with their source; their routers were trained on Chatbot Arena
preference data (plus in-domain augmentation), not on these rows, so the comparison says what a
router trained on your own recorded outcomes achieves, not which method is better in general.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from localroute.embeddings import Encoder
from localroute.errors import ConfigError
from localroute.routing.training import LabelledQueries, embed_cached

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"
TIERS = ["mixtral-8x7b", "gpt-4-1106"]
DATASETS = ("mmlu", "gsm8k", "mt_bench")

# arXiv 2406.18665 (RouteLLM, v4), Tables 1-3: routers trained on Chatbot Arena preference data
# augmented with D_judge (MT-Bench, GSM8K) or D_gold (MMLU), evaluated on the same benchmarks with
# gpt-4-1106-preview / Mixtral-8x7B. (CPT as % of strong calls, APGR.)
PUBLISHED_SOURCE = ("Ong et al., RouteLLM: Learning to Route LLMs with Preference Data, arXiv 2406.18665 v4, "
                    "Tables 1-3 (best training set per benchmark: D_arena+D_judge or D_arena+D_gold)")
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "mt_bench": {
        "random": {"cpt50": 49.03, "cpt80": 78.08, "apgr": 0.500},
        "bert": {"cpt50": 19.58, "cpt80": 34.02, "apgr": 0.751},
        "causal_llm": {"cpt50": 31.50, "cpt80": 48.75, "apgr": 0.679},
        "mf": {"cpt50": 13.40, "cpt80": 31.31, "apgr": 0.802},
        "sw_ranking": {"cpt50": 23.21, "cpt80": 36.04, "apgr": 0.759},
    },
    "mmlu": {
        "random": {"cpt50": 50.07, "cpt80": 79.93, "apgr": 0.500},
        "bert": {"cpt50": 41.30, "cpt80": 72.20, "apgr": 0.572},
        "causal_llm": {"cpt50": 35.49, "cpt80": 70.31, "apgr": 0.600},
        "mf": {"cpt50": 35.46, "cpt80": 71.40, "apgr": 0.597},
        "sw_ranking": {"cpt50": 35.40, "cpt80": 71.55, "apgr": 0.603},
    },
    "gsm8k": {
        "random": {"cpt50": 50.00, "cpt80": 80.08, "apgr": 0.497},
        "bert": {"cpt50": 44.76, "cpt80": 79.09, "apgr": 0.531},
        "causal_llm": {"cpt50": 33.64, "cpt80": 63.26, "apgr": 0.622},
        "mf": {"cpt50": 38.82, "cpt80": 72.62, "apgr": 0.565},
        "sw_ranking": {"cpt50": 41.21, "cpt80": 72.20, "apgr": 0.568},
    },
}


def default_data_dir() -> Path:
    from localroute.settings import REPO_ROOT

    return REPO_ROOT.parent / "shared" / "data"


def _contaminated(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.add(str(json.loads(line)["eval_prompt"]).strip())
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _truth(value: str) -> float:
    v = value.strip().lower()
    if v in ("true", "1"):
        return 1.0
    if v in ("false", "0"):
        return 0.0
    return float("nan")


def load_routellm(name: str, data_dir: Path | None = None) -> LabelledQueries:
    """One RouteLLM benchmark as labelled queries: tiers [Mixtral, GPT-4]; contaminated rows dropped."""
    root = (data_dir or default_data_dir())
    base = root / "routellm" / name
    if name not in DATASETS:
        raise ConfigError(f"unknown RouteLLM dataset {name!r}; one of {', '.join(DATASETS)}", param="dataset")
    if not base.is_dir():
        raise ConfigError(f"RouteLLM data not found at {base}", param="data_dir")
    bad = _contaminated(base / "contaminated_prompts.jsonl")
    texts: list[str] = []
    labels: list[list[float]] = []
    ids: list[str] = []
    skipped = 0
    if name in ("mmlu", "gsm8k"):
        files = sorted((base / "responses").glob("mmlu_*.csv")) if name == "mmlu" else [base / "gsm8k_responses.csv"]
        for f in files:
            with f.open(encoding="utf-8", newline="") as fh:
                for i, row in enumerate(csv.DictReader(fh)):
                    prompt = (row.get("prompt") or "").strip()
                    pair = [_truth(row.get(WEAK) or ""), _truth(row.get(STRONG) or "")]
                    if not prompt or prompt in bad or any(np.isnan(pair)):
                        skipped += 1
                        continue
                    texts.append(prompt)
                    labels.append(pair)
                    ids.append(f"{f.stem}:{i}")
    else:
        questions: dict[int, str] = {}
        qfile = root / "mt_bench" / "question.jsonl"
        for line in qfile.read_text(encoding="utf-8").splitlines() if qfile.is_file() else []:
            q = json.loads(line)
            questions[int(q["question_id"])] = str(q["turns"][0])
        scores: dict[tuple[int, str], list[float]] = {}
        for line in (base / "judgements.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                j = json.loads(line)
                s = float(j["score"])
            except (ValueError, KeyError, TypeError):
                skipped += 1
                continue
            if s < 1:  # the judge failed to give a score (-1)
                skipped += 1
                continue
            scores.setdefault((int(j["question_id"]), str(j["model"])), []).append(s)
        for qid, text in sorted(questions.items()):
            w, st = scores.get((qid, WEAK)), scores.get((qid, STRONG))
            if not w or not st or text.strip() in bad:
                skipped += 1
                continue
            texts.append(text)
            labels.append([(float(np.mean(w)) - 1) / 9, (float(np.mean(st)) - 1) / 9])  # 1-10 -> 0-1
            ids.append(f"mt_bench:{qid}")
    return LabelledQueries(texts, list(TIERS), np.asarray(labels, dtype=np.float32).reshape(-1, 2),
                           f"routellm:{name}", skipped, ids)


# ---------- metrics ----------


def metrics_for(conf: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> dict[str, float | None]:
    """APGR and CPT(50/80%) of routing by `conf` (lowest confidence goes to the strong model first)."""
    from localroute.evaluation.metrics import curve_metrics, deferral_curve

    return curve_metrics(deferral_curve(conf, weak, strong), float(weak.mean()), float(strong.mean()))


@dataclass(slots=True)
class Scored:
    name: str
    conf: np.ndarray  # P(the weak model's answer is good): route to strong lowest first


def _summary(values: list[float | None]) -> dict[str, float | None]:
    vals = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(vals) == 0:
        return {"mean": None, "lo": None, "hi": None}
    return {"mean": float(vals.mean()), "lo": float(np.percentile(vals, 2.5)), "hi": float(np.percentile(vals, 97.5))}


def evaluate_scores(scored: list[Scored], labels: np.ndarray, bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    """Point metrics and bootstrap 95% intervals for each router, random and oracle on these rows."""
    from localroute.evaluation.metrics import curve_metrics, deferral_curve, oracle_curve

    weak, strong = labels[:, 0].astype(np.float64), labels[:, 1].astype(np.float64)
    rng = np.random.default_rng(seed)
    n = len(weak)
    rand = Scored("random", rng.random(n))
    out: dict[str, Any] = {}
    for s in [*scored, rand]:
        out[s.name] = {"point": metrics_for(s.conf, weak, strong),
                       "curve": deferral_curve(s.conf, weak, strong)[:: max(1, n // 100)].round(5).tolist()}
    out["oracle"] = {"point": curve_metrics(oracle_curve(weak, strong), float(weak.mean()), float(strong.mean()))}
    boots: dict[str, dict[str, list[float | None]]] = {k: {"apgr": [], "cpt50": [], "cpt80": []} for k in out}
    for _ in range(bootstrap):
        idx = rng.integers(0, n, n)
        w, st = weak[idx], strong[idx]
        if float(st.mean()) - float(w.mean()) <= 1e-9:
            continue
        for s in scored:
            m = metrics_for(s.conf[idx], w, st)
            for k in boots[s.name]:
                boots[s.name][k].append(m[k])
        m = metrics_for(rng.random(n), w, st)  # a fresh random router per resample
        for k in boots["random"]:
            boots["random"][k].append(m[k])
        m = curve_metrics(oracle_curve(w, st), float(w.mean()), float(st.mean()))
        for k in boots["oracle"]:
            boots["oracle"][k].append(m[k])
    for name, per in boots.items():
        out[name]["ci95"] = {k: _summary(v) for k, v in per.items()}
    out["_rows"] = {"n": n, "weak_quality": float(weak.mean()), "strong_quality": float(strong.mean())}
    return out


# ---------- experiments ----------

RouterSpec = tuple[str, str]  # (kind, encoder name)


def _split(n: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    cut = round(n * frac)
    return perm[:cut], perm[cut:]


def score_router(kind: str, encoder: Encoder, train: LabelledQueries, test: LabelledQueries,
                 cache_dir: Path | None = None, progress: bool = False, **params: Any) -> np.ndarray:
    """Train on `train`, return P(weak good) for each `test` query."""
    from localroute.routing.embedding import load_model
    from localroute.routing.training import train_router

    art = train_router(kind, train, encoder, cache_dir, progress, **params)
    model = load_model(art)
    x = embed_cached(encoder, test.texts, cache_dir, progress)
    return np.asarray(model.predict(x))[:, 0]


def run_experiments(
    encoders: dict[str, Callable[[], Encoder]],
    kinds: tuple[str, ...] = ("classifier", "embedding"),
    data_dir: Path | None = None,
    seed: int = 0,
    bootstrap: int = 200,
    cache_dir: Path | None = None,
    progress: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """The full comparison: held-out halves of MMLU and GSM8K, MMLU -> GSM8K, MMLU+GSM8K -> MT-Bench."""
    data = {name: load_routellm(name, data_dir) for name in DATASETS}
    if limit:
        data = {k: v.subset(np.random.default_rng(seed).permutation(len(v.texts))[:limit]) if len(v.texts) > limit
                else v for k, v in data.items()}
    experiments: list[tuple[str, str, LabelledQueries, LabelledQueries]] = []
    for name in ("mmlu", "gsm8k"):
        tr, te = _split(len(data[name].texts), 0.5, seed)
        experiments.append((f"{name}_heldout", name, data[name].subset(tr), data[name].subset(te)))
    experiments.append(("mmlu_to_gsm8k", "gsm8k", data["mmlu"], data["gsm8k"]))
    both = LabelledQueries(data["mmlu"].texts + data["gsm8k"].texts, list(TIERS),
                           np.concatenate([data["mmlu"].labels, data["gsm8k"].labels]), "routellm:mmlu+gsm8k")
    experiments.append(("mmlu+gsm8k_to_mt_bench", "mt_bench", both, data["mt_bench"]))
    report: dict[str, Any] = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pair": {"weak": WEAK, "strong": STRONG},
        "excluded_contaminated_and_malformed": {k: v.skipped for k, v in data.items()},
        "seed": seed, "bootstrap": bootstrap, "experiments": {},
        "published": {"source": PUBLISHED_SOURCE, "figures": PUBLISHED,
                      "note": "RouteLLM's routers were trained on Chatbot Arena preference data plus augmentation, "
                              "not on these rows; ours are trained on the train part of RouteLLM's own outcomes."},
    }
    loaded = {name: make() for name, make in encoders.items()}
    for exp, bench, train, test in experiments:
        scored = []
        for enc_name, enc in loaded.items():
            for kind in kinds:
                conf = score_router(kind, enc, train, test, cache_dir, progress)
                scored.append(Scored(f"{kind}/{enc_name}", conf))
        result = evaluate_scores(scored, test.labels, bootstrap, seed)
        result["_rows"].update({"train": len(train.texts), "test": len(test.texts), "benchmark": bench})
        report["experiments"][exp] = result
    return report


# ---------- report ----------


def _fmt(v: float | None, pct: bool) -> str:
    if v is None:
        return "n/a"
    return f"{v * 100:.1f}%" if pct else f"{v:.3f}"


def _cell(entry: dict[str, Any], key: str, pct: bool) -> str:
    point = _fmt(entry["point"].get(key), pct)
    ci = entry.get("ci95", {}).get(key)
    if ci and ci["lo"] is not None:
        return f"{point} [{_fmt(ci['lo'], pct)}, {_fmt(ci['hi'], pct)}]"
    return point


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# localroute routers vs RouteLLM on RouteLLM's data",
        "",
        (f"Pair: weak `{report['pair']['weak']}`, strong `{report['pair']['strong']}`. "
         f"Rows excluded (contaminated or malformed): {report['excluded_contaminated_and_malformed']}. "
         f"Bootstrap: {report['bootstrap']} resamples of the evaluation rows (95% percentile intervals). "
         f"Created {report['created_at']}."),
        "",
        ("Router score: P(weak answer is good) from the query alone; the least confident queries go to the "
         "strong model first. CPT(x%) = smallest share of strong calls reaching x% of the weak-to-strong gap."),
        "",
    ]
    for exp, res in report["experiments"].items():
        rows = res["_rows"]
        lines += [f"## {exp}", "",
                  (f"train {rows['train']} rows, evaluate {rows['test']} rows; "
                   f"weak quality {rows['weak_quality']:.3f}, strong {rows['strong_quality']:.3f}"), "",
                  "| router | APGR | CPT(50%) | CPT(80%) |", "|---|---|---|---|"]
        for name, entry in res.items():
            if name.startswith("_"):
                continue
            lines.append(f"| {name} | {_cell(entry, 'apgr', False)} | {_cell(entry, 'cpt50', True)} | "
                         f"{_cell(entry, 'cpt80', True)} |")
        pub = report["published"]["figures"].get(rows["benchmark"])
        if pub:
            lines += ["", f"Published RouteLLM figures for {rows['benchmark']} (trained on other data):", "",
                      "| RouteLLM router | APGR | CPT(50%) | CPT(80%) |", "|---|---|---|---|"]
            for name, m in pub.items():
                lines.append(f"| {name} | {m['apgr']:.3f} | {m['cpt50']:.1f}% | {m['cpt80']:.1f}% |")
        lines.append("")
    lines += [f"Source of published figures: {report['published']['source']}. {report['published']['note']}", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Quality vs share of strong calls for each experiment (one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = list(report["experiments"].items())
    fig, axes = plt.subplots(1, len(exps), figsize=(4.5 * len(exps), 4), squeeze=False)
    for ax, (exp, res) in zip(axes[0], exps):
        for name, entry in res.items():
            if name.startswith("_") or "curve" not in entry:
                continue
            y = np.asarray(entry["curve"])
            ax.plot(np.linspace(0, 1, len(y)), y, label=name, linestyle="--" if name == "random" else "-")
        ax.set_title(exp)
        ax.set_xlabel("share of calls to the strong model")
        ax.set_ylabel("quality")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "routellm_eval.json", "markdown": out_dir / "routellm_eval.md",
             "png": out_dir / "routellm_eval.png"}
    paths["json"].write_text(json.dumps(report, indent=1), encoding="utf-8")
    paths["markdown"].write_text(markdown(report), encoding="utf-8")
    plot(report, paths["png"])
    return paths
