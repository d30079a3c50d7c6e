"""Linear probes: scikit-learn models saved as small JSON files that policies can use as leaves.

A probe reads either library features (``inputs: features``, by name) or the raw
hookpoint activations (``inputs: hookpoint``, ``d_in`` numbers), pools them over
the scoped tokens (``mean`` or ``max``), standardises them when a scaler was
fitted, and applies one linear model: ``p = sigmoid(coef . x + intercept)``.

For a logistic regression ``p`` is exactly scikit-learn's
``predict_proba(X)[:, 1]``; for a linear SVM it is the sigmoid of the margin, so
``p >= 0.5`` is the SVM's own decision ``decision_function(X) >= 0``.

Example::

    clf = LogisticRegression().fit(X, y)          # X: pooled feature activations
    save_probe(clf, "probes/fraud.json", features=["deception.fraud", "deception.phishing"])
    probe = load_probe("probes/fraud.json")
    probe.decision(torch.as_tensor(X))            # == clf.predict_proba(X)[:, 1]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from auditor.errors import ProbeError

__all__ = ["Probe", "save_probe", "load_probe", "probe_from_dict"]

ProbeKind = Literal["logistic", "linear_svm"]
ProbeInputs = Literal["features", "hookpoint"]
ProbePool = Literal["mean", "max"]

_KINDS = ("logistic", "linear_svm")
_INPUTS = ("features", "hookpoint")
_POOLS = ("mean", "max")


@dataclass(frozen=True)
class Probe:
    """A binary linear classifier over pooled activations (see the module docstring)."""

    kind: ProbeKind
    """``logistic`` (probabilities are the model's own) or ``linear_svm`` (sigmoid of the margin)."""
    inputs: ProbeInputs
    """``features``: library features named in ``features``; ``hookpoint``: raw activations."""
    features: tuple[str, ...] | None
    """Feature names, in ``coef`` order, when ``inputs == "features"``."""
    pool: ProbePool
    """How the per-token inputs become one vector per text: ``mean`` or ``max`` over scoped tokens."""
    coef: tuple[float, ...]
    """Weights, one per input."""
    intercept: float
    """Bias of the linear model."""
    scaler_mean: tuple[float, ...] | None = None
    """StandardScaler ``mean_`` applied to the pooled vector before the linear model, if any."""
    scaler_scale: tuple[float, ...] | None = None
    """StandardScaler ``scale_`` (same length as ``coef``), if any."""
    path: str | None = None
    """File the probe was read from (for messages)."""

    @property
    def n_inputs(self) -> int:
        """Number of inputs the model reads (features or ``d_in``)."""
        return len(self.coef)

    def logit(self, pooled: Tensor) -> Tensor:
        """Linear score of pooled inputs ``[..., n]`` -> ``[...]`` (in the input's dtype)."""
        self._check_width(pooled)
        like = {"dtype": pooled.dtype, "device": pooled.device}
        w = torch.tensor(self.coef, **like)  # [n]
        x = pooled
        if self.scaler_mean is not None and self.scaler_scale is not None:
            # Scale first, exactly as StandardScaler.transform does, so results match sklearn.
            x = (x - torch.tensor(self.scaler_mean, **like)) / torch.tensor(self.scaler_scale, **like)
        return x @ w + self.intercept

    def decision(self, pooled: Tensor) -> Tensor:
        """Probability of the positive class for pooled inputs ``[..., n]`` -> ``[...]``."""
        return torch.sigmoid(self.logit(pooled))

    def pool_inputs(self, x: Tensor, mask: Tensor) -> Tensor:
        """Pool per-token inputs ``x [B, T, n]`` over ``mask [B, T]`` -> ``[B, n]`` (zeros where empty)."""
        m = mask.unsqueeze(-1)  # [B, T, 1]
        if self.pool == "mean":
            n = mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)  # [B, 1]
            return (x * m).sum(1) / n
        pooled = torch.where(m, x, torch.full_like(x, -math.inf)).amax(1)  # [B, n]
        return torch.where(mask.any(1, keepdim=True), pooled, torch.zeros_like(pooled))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written by :func:`save_probe`."""
        scaler = None
        if self.scaler_mean is not None and self.scaler_scale is not None:
            scaler = {"mean": list(self.scaler_mean), "scale": list(self.scaler_scale)}
        return {
            "kind": self.kind,
            "inputs": self.inputs,
            "features": list(self.features) if self.features is not None else None,
            "pool": self.pool,
            "coef": list(self.coef),
            "intercept": self.intercept,
            "scaler": scaler,
        }

    def _check_width(self, pooled: Tensor) -> None:
        if pooled.shape[-1] != self.n_inputs:
            raise ProbeError(
                self.path or "<probe>",
                f"probe reads {self.n_inputs} inputs but got a tensor of width {pooled.shape[-1]}",
            )


def _sklearn_parts(model: Any) -> tuple[ProbeKind, list[float], float]:
    """Kind, weights and bias of a fitted binary sklearn linear classifier."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC, LinearSVC

    if isinstance(model, LogisticRegression):
        kind: ProbeKind = "logistic"
    elif isinstance(model, LinearSVC) or (isinstance(model, SVC) and model.kernel == "linear"):
        kind = "linear_svm"
    else:
        raise ProbeError(
            "<model>",
            f"cannot save a {type(model).__name__} as a probe; "
            "use sklearn LogisticRegression, LinearSVC or SVC(kernel='linear')",
        )
    coef = getattr(model, "coef_", None)
    intercept = getattr(model, "intercept_", None)
    if coef is None or intercept is None:
        raise ProbeError("<model>", f"{type(model).__name__} is not fitted; call .fit(X, y) first")
    if coef.shape[0] != 1 or len(model.classes_) != 2:
        raise ProbeError(
            "<model>",
            f"probes are binary classifiers; this model has {len(model.classes_)} classes",
        )
    return kind, [float(c) for c in coef[0]], float(intercept[0])


def save_probe(
    model: Any,
    path: str | Path,
    *,
    inputs: ProbeInputs = "features",
    features: list[str] | None = None,
    pool: ProbePool = "mean",
    scaler: Any = None,
) -> Probe:
    """Write a fitted sklearn linear classifier (and optional ``StandardScaler``) as probe JSON.

    ``features`` names the library features in the column order the model was
    trained on (required for ``inputs="features"``). Returns the saved probe.
    """
    if inputs not in _INPUTS:
        raise ProbeError(str(path), f"inputs must be one of {', '.join(_INPUTS)}, not {inputs!r}")
    if pool not in _POOLS:
        raise ProbeError(str(path), f"pool must be one of {', '.join(_POOLS)}, not {pool!r}")
    kind, coef, intercept = _sklearn_parts(model)
    if inputs == "features":
        if features is None:
            raise ProbeError(str(path), "inputs='features' needs features=[names in column order]")
        if len(features) != len(coef):
            raise ProbeError(
                str(path), f"{len(features)} feature names for a model with {len(coef)} inputs"
            )
    scaler_mean = scaler_scale = None
    if scaler is not None:
        if getattr(scaler, "mean_", None) is None or getattr(scaler, "scale_", None) is None:
            raise ProbeError(
                str(path), "scaler must be a fitted StandardScaler (with_mean and with_std)"
            )
        scaler_mean = tuple(float(v) for v in scaler.mean_)
        scaler_scale = tuple(float(v) for v in scaler.scale_)
    probe = Probe(
        kind=kind,
        inputs=inputs,
        features=tuple(features) if inputs == "features" and features is not None else None,
        pool=pool,
        coef=tuple(coef),
        intercept=intercept,
        scaler_mean=scaler_mean,
        scaler_scale=scaler_scale,
        path=str(path),
    )
    _validate(probe, str(path))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(probe.to_dict(), indent=1) + "\n", encoding="utf-8")
    return probe


def _floats(value: Any, field: str, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise ProbeError(where, f"{field!r} must be a list of numbers")
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in out):
        raise ProbeError(where, f"{field!r} must hold finite numbers")
    return out


def probe_from_dict(data: Any, *, path: str = "<probe>") -> Probe:
    """Build a :class:`Probe` from its JSON form, checking every field."""
    if not isinstance(data, dict):
        raise ProbeError(path, "a probe file must hold a JSON object")
    known = {"kind", "inputs", "features", "pool", "coef", "intercept", "scaler"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProbeError(path, f"unknown keys {unknown}; known: {sorted(known)}")
    kind = data.get("kind", "logistic")
    if kind not in _KINDS:
        raise ProbeError(path, f"kind must be one of {', '.join(_KINDS)}, not {kind!r}")
    inputs = data.get("inputs", "features")
    if inputs not in _INPUTS:
        raise ProbeError(path, f"inputs must be one of {', '.join(_INPUTS)}, not {inputs!r}")
    pool = data.get("pool", "mean")
    if pool not in _POOLS:
        raise ProbeError(path, f"pool must be one of {', '.join(_POOLS)}, not {pool!r}")
    coef = _floats(data.get("coef"), "coef", path)
    intercept = data.get("intercept")
    if isinstance(intercept, list) and len(intercept) == 1:
        intercept = intercept[0]
    if not isinstance(intercept, (int, float)) or isinstance(intercept, bool):
        raise ProbeError(path, "'intercept' must be a number")
    features = data.get("features")
    if features is not None:
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise ProbeError(path, "'features' must be a list of feature names")
        features = tuple(features)
    scaler = data.get("scaler")
    scaler_mean = scaler_scale = None
    if scaler is not None:
        if not isinstance(scaler, dict) or set(scaler) != {"mean", "scale"}:
            raise ProbeError(path, "'scaler' must be null or {\"mean\": [...], \"scale\": [...]}")
        scaler_mean = _floats(scaler["mean"], "scaler.mean", path)
        scaler_scale = _floats(scaler["scale"], "scaler.scale", path)
    probe = Probe(
        kind=kind,
        inputs=inputs,
        features=features if inputs == "features" else None,
        pool=pool,
        coef=coef,
        intercept=float(intercept),
        scaler_mean=scaler_mean,
        scaler_scale=scaler_scale,
        path=path,
    )
    if inputs == "features" and features is None:
        raise ProbeError(path, "inputs 'features' needs 'features': [names in coef order]")
    _validate(probe, path)
    return probe


def _validate(probe: Probe, where: str) -> None:
    if probe.n_inputs == 0:
        raise ProbeError(where, "'coef' is empty")
    if not math.isfinite(probe.intercept):
        raise ProbeError(where, "'intercept' must be finite")
    if probe.features is not None and len(probe.features) != probe.n_inputs:
        raise ProbeError(
            where, f"{len(probe.features)} features but {probe.n_inputs} coefficients"
        )
    if probe.features is not None and len(set(probe.features)) != len(probe.features):
        raise ProbeError(where, "'features' names a feature twice")
    if probe.scaler_mean is not None and probe.scaler_scale is not None:
        if len(probe.scaler_mean) != probe.n_inputs or len(probe.scaler_scale) != probe.n_inputs:
            raise ProbeError(where, "scaler mean/scale must have one entry per coefficient")
        if any(s <= 0 for s in probe.scaler_scale):
            raise ProbeError(where, "scaler scale entries must be > 0")


def load_probe(path: str | Path) -> Probe:
    """Read a probe JSON file written by :func:`save_probe` (raises :class:`ProbeError`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProbeError(str(p), f"cannot read probe file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ProbeError(
            str(p), f"not a probe file (not UTF-8 JSON: byte {exc.start} cannot be decoded); save_probe writes JSON"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProbeError(str(p), f"not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    return probe_from_dict(data, path=str(p))
