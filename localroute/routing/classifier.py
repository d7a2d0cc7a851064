"""Classifier router: from the query alone, the probability that each tier's answer is good enough.

One logistic regression per tier over the query embedding (scikit-learn at training time only;
inference is a numpy dot product, so serving needs no scikit-learn). Outcomes may be soft scores in
[0, 1] (a judge's 1-10 rescaled, a feedback score): a row with score y counts as y of a "good"
example and 1 - y of a "bad" one, which is what the logistic loss of a soft label amounts to.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from localroute.errors import MissingExtraError
from localroute.routing.artifacts import RouterArtifact


class ClassifierModel:
    """Numpy inference over a classifier artefact."""

    kind = "classifier"

    def __init__(self, art: RouterArtifact) -> None:
        self.artifact = art
        self.tiers = art.tiers
        self.encoder_name = art.encoder
        self._mean = art.arrays["mean"].astype(np.float32)
        self._inv_scale = (1.0 / art.arrays["scale"]).astype(np.float32)
        self._coef = art.arrays["coef"].astype(np.float32)
        self._intercept = art.arrays["intercept"].astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """P(good) per tier for each row of x: shape (n, n_tiers)."""
        x = np.atleast_2d(x).astype(np.float32, copy=False)
        z = ((x - self._mean) * self._inv_scale) @ self._coef.T + self._intercept
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -30, 30))))

    def score(self, v: np.ndarray) -> dict[str, Any]:
        """Evidence for one query vector: P(good) per tier; a classifier never calls a query novel."""
        return {"p_good": [float(p) for p in self.predict(v)[0]], "novel": False, "nearest_similarity": None}


def _soft_fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    keep = ~np.isnan(y)
    xs, ys = x[keep], y[keep]
    if len(ys) == 0:
        return np.zeros(x.shape[1]), 0.0
    rate = float(np.clip(ys.mean(), 1e-3, 1 - 1e-3))
    if np.all(ys >= 1) or np.all(ys <= 0):  # one class only: predict the base rate
        return np.zeros(x.shape[1]), float(np.log(rate / (1 - rate)))
    xx = np.concatenate([xs, xs])
    yy = np.concatenate([np.ones(len(ys)), np.zeros(len(ys))])
    ww = np.concatenate([ys, 1 - ys])
    nz = ww > 0
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    model.fit(xx[nz], yy[nz], sample_weight=ww[nz])
    return model.coef_[0].astype(np.float32), float(model.intercept_[0])


def train_classifier(
    x: np.ndarray,
    labels: np.ndarray,
    tiers: list[str],
    encoder: str,
    c: float = 0.01,
    seed: int = 0,
    training: dict[str, Any] | None = None,
) -> RouterArtifact:
    """Fit P(good | query) per tier; `labels` is (n, n_tiers) in [0, 1], NaN where unknown."""
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("scikit-learn", "eval") from exc
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    xz = (x - mean) / scale
    coefs, intercepts = [], []
    for j in range(len(tiers)):
        coef, intercept = _soft_fit(xz, labels[:, j], c, seed)
        coefs.append(coef)
        intercepts.append(intercept)
    return RouterArtifact(
        kind="classifier",
        encoder=encoder,
        tiers=list(tiers),
        arrays={
            "mean": mean.astype(np.float32),
            "scale": scale.astype(np.float32),
            "coef": np.stack(coefs).astype(np.float32),
            "intercept": np.asarray(intercepts, dtype=np.float32),
        },
        params={"C": c, "model": "logistic_regression"},
        training={"n_rows": len(x), **(training or {})},
    )
