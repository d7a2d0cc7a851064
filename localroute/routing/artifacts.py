"""Trained router artefacts: one `.npz` file of arrays plus a JSON header, saved atomically and
validated on load.

Why not pickle: an artefact is loaded by a server at start-up; `np.load(allow_pickle=False)` can
only produce arrays, so a tampered file cannot run code. The header records what the router was
trained on (source, rows, encoder, tiers, metrics) and a sha256 of every array, so a truncated or
edited file, or one built for another encoder, is refused with a message instead of routing badly.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from localroute import __version__
from localroute.errors import ConfigError
from localroute.fileio import atomic_write

FORMAT_VERSION = 1
KINDS = ("classifier", "embedding")
_META_KEY = "__meta__"

# The arrays each kind must carry, with their rank.
REQUIRED: dict[str, dict[str, int]] = {
    "classifier": {"mean": 1, "scale": 1, "coef": 2, "intercept": 1},
    "embedding": {"vectors": 2, "outcomes": 2, "prior": 1},
}


@dataclass(slots=True)
class RouterArtifact:
    """A trained router: arrays, hyperparameters and training metadata."""

    kind: str
    encoder: str
    tiers: list[str]
    arrays: dict[str, np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # where it was loaded from (derived caches, e.g. an HNSW graph, live beside it)
    digest: str = ""  # sha256 of the vectors array as recorded in the file (keys derived caches)

    @property
    def dim(self) -> int:
        key = "mean" if self.kind == "classifier" else "vectors"
        return int(self.arrays[key].shape[-1])


def _digest(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in sorted(arrays.items())}


def validate(art: RouterArtifact) -> None:
    """Raise ConfigError unless the artefact is internally consistent."""
    if art.kind not in KINDS:
        raise ConfigError(f"router artefact: unknown kind {art.kind!r}", param="router")
    if not art.tiers or len(set(art.tiers)) != len(art.tiers):
        raise ConfigError("router artefact: tiers must be a non-empty list of distinct names", param="router")
    for key, rank in REQUIRED[art.kind].items():
        arr = art.arrays.get(key)
        if arr is None or arr.ndim != rank:
            raise ConfigError(f"router artefact: array {key!r} missing or not rank {rank}", param="router")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ConfigError(f"router artefact: array {key!r} is not floating point", param="router")
    a, n_tiers = art.arrays, len(art.tiers)
    if art.kind == "classifier":
        d = a["mean"].shape[0]
        ok = a["scale"].shape == (d,) and a["coef"].shape == (n_tiers, d) and a["intercept"].shape == (n_tiers,)
        ok = ok and bool(np.all(a["scale"] > 0))
    else:
        n, d = a["vectors"].shape
        ok = a["outcomes"].shape == (n, n_tiers) and a["prior"].shape == (n_tiers,) and n > 0
        ok = ok and bool(np.all(np.isfinite(a["vectors"])))
    if not ok:
        raise ConfigError(f"router artefact: inconsistent {art.kind} array shapes", param="router")


def save_artifact(art: RouterArtifact, path: Path | str) -> Path:
    """Validate, then write atomically (temp file in the same folder + rename): a reader sees the old
    file or the new one, never half of one."""
    validate(art)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": art.kind,
        "encoder": art.encoder,
        "tiers": art.tiers,
        "params": art.params,
        "training": {"created_at": time.time(), "localroute_version": __version__, **art.training},
        "sha256": _digest(art.arrays),
    }
    payload = {k: np.ascontiguousarray(v) for k, v in art.arrays.items()}
    payload[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    atomic_write(path, lambda fh: np.savez(fh, **payload), mode="wb")  # type: ignore[arg-type]
    art.training = meta["training"]  # type: ignore[assignment]
    return path


def load_artifact(path: Path | str, kind: str | None = None) -> RouterArtifact:
    """Load and check an artefact; any problem is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"router artefact not found: {path}", param="router")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"router artefact {path} is not readable: {exc}", param="router") from None
    raw = arrays.pop(_META_KEY, None)
    try:
        meta = json.loads(bytes(raw).decode()) if raw is not None else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"router artefact {path}: missing header or unsupported format version", param="router")
    if meta.get("sha256") != _digest(arrays):
        raise ConfigError(f"router artefact {path}: checksum mismatch (file changed or truncated)", param="router")
    art = RouterArtifact(
        kind=str(meta.get("kind")),
        encoder=str(meta.get("encoder")),
        tiers=[str(t) for t in meta.get("tiers") or []],
        arrays=arrays,
        params=dict(meta.get("params") or {}),
        training=dict(meta.get("training") or {}),
        path=path,
        digest=str(meta["sha256"].get("vectors", "")),
    )
    validate(art)
    if kind is not None and art.kind != kind:
        raise ConfigError(f"router artefact {path} is a {art.kind} router, expected {kind}", param="router")
    return art
