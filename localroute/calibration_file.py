"""The calibration file written by `localroute calibrate` and read by `serve`.

A threshold is only meaningful for the exact signal it was fitted on: the same model weights, the
same chat template (the prompt the model sees), the same aggregator (and alpha). The file records
all three per tier; `serve` applies a tier's threshold only when they still match and otherwise
warns loudly and keeps the default threshold, because a stale threshold silently changes what
share of traffic escalates. The file also keeps the confidence distribution seen at calibration
time (quantiles and a histogram) so a later report can compare today's traffic with it (drift).

Writes are atomic (temporary file + os.replace), so a server never reads half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from localroute.errors import ConfigError
from localroute.fileio import atomic_write

log = logging.getLogger(__name__)

CALIBRATION_VERSION = 1
# A threshold no confidence reaches: "escalate everything" (JSON has no infinity).
ESCALATE_ALL = 1e9

# The confidence quantiles kept per tier, stored as "p01" .. "p99".
QUANTILE_LEVELS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
HISTOGRAM_BINS = 20

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime): model files are large and rarely change."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def text_sha256(text: str | None) -> str:
    return hashlib.sha256((text or "").encode("utf-8")).hexdigest()


def model_fingerprint(model_path: Path | None, template: str | None, remote_model: str | None = None) -> dict[str, Any]:
    """What a threshold depends on: the model file's hash and the chat template, or for a remote
    tier (no file) its model id."""
    return {
        "model_file": model_path.name if model_path else None,
        "model_sha256": file_sha256(model_path) if model_path else None,
        "template_sha256": text_sha256(template),
        "remote_model": None if model_path else remote_model,
    }


def backend_fingerprint(backend: Any, model_path: Path | None = None) -> dict[str, Any]:
    """A loaded backend's fingerprint (its own `fingerprint()`: a backend whose engine runs in
    another process reports what its engine computed there), with `model_path`'s hash if given."""
    fingerprint: dict[str, Any] = dict(backend.fingerprint())
    if model_path is not None:  # the file the tier was loaded from, whatever the backend reports
        fingerprint.update(model_file=model_path.name, model_sha256=file_sha256(model_path), remote_model=None)
    return fingerprint


class Certificate(BaseModel):
    """What the threshold guarantees, and how it did on the held-out split."""

    model_config = ConfigDict(extra="allow")

    target: Literal["quality", "escalation"]
    target_value: float
    delta: float | None = None
    bound: str | None = None
    certified_loss_upper: float | None = None
    certified_quality_lower: float | None = None
    frontier_quality_lower: float | None = None
    n_calibration: int
    n_holdout: int
    holdout: dict[str, Any] = Field(default_factory=dict)


def _quantile_key(level: float) -> str:
    return f"p{round(level * 100):02d}"


def _quantile_level(key: str) -> float:
    return int(key.removeprefix("p")) / 100


def confidence_distribution(values: Any) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The quantiles and histogram a calibration file keeps of some confidences (or router scores):
    the finite values only, the count of the others kept in the histogram's `non_finite`."""
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if len(finite) == 0:
        return {}, {"edges": [], "counts": []}
    qs = {_quantile_key(q): round(float(np.quantile(finite, q)), 6) for q in QUANTILE_LEVELS}
    counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS)
    return qs, {"edges": [round(float(e), 6) for e in edges], "counts": [float(c) for c in counts],
                "non_finite": [float(len(arr) - len(finite))]}


class CategoryCalibration(BaseModel):
    """A tier's threshold for one task category (issue 19). `fallback` set: the category had too
    few rows to certify anything, so it uses the tier's pooled threshold, and `certificate` is the
    pooled one (it says nothing about this category alone)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float
    certificate: Certificate
    n: int
    fallback: str | None = Field(None, description="'pooled' when the pooled threshold stands in, with why")
    source: Literal["eval", "log"] = Field("eval", description="fitted on an eval run or on the routing log")


class TierCalibration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float
    model_file: str | None = None
    model_sha256: str | None = None
    template_sha256: str
    remote_model: str | None = None
    certificate: Certificate
    confidence_quantiles: dict[str, float] = Field(description="Quantiles of the calibration confidences.")
    confidence_histogram: dict[str, list[float]] = Field(description="{'edges': [...], 'counts': [...]}")
    n: int
    categories: dict[str, CategoryCalibration] = Field(
        default_factory=dict, description="Thresholds per task category (calibrate --per-category / --from-log).")

    @field_validator("confidence_quantiles")
    @classmethod
    def _known_levels(cls, value: dict[str, float]) -> dict[str, float]:
        bad = sorted(k for k in value if k not in {_quantile_key(q) for q in QUANTILE_LEVELS})
        if bad:
            raise ValueError(f"unknown quantile keys {bad}; expected p01 .. p99")
        return value

    def quantiles(self) -> dict[float, float]:
        """The calibration confidences' quantiles by level (0.5: the median), lowest first."""
        return dict(sorted((_quantile_level(k), v) for k, v in self.confidence_quantiles.items()))


class RouterCalibration(BaseModel):
    """The pre-inference routers' threshold (settings.router_threshold), fitted on their scores of
    an eval run's queries; valid only for the exact artefact files it was fitted with."""

    model_config = ConfigDict(extra="forbid")

    threshold: float
    artifacts: dict[str, str] = Field(description="router kind -> sha256 of its artefact file")
    certificate: Certificate
    score_quantiles: dict[str, float] = Field(default_factory=dict)
    n_novel: int = Field(0, description="calibration queries novel to every router (left to the cascade)")
    n: int


class CalibrationFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = CALIBRATION_VERSION
    created_at: str
    aggregator: str
    alpha: float = Field(description="confidence_quantile_alpha the confidences were computed with.")
    logprobs: str = "raw"
    source_run: str | None = None
    dataset: str | None = None
    frontier: dict[str, Any] = Field(default_factory=dict)
    tiers: dict[str, TierCalibration]
    router: RouterCalibration | None = None


def write_calibration(cal: CalibrationFile, path: Path) -> Path:
    """Atomic write: a temporary file in the same folder, fsynced, then os.replace."""
    return atomic_write(path, lambda fh: fh.write(cal.model_dump_json(indent=2)))


def load_calibration(path: Path) -> CalibrationFile:
    """Read and validate; any problem is a ConfigError saying what is wrong."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read calibration file {path}: {exc}", param="calibration_path") from None
    try:
        cal = CalibrationFile.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(p) for p in e.get("loc", ()))
        raise ConfigError(f"invalid calibration file {path}: {loc}: {e['msg']}", param="calibration_path") from None
    if cal.version != CALIBRATION_VERSION:
        raise ConfigError(f"calibration file {path} has version {cal.version}; expected {CALIBRATION_VERSION}")
    return cal


def mismatches(entry: TierCalibration, fingerprint: dict[str, Any]) -> list[str]:
    """Why a tier's calibrated threshold no longer applies (empty: it applies)."""
    out = []
    if entry.model_sha256 != fingerprint.get("model_sha256"):
        out.append(f"model file hash {str(fingerprint.get('model_sha256'))[:12]} != calibrated "
                   f"{str(entry.model_sha256)[:12]}")
    if entry.template_sha256 != fingerprint.get("template_sha256"):
        out.append("chat template changed")
    if entry.model_sha256 is None and entry.remote_model != fingerprint.get("remote_model"):
        out.append(f"remote model {fingerprint.get('remote_model')} != calibrated {entry.remote_model}")
    return out


def signal_mismatch(cal: CalibrationFile, path: Path, aggregator: str, alpha: float) -> str | None:
    """Why none of the file's thresholds applies to the configured signal, with the two fixes; None:
    the file was fitted on this signal. (The default aggregator changed from mean_logprob to
    label_confidence, so files written before it are the usual case.)"""
    if cal.aggregator != aggregator:
        return (f"{path} was calibrated for confidence_aggregator {cal.aggregator!r}, but the configured "
                f"confidence_aggregator is {aggregator!r}, so none of its thresholds applies. Fix either: set "
                f"confidence_aggregator = \"{cal.aggregator}\" (LOCALROUTE_CONFIDENCE_AGGREGATOR={cal.aggregator}) "
                f"to serve this file's thresholds, or recalibrate for {aggregator!r} (`localroute eval`, then "
                f"`localroute calibrate`)")
    if aggregator == "quantile_logprob" and abs(cal.alpha - alpha) > 1e-12:
        return (f"{path} was calibrated with confidence_quantile_alpha {cal.alpha:g}, but the configured one is "
                f"{alpha:g}. Fix either: set confidence_quantile_alpha = {cal.alpha:g}, or recalibrate "
                f"(`localroute eval`, then `localroute calibrate`)")
    return None


def calibration_check(path: Path, aggregator: str, alpha: float) -> dict[str, Any]:
    """What `localroute doctor` says of a calibration file: whether it applies to the configured
    signal, and if not why (the fingerprints of each tier are checked when `serve` loads them)."""
    out: dict[str, Any] = {"path": str(path), "configured_aggregator": aggregator}
    try:
        cal = load_calibration(path)
    except ConfigError as exc:
        return out | {"applies": False, "problem": exc.message}
    problem = signal_mismatch(cal, path, aggregator, alpha)
    return out | {"aggregator": cal.aggregator, "tiers": sorted(cal.tiers), "applies": problem is None,
                  "problem": problem}


def calibrated_thresholds(
    path: Path, aggregator: str, alpha: float, fingerprints: dict[str, dict[str, Any]]
) -> dict[str, float]:
    """Thresholds from the file for the tiers whose fingerprint still matches. Never raises: an
    unusable file or entry is logged as a WARNING and left out, so serving falls back to defaults."""
    try:
        cal = load_calibration(path)
    except ConfigError as exc:
        log.warning("CALIBRATION IGNORED, using default thresholds: %s", exc.message)
        return {}
    problem = signal_mismatch(cal, path, aggregator, alpha)
    if problem is not None:
        log.warning("CALIBRATION IGNORED, using default thresholds: %s", problem)
        return {}
    out: dict[str, float] = {}
    for name, fp in fingerprints.items():
        entry = cal.tiers.get(name)
        if entry is None:
            continue
        why = mismatches(entry, fp)
        if why:
            log.warning("CALIBRATION IGNORED for tier %s, using its default threshold: %s (%s); rerun "
                        "`localroute eval` and `localroute calibrate`", name, "; ".join(why), path)
            continue
        out[name] = entry.threshold
    unknown = sorted(set(cal.tiers) - set(fingerprints))
    if unknown:
        log.warning("calibration file %s names tiers not calibratable on this ladder: %s", path, ", ".join(unknown))
    return out


def calibrated_category_thresholds(
    path: Path, aggregator: str, alpha: float, fingerprints: dict[str, dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Per tier, the thresholds per category from the file, for the tiers whose fingerprint still
    matches (the same checks as `calibrated_thresholds`, which logs why one is left out). A category
    that fell back to the pooled threshold is left out too: the tier's own threshold serves it."""
    if not calibrated_thresholds(path, aggregator, alpha, fingerprints):
        return {}
    cal = load_calibration(path)
    out: dict[str, dict[str, float]] = {}
    for name, fp in fingerprints.items():
        entry = cal.tiers.get(name)
        if entry is None or mismatches(entry, fp):
            continue
        # a log refit that escalates everything is no certificate (only accepted answers are shadowed,
        # so applying it would starve the refit of evidence for good): files written before that rule
        out[name] = {cat: c.threshold for cat, c in entry.categories.items()
                     if c.fallback is None and not (c.source == "log" and c.threshold >= ESCALATE_ALL)}
    return out


def quality_targets(cal: CalibrationFile) -> dict[str, float]:
    """Category -> the quality target its threshold was certified for; the pooled one under '*'."""
    out: dict[str, float] = {}
    for entry in cal.tiers.values():
        if entry.certificate.target == "quality":
            out.setdefault("*", entry.certificate.target_value)
        for name, c in entry.categories.items():
            if c.certificate.target == "quality":
                out.setdefault(name, c.certificate.target_value)
    return out


def router_threshold_from(path: Path, artifacts: dict[str, Path | None]) -> float | None:
    """The calibrated router threshold when the file has one for exactly these artefact files
    (kind -> path); None otherwise, with a WARNING when one exists but no longer applies."""
    try:
        cal = load_calibration(path)
    except ConfigError as exc:
        log.warning("ROUTER CALIBRATION IGNORED, using router_threshold: %s", exc.message)
        return None
    entry = cal.router
    if entry is None:
        return None
    now = {kind: file_sha256(p) if p is not None and p.is_file() else None for kind, p in artifacts.items()}
    if now != entry.artifacts:
        changed = sorted(k for k in set(now) | set(entry.artifacts) if now.get(k) != entry.artifacts.get(k))
        log.warning("ROUTER CALIBRATION IGNORED, using router_threshold: the %s router artefact(s) differ from "
                    "the ones calibrated in %s; rerun `localroute calibrate --router`", ", ".join(changed), path)
        return None
    return entry.threshold
