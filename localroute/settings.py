"""The one settings model. TOML file < LOCALROUTE_* env vars < CLI flags; defaults last of all."""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from localroute.errors import ConfigError
from localroute.redaction import mask_url

BackendKind = Literal["llama_cpp", "openai", "anthropic", "vllm", "transformers"]

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("localroute_config_file", default=None)
REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_models_dir() -> Path:
    bundled = REPO_ROOT / "models"
    return bundled if bundled.is_dir() else Path.home() / ".cache" / "localroute" / "models"


def _default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


class CapabilitySettings(BaseModel):
    """Per-tier overrides of what the tier's engine kind can serve (localroute/backends/capabilities.py).
    Unset fields keep the kind's default."""

    model_config = ConfigDict(extra="forbid")

    tools: bool | None = Field(None, description="Tool calling (`tools`, tool history in messages).")
    images: bool | None = Field(None, description="image_url content parts.")
    audio: bool | None = Field(None, description="input_audio parts, audio output.")
    files: bool | None = Field(None, description="file content parts.")
    multiple_choices: bool | None = Field(None, description="n > 1.")
    logit_bias: bool | None = Field(None, description="logit_bias honoured.")
    penalties: bool | None = Field(None, description="presence_penalty / frequency_penalty honoured.")
    json_schema: bool | None = Field(None, description="response_format json_schema.")
    logprobs: bool | None = Field(None, description="Token logprobs in the answer (`logprobs`).")
    context_tokens: int | None = Field(None, ge=1, description="Longest prompt + answer, in tokens.")


class CategorySettings(BaseModel):
    """One task category (issue 19): how a request is put in it by rule, how its answers are compared
    with the frontier's when shadowed, and its own shadow sampling rate."""

    model_config = ConfigDict(extra="forbid")

    scorer: Literal["choice", "exact", "numeric", "json", "spans", "judge"] = Field(
        "exact", description="How a shadowed local answer is compared with the frontier's (evaluation/scorers.py; "
        "judge: the LLM judge, shadow_judge). Left unset in a category with a judge configured: judge.")
    choices: list[str] | None = Field(None, description="scorer 'choice': the labels an answer may name.")
    system_prompt_pattern: str | None = Field(
        None, description="Regular expression; a request whose system prompt matches it (re.search) gets this "
        "category unless the client named one.")
    shadow_sample_rate: float | None = Field(
        None, ge=0, le=1, description="This category's shadow_sample_rate (None: the global one).")


class RateLimitSettings(BaseModel):
    """Limits of one API key (or the default for every key); unset: no limit of that kind."""

    model_config = ConfigDict(extra="forbid")

    requests_per_min: int | None = Field(None, ge=1, description="Requests admitted in any 60 s window.")
    tokens_per_min: int | None = Field(
        None, ge=1, description="Prompt + completion tokens in any 60 s window; counted when a request ends, "
        "so a request is admitted while the window is under the limit.")
    concurrent: int | None = Field(None, ge=1, description="Requests in flight at once.")


class TierSettings(BaseModel):
    """One rung of the cascade ladder."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Tier name: the model id that bypasses routing and answers from this tier.")
    kind: BackendKind = Field("llama_cpp", description="Engine behind the tier.")
    model: str = Field(description="Registry name (models/<name>.toml), a GGUF path, or the remote model id.")
    threshold: float | None = Field(
        None,
        description="Escalate when confidence is below this. None: use the aggregator's default. "
        "Ignored on the last tier, whose answer is always returned.",
    )
    base_url: str | None = Field(
        None, description="Remote tier's base URL: OpenAI-compatible (kind=openai, e.g. https://api.openai.com/v1) "
        "or Anthropic Messages (kind=anthropic, e.g. https://api.anthropic.com/v1).")
    api_key: SecretStr | None = Field(None, description="API key for base_url; never logged.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding this tier's API key (a Kubernetes Secret, a compose "
        "env), read at start-up when api_key is unset, so the key stays out of the config file.")
    input_usd_per_mtok: float | None = Field(None, description="Price of a million prompt tokens (remote tiers).")
    output_usd_per_mtok: float | None = Field(None, description="Price of a million completion tokens.")
    cached_input_usd_per_mtok: float | None = Field(
        None, description="Price of a million cached prompt tokens (providers with prompt caching)."
    )
    n_ctx: int | None = Field(None, description="Context length per sequence; default from settings.n_ctx.")
    gpu_memory_utilization: float = Field(0.85, description="vLLM: fraction of GPU memory to use.")
    max_model_len: int | None = Field(None, description="vLLM/transformers: maximum sequence length.")
    responses_api: bool = Field(
        False, description="kind=openai: the upstream serves the OpenAI Responses API (POST {base_url}/responses). "
        "A client's /v1/responses request routed to this tier is then forwarded as sent (model replaced; "
        "localroute keeps the conversation state: see README, Responses API) and its answer and events "
        "returned as the provider sent them; off, it is translated to Chat Completions (many "
        "OpenAI-compatible servers have no /v1/responses).")
    capabilities: CapabilitySettings | None = Field(
        None, description="What this tier can serve, over its engine kind's defaults (local: text only, one "
        "answer, no tools/images/logit_bias/penalties; openai: everything). A request needing what a tier "
        "lacks skips it.")
    # vLLM past one GPU: its own parallelism (vLLM's engine args of the same names)
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM: GPUs each layer is split across (tensor parallelism; within one node).")
    pipeline_parallel_size: int = Field(
        1, ge=1, description="vLLM: pipeline stages the layers are split into (across GPUs or nodes). A tier "
        "needs tensor_parallel_size x pipeline_parallel_size GPUs.")
    data_parallel_size: int = Field(1, ge=1, description="vLLM: engine replicas in this tier (data parallelism).")
    enable_expert_parallel: bool = Field(False, description="vLLM: expert parallelism for MoE layers.")
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = Field(
        None, description="vLLM: how its workers run ('mp' one host, 'ray' several); None: vLLM's choice.")
    # A remote self-hosted engine (kind=openai on a vLLM / llama-server fleet): priced by GPU-hours
    gpu_hour_usd: float | None = Field(
        None, ge=0, description="kind=openai on a self-hosted fleet: what one of its GPUs costs per hour. Set, "
        "the tier is priced by its share of GPU time (monitoring/pricing.py SelfHostedPrice) instead of "
        "per-token list prices, and no frontier budget applies to it.")
    gpus: int = Field(1, ge=1, description="Self-hosted tier: GPUs one replica of its engine occupies.")
    tokens_per_s: float | None = Field(
        None, gt=0, description="Self-hosted tier: output tokens per second one replica sustains at its usual "
        "batch (measured, e.g. `localroute bench` against it); an answer's GPU time is its tokens over this. "
        "None: the attempt's wall time x gpu_share.")
    prompt_tokens_per_s: float | None = Field(
        None, gt=0, description="Self-hosted tier with tokens_per_s: prompt tokens per second of prefill; None: "
        "prefill is not charged (decode dominates).")
    gpu_share: float = Field(
        1.0, gt=0, le=1, description="Self-hosted tier without tokens_per_s: share of the replica's GPUs one "
        "request holds while it runs (1 / mean concurrent requests; 1: an upper bound).")
    confidence_fields: list[str] = Field(
        default_factory=list, description="With confidence_aggregator = field_confidence: the answer fields "
        "whose confidence decides (e.g. ['label']; nested as 'a.b'); the least confident of them is the "
        "tier's confidence. Empty: every field of the answer.")

    @model_validator(mode="after")
    def _responses_api_on_openai(self) -> TierSettings:
        if self.responses_api and self.kind != "openai":
            raise ValueError(f"tiers.{self.name}.responses_api: only kind=openai tiers speak the Responses API")
        return self


class Settings(BaseSettings):
    """Every knob of localroute. Each field is also LOCALROUTE_<FIELD> in the environment."""

    model_config = SettingsConfigDict(
        env_prefix="LOCALROUTE_", extra="forbid", validate_default=True, env_ignore_empty=True
    )

    host: str = Field("127.0.0.1", description="Address `serve` binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port `serve` binds to (0: any free port).")
    models_dir: Path = Field(default_factory=_default_models_dir, description="Where registry files and GGUFs live.")
    tiers: list[TierSettings] = Field(
        default_factory=list,
        description="The cascade ladder, cheapest first. Empty: SmolLM2-135M alone, then the frontier if one is "
        "set (gemma-3-270m, a base model, scored below SmolLM2 on the eval sets: README, The default ladder).",
    )
    default_policy: str = Field("localroute/cascade", description="Policy used when a request names none we know.")

    frontier_base_url: str | None = Field(
        None, description="OpenAI-compatible base URL of the frontier tier (falls back to OPENAI_BASE_URL)."
    )
    frontier_model: str = Field("gpt-4o-mini", description="Model id sent to the frontier.")
    frontier_api_key: SecretStr | None = Field(None, description="Frontier API key (falls back to OPENAI_API_KEY).")
    frontier_input_usd_per_mtok: float | None = Field(None, description="Frontier prompt price per million tokens.")
    frontier_output_usd_per_mtok: float | None = Field(None, description="Frontier completion price per million.")
    frontier_connect_timeout_s: float = Field(5.0, gt=0, description="Frontier TCP/TLS connect deadline.")
    frontier_timeout_s: float = Field(
        120.0, gt=0, description="Frontier total deadline per request, every retry and retry wait included."
    )
    frontier_first_token_timeout_s: float = Field(
        30.0, gt=0, description="Frontier deadline for the first token (streamed) or the response (not streamed)."
    )
    frontier_idle_timeout_s: float = Field(
        30.0, gt=0, description="Frontier deadline between streamed events; keep-alive comments do not reset it."
    )
    frontier_max_retries: int = Field(
        2, ge=0, description="Frontier retries after a retryable failure, only before the first byte is sent."
    )
    frontier_retry_base_s: float = Field(0.25, ge=0, description="Backoff base; waits are full-jitter exponential.")
    frontier_retry_max_wait_s: float = Field(
        10.0, ge=0, description="Cap on the sum of retry waits of one request (Retry-After included)."
    )
    breaker_failure_threshold: int = Field(
        5, ge=1, description="Consecutive frontier failures that open its circuit breaker (requests then fail fast)."
    )
    breaker_reset_s: float = Field(30.0, gt=0, description="Open-circuit time before a half-open probe is let through.")
    escalation_failure_policy: Literal["degrade", "fail"] = Field(
        "degrade",
        description="When the last tier fails: 'degrade' answers with the best earlier answer, flagged by the "
        "x-localroute-degraded header; 'fail' returns the clean 502/503.",
    )

    confidence_aggregator: str = Field(
        "label_confidence", description="The cascade's confidence signal: a token-logprob aggregator (mean_logprob, "
        "sum_logprob, min_logprob, quantile_logprob, mean_margin, neg_mean_entropy) or label_confidence (default: "
        "P(chosen label) over the allowed labels when a request names them, by a json_schema enum or "
        "metadata.labels, else mean_logprob; README, Routing signals) or field_confidence."
    )
    confidence_quantile_alpha: float = Field(0.1, gt=0, lt=1, description="alpha of the quantile aggregator.")
    # -- routing signals (issue 18): early escalation
    early_escalation: bool = Field(
        True, description="Stop a non-final local tier's decode as soon as its threshold is out of reach "
        "(sum/mean/min/quantile_logprob, neg_mean_entropy) and escalate at once: the same decisions, less "
        "local time on escalated answers. A degraded fallback (frontier down) is then the truncated answer.")
    default_threshold: float = Field(
        -1.0, description="Threshold for tiers that set none (units of the chosen aggregator)."
    )
    repetition_min_repeats: int = Field(
        4, ge=0, description="A non-final tier's answer that repeats one phrase back to back this many times "
        "(covering repetition_min_coverage of it) is rejected whatever its confidence, its evidence in the "
        "decision (routing/repetition.py). 0: no repetition check."
    )
    repetition_min_coverage: float = Field(
        0.3, ge=0, le=1, description="Share of the answer's word/punctuation tokens the repeated run must cover."
    )
    calibration_path: Path | None = Field(None, description="Calibration file written by `localroute calibrate`.")
    eval_data_dir: Path = Field(
        REPO_ROOT.parent / "shared" / "data",
        description="Staged public evaluation data read by `localroute data convert` (never copied into the repo).",
    )

    n_threads: int = Field(default_factory=_default_threads, ge=1, description="CPU threads for llama.cpp.")
    n_ctx: int = Field(2048, ge=64, description="Context length per sequence (prompt + answer) for local tiers.")
    n_batch: int = Field(512, ge=16, description="Max tokens per llama_decode call (prompt chunks + decode rows).")
    kv_unified: bool = Field(
        False,
        description="One KV buffer shared by all sequences of a local tier instead of one stream each. "
        "Not faster (scripts/bench_engine.py, SmolLM2, 2 cores: 147 vs 143 tok/s at 4 streams, 151 vs 194 "
        "at 8), a token's logprob then varies with its batch neighbours (up to 0.12 nats measured), and "
        "it turns the prefix cache off; off keeps logprobs bit-identical at any batch size.",
    )
    llama_extra_buffers: Literal["auto", "on", "off"] = Field(
        "auto", description="llama.cpp's extra weight buffer types (AMX, REPACK) for every GGUF it loads: "
        "the local tiers, the embedding encoder, the bench's baselines. 'auto': off where llama.cpp or the "
        "CPU reports AMX (its AMX path crashes: llama.cpp issue 20824), else the measured choice for CPUs "
        "without AMX (README, Extra buffer types). `localroute doctor` prints what was chosen and why."
    )
    n_parallel: int = Field(8, ge=1, le=256, description="Max sequences decoded together in a local tier.")
    prefix_cache: bool = Field(
        True, description="Keep each finished prompt's KV in its slot and skip the prefix the next request "
        "shares with it (system prompt, earlier turns). Exact: same logprobs as a full prefill. Off with kv_unified."
    )
    prefill_chunk: int = Field(
        32, ge=2, description="Max prompt tokens fed per decode step while other streams generate (chunked "
        "prefill: a newcomer's long prompt delays running streams by short steps, not one long one). Each "
        "chunk stalls the running streams for its prefill time: 32 tokens of SmolLM2-135M take about 100 ms "
        "on 2 CPU cores (scripts/bench_engine.py --prefill-chunks); larger chunks prefill a few % faster."
    )
    max_queue: int = Field(64, ge=0, description="Requests waiting for a free sequence slot before 429.")
    engine_isolation: Literal["process", "thread"] = Field(
        "process", description="Where a llama.cpp/transformers tier's engine runs: 'process' (a supervised "
        "child process per tier: a native crash fails that tier's requests cleanly and the engine restarts, "
        "the server stays up) or 'thread' (inside the server process: a native crash kills the server)."
    )
    engine_restart_backoff_s: float = Field(
        0.5, gt=0, description="First wait before restarting a crashed engine process; doubles per restart "
        "up to engine_restart_backoff_max_s, back to this once an engine has run for 60 s."
    )
    engine_restart_backoff_max_s: float = Field(30.0, gt=0, description="Longest wait between engine restarts.")
    engine_start_timeout_s: float = Field(
        600.0, gt=0, description="How long an engine process may take to load its model before it counts as failed."
    )
    backend: Literal["llama_cpp", "vllm", "transformers"] | None = Field(
        None, description="Engine for every local tier (overrides each tier's kind; remote tiers keep theirs). "
        "None: each tier's own kind."
    )
    torch_device: str = Field("auto", description="transformers tiers: 'auto' (cuda if torch sees a GPU), 'cpu', 'cuda:0'.")
    torch_dtype: str = Field(
        "auto", description="transformers tiers: 'auto' (float32 on CPU, bfloat16/float16 on GPU) or a torch dtype name."
    )
    vllm_logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = Field(
        "raw_logprobs", description="vLLM tiers: logprobs before (raw) or after (processed) temperature/penalties; "
        "recorded in every answer and in /health so a calibration knows which it was made with."
    )
    queue_timeout_s: float = Field(30.0, gt=0, description="Max wait for a slot before 503.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request sets none.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Request bodies above this get 413.")
    max_json_depth: int = Field(
        64, ge=2, description="Request bodies nesting objects and arrays deeper than this get 400 (a chat request "
        "nests 4 levels; a response_format schema a few more)."
    )
    http_body_timeout_s: float = Field(
        30.0, gt=0, description="A request body must arrive in full within this time of its headers; else 408 "
        "and the connection is closed."
    )
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="`serve`: a request's headers must be complete within this time of the connection "
        "opening (or of the first byte after the previous response); else the connection is closed."
    )
    max_connections: int = Field(
        1000, ge=1, description="`serve`: open connections beyond this get a 503 and are closed at once (the "
        "file-descriptor limit is raised to fit when it allows)."
    )
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys clients must send (Authorization: Bearer); None: no auth."
    )
    api_keys_file: Path | None = Field(
        None, description="File of API keys, one per line (or 'sha256:<hex>' digests); '#' starts a comment."
    )
    public_paths: list[str] = Field(
        default_factory=list,
        description="Paths served without an API key besides /health (e.g. ['/metrics']).",
    )
    budget_usd: float | None = Field(None, ge=0, description="Frontier spend cap per budget period; None: no cap.")
    budget_per_key_usd: float | None = Field(
        None, ge=0, description="Frontier spend cap per API key per budget period; None: no per-key cap."
    )
    budget_period: Literal["hour", "day", "week", "month"] = Field(
        "day", description="Budget period (UTC calendar hour/day/ISO week/month); spend resets when it rolls over."
    )
    budget_exhausted_policy: Literal["degrade", "reject"] = Field(
        "degrade",
        description="When the frontier budget is spent: 'degrade' answers locally, flagged; 'reject' returns "
        "429 budget_exceeded.",
    )

    budget_state_path: Path | None = Field(
        default_factory=lambda: Path.home() / ".cache" / "localroute" / "budget.sqlite",
        description="Without redis_url: SQLite file the budget's settled spend is written to, so a restart "
        "remembers what the period spent. None: in memory only (a restart starts the period afresh).",
    )
    budget_hold_ttl_s: float | None = Field(
        None, gt=0, description="With redis_url: a budget reservation not settled within this expires (a "
        "crashed replica's holds). None: frontier_timeout_s + 30.")
    redis_url: SecretStr | None = Field(
        None, description="redis://[user:password@]host:port/db for state shared by replicas: budget "
        "reservations, rate limits, circuit breakers (localroute[shared]). None: per-process state.")
    shared_state_timeout_s: float = Field(
        0.25, gt=0, le=10, description="Bound on every Redis call (connect and reply, the event loop's own lag "
        "included); no client retries. Too tight a bound on a busy host turns load into fallbacks.")
    shared_state_failure: Literal["fail_open", "fail_closed"] = Field(
        "fail_open", description="When Redis does not answer in time: 'fail_open' serves on this process's own "
        "counters (flagged by x-localroute-shared-state: local and localroute_shared_state_fallbacks_total); "
        "'fail_closed' refuses with 503, Retry-After and error code shared_state_unavailable.")
    shared_state_retry_s: float = Field(
        1.0, gt=0, description="After a failed Redis call, Redis is not tried again for this long.")
    rate_limit_default: RateLimitSettings | None = Field(
        None, description="Rate limits of every API key without its own entry in rate_limits (with auth off, "
        "of all clients together). None: no default limits.")
    rate_limits: dict[str, RateLimitSettings] = Field(
        default_factory=dict, description="Rate limits per API key id (the first 12 hex digits of the key's "
        "SHA-256: `printf %s KEY | sha256sum | cut -c1-12`); 429 with Retry-After when one is reached. "
        "Shared by replicas with redis_url.")

    routing_log_path: Path | None = Field(None, description="SQLite routing log; None: no log.")
    routing_log_url: str | None = Field(
        None, description="The routing log (with feedback, the review sample and stored Responses) in PostgreSQL "
        "('postgresql://user@host:port/db', localroute[shared]) or SQLite (a path or sqlite:///path); "
        "overrides routing_log_path for them.")
    routing_log_spill_path: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "localroute" / "routing-log-spill.jsonl",
        description="PostgreSQL routing log: rows that could not be written (server down) are appended here "
        "and replayed, in order, once it is back.")
    routing_log_batch_s: float = Field(
        0.05, ge=0, le=10, description="The routing log writer waits up to this long to batch rows into one "
        "transaction (off the request path).")
    log_prompts: bool = Field(False, description="Store prompt/answer text in the routing log (redacted).")
    routing_log_retention_days: float | None = Field(
        30.0, gt=0, description="Routing-log rows older than this are deleted (at start-up and hourly); None: keep all."
    )
    price_file: Path | None = Field(
        None, description="TOML price table merged over the shipped localroute/monitoring/prices.toml (same format)."
    )
    usd_per_core_hour: float = Field(
        0.045, ge=0, description="What one CPU core costs per hour (local CPU tiers; default ~ a cloud vCPU-hour)."
    )
    usd_per_gpu_hour: float = Field(
        2.0, ge=0, description="Amortised cost of one GPU per hour (local GPU tiers), charged per GPU-second used."
    )
    usd_per_kwh: float = Field(0.15, ge=0, description="Electricity price, applied to measured energy (NVML, RAPL).")
    telemetry_interval_s: float = Field(
        0.25, gt=0, description="How often the background sampler reads CPU time, engine load and GPU (NVML)."
    )
    log_level: str = Field("info", description="Python log level.")
    switch_interval_s: float = Field(
        0.0005, gt=0, le=0.1,
        description="Python's GIL switch interval set by `serve` (Python's default: 5 ms), how long the engine "
        "thread may wait for the GIL behind the event loop after a llama_decode. An A/B at 4 streams on 2 "
        "cores showed no difference beyond noise between 0.5 and 5 ms (README, Benchmarks).",
    )

    # Routing before inference (localroute/classifier, /embedding, /hybrid) and extra quality signals.
    router_classifier_path: Path | None = Field(
        None, description="Classifier router artefact from `localroute train --kind classifier`; enables "
        "localroute/classifier and localroute/hybrid.")
    router_embedding_path: Path | None = Field(
        None, description="Embedding router artefact from `localroute train --kind embedding`; enables "
        "localroute/embedding and localroute/hybrid.")
    router_threshold: float = Field(
        0.5, ge=0, le=1, description="Pre-inference routers: the cheapest tier whose predicted P(good) reaches "
        "this answers alone.")
    router_uncertainty_margin: float = Field(
        0.1, ge=0, le=0.5, description="localroute/hybrid: a P(good) within this of router_threshold is "
        "uncertain and the query goes to the cascade.")
    router_novelty_similarity: float | None = Field(
        None, ge=-1, le=1, description="Embedding router: queries whose nearest indexed neighbour has a lower "
        "cosine similarity are novel and go to the cascade. None: the value stored in the artefact.")
    verifier_tier: str | None = Field(
        None, description="Tier asked whether a cheap answer is correct (AutoMix-style P(Yes)); enables the "
        "localroute/verified policy.")
    verifier_mode: Literal["alone", "and"] = Field(
        "alone", description="localroute/verified: the verifier alone decides, or the answer must also pass "
        "the logprob threshold.")
    verifier_threshold: float = Field(0.5, ge=0, le=1, description="Minimum verifier P(Yes) to accept an answer.")
    review_sample_rate: float = Field(
        0.0, ge=0, le=1, description="Share of answered requests marked for human review in the routing log "
        "(their feedback comes back through POST /v1/feedback).")

    otlp_endpoint: str | None = Field(
        None, description="OpenTelemetry collector (OTLP/HTTP) base URL, e.g. http://127.0.0.1:4318: a span per "
        "request and per tier attempt goes to <url>/v1/traces. None: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_ENDPOINT when set, else no tracing (zero cost). Needs the otel extra; the other "
        "OTEL_* variables (headers, timeout, service name, sampler, propagators) are honoured.")
    trace_sample_ratio: float | None = Field(
        None, ge=0, le=1, description="Share of new traces sampled (parent-based: a caller's sampled "
        "traceparent is always followed). None: OTEL_TRACES_SAMPLER, else every trace.")

    categories: dict[str, CategorySettings] = Field(
        default_factory=dict, description="Task categories by name (scorer, choices, system-prompt rule, shadow "
        "rate). A request's category: metadata.localroute_category or category_header from the client, else a "
        "model alias such as localroute/cascade:<category>, else the first matching system_prompt_pattern, else "
        "the embedding router's nearest labelled neighbours (category_neighbours_k), else default_category.")
    default_category: str = Field("default", description="The category of a request nothing else places.")
    category_neighbours_k: int = Field(
        5, ge=0, description="With an embedding router (router_embedding_path) trained on rows that carry a "
        "category: a request neither the client nor a rule placed takes the majority category of its this many "
        "nearest labelled neighbours (those at or above category_neighbours_min_similarity); none: "
        "default_category. 0: off.")
    category_neighbours_min_similarity: float = Field(
        0.6, ge=-1, le=1, description="Cosine similarity a labelled neighbour needs to vote on a request's "
        "category (category_neighbours_k).")
    category_header: str = Field("x-localroute-category", description="Request header naming the category.")
    category_max_labels: int = Field(
        16, ge=1, description="At most this many distinct category labels in /metrics (configured ones first); "
        "the rest are counted as 'other'.")
    shadow_sample_rate: float = Field(
        0.0, ge=0, le=1, description="Share of locally accepted answers also sent to the frontier, off the "
        "response path, to measure live quality (issue 19). 0: no shadowing.")
    shadow_near_threshold_rate: float | None = Field(
        None, ge=0, le=1, description="Confidence stratification: accepted answers whose confidence is within "
        "shadow_near_threshold_margin of the threshold are shadowed at this rate instead (reweighted in reports "
        "and recalibration).")
    shadow_near_threshold_margin: float = Field(0.5, ge=0, description="Width of the near-threshold stratum.")
    shadow_budget_usd: float | None = Field(
        None, ge=0, description="Spend cap of shadow calls per shadow_budget_period, separate from budget_usd; "
        "None: no cap.")
    shadow_budget_period: Literal["hour", "day", "week", "month"] = Field("day", description="Shadow budget period.")
    shadow_concurrency: int = Field(2, ge=1, description="Shadow calls in flight at most.")
    shadow_queue_size: int = Field(
        64, ge=1, description="Shadow calls waiting at most; a sample drawn while the queue is full is dropped "
        "(counted), so a slow or dead frontier never piles work up in memory.")
    shadow_timeout_s: float = Field(30.0, gt=0, description="Deadline of one shadow call, retries included.")
    shadow_judge_tier: str | None = Field(
        None, description="LLM judge of free-text shadow pairs: a remote (kind openai) tier of the ladder whose "
        "endpoint is asked, e.g. the frontier itself. Judges categories whose scorer is judge or unset (and the "
        "default category); its calls count against shadow_budget_usd. Or shadow_judge for a separate endpoint.")
    shadow_judge: TierSettings | None = Field(
        None, description="LLM judge of free-text shadow pairs on its own OpenAI-compatible endpoint (kind openai; "
        "name, model, base_url, api_key, prices), as shadow_judge_tier but outside the ladder.")
    shadow_judge_max_chars: int = Field(
        16_000, ge=1_000, description="Characters of the conversation the judge is shown at most (system prompt, "
        "earlier turns, tool calls and results): beyond it the oldest turns are left out first, then the middle, "
        "and the judge prompt says so.")
    auto_recalibrate_s: float = Field(
        0.0, ge=0, description="`serve` refits the per-category thresholds from the routing log's shadow pairs this "
        "often (`calibrate --from-log` at auto_recalibrate_target / auto_recalibrate_delta) and applies those it "
        "certifies; needs routing_log_path and an existing calibration file. 0: off.")
    auto_recalibrate_target: float | None = Field(
        None, gt=0, le=1, description="auto_recalibrate: the agreement with the frontier to certify per category.")
    auto_recalibrate_delta: float = Field(0.05, gt=0, lt=1, description="auto_recalibrate: the certificate's delta.")
    auto_recalibrate_min_pairs: int = Field(
        30, ge=1, description="auto_recalibrate: a (tier, category) with fewer shadow pairs is not refitted.")
    auto_recalibrate_window_s: float = Field(
        7 * 86400.0, gt=0, description="auto_recalibrate: refit on the routing log's last this many seconds only, so "
        "evidence (and the thresholds it was gathered under) from before a change ages out.")
    calibration_watch_s: float = Field(
        5.0, ge=0, description="`serve` re-reads calibration_path when it changes, polled this often (0: only on "
        "SIGHUP), and applies its thresholds without a restart.")

    @model_validator(mode="after")
    def _openai_fallbacks(self) -> Settings:
        if self.frontier_base_url is None and os.environ.get("OPENAI_BASE_URL"):
            self.frontier_base_url = os.environ["OPENAI_BASE_URL"]
        if self.frontier_api_key is None and os.environ.get("OPENAI_API_KEY"):
            self.frontier_api_key = SecretStr(os.environ["OPENAI_API_KEY"])
        names = [t.name for t in self.tiers]
        if len(names) != len(set(names)):
            raise ValueError(f"tiers: duplicate tier names {names}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _CONFIG_FILE.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def ladder(self) -> list[TierSettings]:
        """The tiers in order; the default ladder when none are configured; `backend` applied."""
        ladder = self._base_ladder()
        if self.backend is None:
            return ladder
        return [t if t.kind in ("openai", "anthropic") else t.model_copy(update={"kind": self.backend})
                for t in ladder]

    def _base_ladder(self) -> list[TierSettings]:
        if self.tiers:
            return list(self.tiers)
        # Every tier must be at least as good as the one below it on the eval sets; gemma-3-270m (a base
        # model, in the registry for whoever adds it as a tier) is not (README, The default ladder).
        ladder = [TierSettings(name="smollm2-135m", kind="llama_cpp", model="smollm2-135m")]
        if self.frontier_base_url:
            ladder.append(self.frontier_tier())
        return ladder

    def frontier_tier(self) -> TierSettings:
        return TierSettings(
            name="frontier",
            kind="openai",
            model=self.frontier_model,
            base_url=self.frontier_base_url,
            api_key=self.frontier_api_key,
            input_usd_per_mtok=self.frontier_input_usd_per_mtok,
            output_usd_per_mtok=self.frontier_output_usd_per_mtok,
        )

    def routing_log_target(self) -> str | Path | None:
        """Where the routing log lives: a postgresql:// URL, a SQLite path, or None (no log)."""
        url = self.routing_log_url
        if url:
            if url.startswith(("postgresql://", "postgres://")):
                return url
            return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else Path(url)
        return self.routing_log_path

    def public_dict(self) -> dict[str, Any]:
        """Settings as JSON-able data with secrets masked (for `config show`)."""
        out = self.model_dump(mode="json")
        url = out.get("routing_log_url")
        if url:  # a password in the user part or the query string (`?password=`, `sslpassword`)
            out["routing_log_url"] = mask_url(url)
        return out


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build Settings from file, env and overrides; a bad value raises ConfigError naming the key."""
    path = Path(config) if config is not None else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}", param="config")
    token = _CONFIG_FILE.set(path)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"invalid setting {key}: {first['msg']}", param=key) from exc
    except (OSError, ValueError) as exc:  # TOML syntax errors are ValueErrors
        raise ConfigError(f"cannot read config {path}: {exc}", param="config") from exc
    finally:
        _CONFIG_FILE.reset(token)
