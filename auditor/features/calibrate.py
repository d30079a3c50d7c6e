"""Calibration: name the chosen latents, measure them, fit probes, set thresholds at a target FPR.

Everything here reads the training split only. For each category:

- the labelled latents get statistics (quantiles on benign text, max activation,
  training AUROC) and a threshold: the smallest max-pooled activation that at most
  ``target_fpr`` of benign training texts reach;
- a sparse (L1) logistic probe over *all* named features of the library (pooled
  per text by max or mean; ``auto`` picks the pool with the better cross-validated
  AUROC) is fitted with its regularisation chosen by cross-validation, and its
  probability threshold is set at ``target_fpr`` on *out-of-fold* benign
  probabilities, so the threshold is not flattered by the probe having seen those texts.

:func:`calibrate` returns the updated library and a :class:`Calibration` record
(also written as ``calibration.json`` beside the library); :func:`policy_from_calibration`
turns that record into the default policy.

Example::

    lib, cal = calibrate(library, pooled, rows, split, labels, probe_dir=Path("probes"))
    Path("policies/default.yaml").write_text(policy_from_calibration(cal, library_ref="smollm2-135m-instruct"))
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from auditor.errors import DatasetError, LibraryError
from auditor.features.discover import (
    MIN_POSITIVES,
    auroc_columns,
    category_rows,
    check_fpr,
    check_latents,
    discover,
    sample_warnings,
    tpr_at_fpr,
)
from auditor.features.labelled import BENIGN, TRAIN, LabelledRow, Pooled, Side
from auditor.features.library import FEATURE_NAME_PATTERN, Feature, FeatureLibrary, FeatureStats, ProbeEntry, SAEStats
from auditor.features.yamlsource import located, parse_yaml

__all__ = [
    "FeatureLabel",
    "ProbeCalibration",
    "FeatureCalibration",
    "Calibration",
    "load_labels",
    "check_label_categories",
    "labels_to_yaml",
    "auto_labels",
    "fit_sparse_probe",
    "calibrate",
    "policy_from_calibration",
    "QUANTILES",
    "SEVERITY",
    "MAX_DRIVERS",
    "EVIDENCE_LEVEL",
]

QUANTILES = ("0.5", "0.9", "0.95", "0.99", "0.999")
"""Benign quantiles recorded for every feature and for the reconstruction error."""

Pool = Literal["max", "mean"]

_MIN_FEATURE_THRESHOLD = 0.01

MAX_DRIVERS = 12
"""Most features a probe rule lists as its evidence."""

EVIDENCE_LEVEL = 0.01
"""Max activation at which a probe's driving feature counts as present in the text."""

SEVERITY: dict[str, tuple[str, str]] = {
    "dangerous": ("high", "critical"),
    "self_harm": ("high", "critical"),
    "deception": ("medium", "high"),
    "bias": ("medium", "high"),
    "privacy": ("medium", "high"),
}
"""Category -> (severity at the target FPR, severity at the strict FPR). Unlisted categories: (low, medium)."""


@dataclass(frozen=True)
class FeatureLabel:
    """A latent chosen for the library: its name (``<category>.<slug>``) and description."""

    index: int
    name: str
    description: str

    @property
    def category(self) -> str:
        return self.name.split(".", 1)[0]


def load_labels(path: str | Path) -> list[FeatureLabel]:
    """Read a labels file: a YAML list of ``{index, name, description}``.

    Read as policies and libraries are (:func:`~auditor.features.yamlsource.parse_yaml`:
    control characters, alias bombs and absurd nesting refused); a problem names
    ``FILE:LINE:COLUMN``.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(str(p), "no such labels file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(str(p), f"cannot read it: {exc}") from None
    data, smap, problems = parse_yaml(text)
    if problems:
        first = problems[0]
        raise DatasetError(located(p, first.line, first.column), first.message)
    if not isinstance(data, list):
        raise DatasetError(str(p), "a labels file is a YAML list of {index, name, description}")
    out: list[FeatureLabel] = []
    for i, item in enumerate(data):
        where = located(p, *(smap.value((i,)) or (None, None)))
        index = item.get("index") if isinstance(item, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or not isinstance(item.get("name"), str):
            raise DatasetError(where, f"entry {i}: needs an integer 'index' and a string 'name'")
        if not re.match(FEATURE_NAME_PATTERN, item["name"]):
            raise DatasetError(where, f"entry {i}: name {item['name']!r} is not dotted lowercase like 'deception.fraud'")
        out.append(FeatureLabel(index, item["name"], str(item.get("description", ""))))
    _check_unique(out, str(p))
    return out


def check_label_categories(labels: Sequence[FeatureLabel], rows: Sequence[LabelledRow], where: str = "<labels>") -> None:
    """Refuse labels whose category (the part of the name before the dot) has no rows in the data.

    Such a feature cannot be measured against its category, so a label naming one
    is a typo or belongs to another data set. ``benign.*`` labels are allowed.
    """
    present = sorted({r.category for r in rows})
    unknown = sorted({lb.category for lb in labels if lb.category not in present})
    if unknown:
        names = [lb.name for lb in labels if lb.category in unknown]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise DatasetError(
            where,
            f"labels of categories with no rows in the data: {', '.join(unknown)} ({shown}); "
            f"the data has {', '.join(present)}. Name each feature <category>.<slug> after one of those",
        )


def _check_unique(labels: Sequence[FeatureLabel], where: str) -> None:
    names = [lb.name for lb in labels]
    idx = [lb.index for lb in labels]
    dup = sorted({n for n in names if names.count(n) > 1}) + sorted({str(i) for i in idx if idx.count(i) > 1})
    if dup:
        raise DatasetError(where, f"names and indices must be unique; repeated: {', '.join(dup)}")


def labels_to_yaml(labels: Sequence[FeatureLabel]) -> str:
    """The labels as the YAML :func:`load_labels` reads."""
    data = [{"index": lb.index, "name": lb.name, "description": lb.description} for lb in labels]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:32] or "x"


_PUNCT = re.compile(r"^[^a-z0-9]*$")


def _name_slug(tokens: Sequence[tuple[str, int]]) -> str:
    """A name from a latent's strongest tokens: up to two word tokens, else ``punct``."""
    words = [_slug(t) for t, _ in tokens if not _PUNCT.match(t)]
    words = [w for w in dict.fromkeys(words) if w != "x"][:2]
    return "_".join(words) if words else "punct"


def auto_labels(
    pooled: Pooled,
    rows: Sequence[LabelledRow],
    split: dict[str, Side],
    categories: Sequence[str],
    *,
    per_category: int = 6,
    method: Literal["l1", "auroc"] = "l1",
    min_auroc: float = 0.55,
    exclude: Sequence[int] = (),
) -> list[FeatureLabel]:
    """Pick latents per category (no latent twice) and name them from their strongest tokens.

    ``method="l1"`` takes the largest positive weights of an L1 probe over all
    latents (:func:`~auditor.features.discover.select_latents_l1`); ``"auroc"``
    the best latents one by one. Latents below ``min_auroc`` on their own are
    dropped. Names are ``<category>.<strongest word tokens>``; descriptions quote
    the tokens, the activity rates and the strongest context, for a reviewer to
    rewrite by hand.
    """
    from auditor.features.discover import select_latents_l1

    check_latents(exclude, pooled.max.shape[1], "excluded latent")
    used: set[int] = set(int(i) for i in exclude)
    names: set[str] = set()
    out: list[FeatureLabel] = []
    for cat in categories:
        wanted = select_latents_l1(pooled, rows, split, cat, top=per_category, exclude=sorted(used)) if method == "l1" else []
        if len(wanted) < per_category:
            # Top up by single-latent AUROC (an L1 probe may put its weight on latents that are *silent* on the category).
            ranked = discover(pooled, rows, split, cat, top=per_category, exclude=sorted(used | set(wanted)), n_contexts=0)
            wanted += [c.index for c in ranked][: per_category - len(wanted)]
        found = discover(pooled, rows, split, cat, top=len(wanted), n_contexts=1, min_frac_pos=0.0, only=wanted)
        cands = {c.index: c for c in found}
        for i in wanted:
            c = cands.get(i)
            if c is None or c.auroc < min_auroc:
                continue
            used.add(i)
            name = f"{cat}.{_name_slug(c.top_tokens)}"
            if name in names:
                name = f"{name}_{i}"
            names.add(name)
            toks = ", ".join(repr(t) for t, _ in c.top_tokens[:4])
            ctx = c.contexts[0].split(": ", 1)[-1] if c.contexts else ""
            desc = (
                f"Strongest on {toks}; active in {c.frac_pos:.0%} of {cat} texts vs {c.frac_neg:.0%} of benign. "
                f"Top context: \"{ctx}\""
            )
            out.append(FeatureLabel(i, name, desc))
    return out


@dataclass
class FeatureCalibration:
    name: str
    index: int
    category: str
    auroc: float
    threshold: float
    """Max-pooled activation level reached by at most ``target_fpr`` of benign training texts."""
    train_tpr: float


@dataclass
class ProbeCalibration:
    name: str
    path: str
    category: str
    pool: str
    C: float
    n_nonzero: int
    threshold: float
    """Probability reached by at most ``target_fpr`` of benign training texts (out-of-fold)."""
    strict_threshold: float
    """The same at ``strict_fpr``."""
    cv_auroc: float
    cv_tpr: float
    cv_auroc_by_pool: dict[str, float] = field(default_factory=dict)
    drivers: list[str] = field(default_factory=list)
    """Features with a positive weight, largest first (at most ``MAX_DRIVERS``): the policy's evidence."""


@dataclass
class Calibration:
    """What :func:`calibrate` measured (written as ``calibration.json``)."""

    dataset: str
    target_fpr: float
    strict_fpr: float
    n_train: dict[str, int]
    features: list[FeatureCalibration]
    probes: list[ProbeCalibration]
    recon_error_quantiles: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    """What the training data was too small to support (thresholds it cannot resolve, few positives)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        data = json.loads(text)
        data["features"] = [FeatureCalibration(**f) for f in data["features"]]
        data["probes"] = [ProbeCalibration(**p) for p in data["probes"]]
        return cls(**data)

    def best_feature(self, category: str) -> FeatureCalibration | None:
        """The category's labelled feature with the highest training AUROC."""
        feats = [f for f in self.features if f.category == category]
        return max(feats, key=lambda f: f.auroc) if feats else None


def fit_sparse_probe(
    x: np.ndarray,
    y: np.ndarray,
    *,
    cs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
    folds: int = 5,
    seed: int = 0,
) -> tuple[Any, Any, float, np.ndarray]:
    """L1 logistic regression on standardised ``x [N, F]`` with ``C`` chosen by cross-validated AUROC.

    Returns ``(scaler, model, C, oof)``: the fitted StandardScaler and
    LogisticRegression (refitted on all rows) and the out-of-fold probabilities
    ``[N]`` of the chosen ``C``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    if not cs:
        raise ValueError("cs must list at least one regularisation strength")
    n_min = int(min(y.sum(), len(y) - y.sum()))
    if n_min < 2:
        raise DatasetError("<train>", "a probe needs at least 2 positive and 2 negative training texts")
    k = max(2, min(folds, n_min))
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)

    def model(c: float) -> Any:
        return LogisticRegression(
            C=c, l1_ratio=1.0, solver="liblinear", class_weight="balanced", max_iter=2000, random_state=seed
        )

    best: tuple[float, float, np.ndarray] = (-1.0, cs[0], np.zeros(len(y)))
    for c in cs:
        oof = np.zeros(len(y))
        for tr, te in skf.split(x, y):
            sc = StandardScaler().fit(x[tr])
            oof[te] = model(c).fit(sc.transform(x[tr]), y[tr]).predict_proba(sc.transform(x[te]))[:, 1]
        auc = float(roc_auc_score(y, oof))
        if auc > best[0] + 1e-9:
            best = (auc, c, oof)
    scaler = StandardScaler().fit(x)
    clf = model(best[1]).fit(scaler.transform(x), y)
    return scaler, clf, best[1], best[2]


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {q: round(float(np.quantile(values, float(q))), 5) for q in QUANTILES}


def calibrate(
    library: FeatureLibrary,
    pooled: Pooled,
    rows: Sequence[LabelledRow],
    split: dict[str, Side],
    labels: Sequence[FeatureLabel],
    *,
    probe_dir: Path,
    dataset: str,
    target_fpr: float = 0.05,
    strict_fpr: float = 0.01,
    pool: Literal["auto", "max", "mean"] = "auto",
    categories: Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[FeatureLibrary, Calibration]:
    """Measure ``labels`` on the training split, fit one probe per category, return the new library.

    The library keeps its ``sae`` block (with ``stats.recon_error_quantiles`` measured
    on benign training tokens) and gets ``labels`` as features and one probe per
    category, saved as ``probe_dir/<category>.json``.
    """
    from auditor.policy.probes import save_probe

    check_fpr(target_fpr, strict_fpr)
    present = {r.category for r in rows}
    cats = list(categories) if categories else sorted(present - {BENIGN})
    if not cats:
        raise DatasetError("<data>", f"only {BENIGN} rows; calibration needs rows of at least one other category")
    missing = [c for c in cats if c not in present]
    if missing:
        raise DatasetError("<data>", f"no rows of categories {missing}; present: {sorted(present)}")
    if not labels:
        raise DatasetError("<calibrate>", "no features to calibrate; give a labels file or let discovery pick some")
    _check_unique(labels, "<labels>")
    d_sae = pooled.max.shape[1]
    bad = [lb.index for lb in labels if not 0 <= lb.index < d_sae]
    if bad:
        raise LibraryError(f"latent indices out of range for an SAE with {d_sae} latents: {bad}")
    check_label_categories(labels, rows)
    where = pooled.row_index()
    benign_train = [where[r.id] for r in rows if r.category == BENIGN and split[r.id] == TRAIN]
    cols = [lb.index for lb in labels]
    warnings = sample_warnings(
        "benign training split", None, len(benign_train), [target_fpr, strict_fpr], negatives="benign training texts"
    )

    features: list[Feature] = []
    feat_cal: list[FeatureCalibration] = []
    x_max = pooled.max.numpy()
    for lb in labels:
        stats_auc = None
        if lb.category in present and lb.category != BENIGN:
            pos, neg = category_rows(pooled, rows, split, lb.category)
            col = x_max[:, lb.index]
            stats_auc = float(auroc_columns(col[pos, None], col[neg, None])[0])
            tpr, thr = tpr_at_fpr(col[pos], col[neg], target_fpr)
            # A latent silent on nearly all benign text would get a threshold just above 0; any
            # activation at all is the signal then, but the score (value / threshold) stays bounded.
            thr = max(_ceil(thr, 4), _MIN_FEATURE_THRESHOLD)
            feat_cal.append(FeatureCalibration(lb.name, lb.index, lb.category, stats_auc, thr, tpr))
        features.append(
            Feature(
                name=lb.name,
                index=lb.index,
                category=lb.category,
                description=lb.description,
                source="contrastive",
                stats=FeatureStats(
                    benign_quantiles=_quantiles(x_max[benign_train, lb.index]),
                    max_activation=round(float(x_max[:, lb.index].max()), 5),
                    auroc=round(stats_auc, 5) if stats_auc is not None else None,
                    dataset=f"{dataset} (train split)",
                ),
            )
        )

    probes: list[ProbeEntry] = []
    probe_cal: list[ProbeCalibration] = []
    names = [lb.name for lb in labels]
    for cat in cats:
        pos, neg = category_rows(pooled, rows, split, cat)
        y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
        pools: list[Pool] = ["max", "mean"] if pool == "auto" else [pool]
        fits = {}
        for p in pools:
            mat = (pooled.max if p == "max" else pooled.mean)[:, cols].numpy()  # [N, n_features]
            x = np.concatenate([mat[pos], mat[neg]])
            fits[p] = fit_sparse_probe(x, y, seed=seed)
        by_pool = {p: float(auroc_columns(f[3][: len(pos), None], f[3][len(pos) :, None])[0]) for p, f in fits.items()}
        chosen: Pool = max(by_pool, key=lambda p: by_pool[p])  # type: ignore[assignment]
        scaler, clf, c, oof = fits[chosen]
        tpr, thr = tpr_at_fpr(oof[: len(pos)], oof[len(pos) :], target_fpr)
        _, strict = tpr_at_fpr(oof[: len(pos)], oof[len(pos) :], strict_fpr)
        coef = clf.coef_[0]
        if len(pos) < MIN_POSITIVES:
            warnings.append(
                f"{cat}: only {len(pos)} training texts (fewer than {MIN_POSITIVES}); its probe and thresholds are rough"
            )
        if not np.any(coef):
            warnings.append(
                f"{cat}: the probe put no weight on any labelled feature, so it scores every text the same and "
                "never fires; label latents that fire on this category"
            )
        drivers = [names[j] for j in np.argsort(-coef, kind="stable") if coef[j] > 0][:MAX_DRIVERS]
        rel = f"probes/{cat}.json"
        save_probe(clf, probe_dir / f"{cat}.json", inputs="features", features=names, pool=chosen, scaler=scaler)
        pname = f"{cat}.probe"
        probes.append(ProbeEntry(name=pname, path=rel))
        probe_cal.append(
            ProbeCalibration(
                name=pname,
                path=rel,
                category=cat,
                pool=chosen,
                C=c,
                n_nonzero=int(np.count_nonzero(clf.coef_)),
                threshold=_clip_prob(thr),
                strict_threshold=_clip_prob(max(strict, thr)),
                cv_auroc=by_pool[chosen],
                cv_tpr=tpr,
                cv_auroc_by_pool=by_pool,
                drivers=drivers,
            )
        )

    recon_q = _quantiles(pooled.recon_of(benign_train).numpy())
    sae = library.sae.model_copy(
        update={"stats": SAEStats(recon_error_quantiles=recon_q, dataset=f"{dataset} (benign, train split)")}
    )
    new = FeatureLibrary.model_validate(
        {
            "apiVersion": library.api_version,
            "kind": library.kind,
            "id": library.id,
            "sae": sae.model_dump(mode="json", exclude_none=True),
            "features": [f.model_dump(mode="json", exclude_none=True) for f in features],
            "probes": [p.model_dump(mode="json") for p in probes],
        }
    )
    if library.path is not None:
        new.with_path(library.path)
    n_train: dict[str, int] = {}
    for r in rows:
        if split[r.id] == TRAIN:
            n_train[r.category] = n_train.get(r.category, 0) + 1
    cal = Calibration(
        dataset=dataset,
        target_fpr=target_fpr,
        strict_fpr=strict_fpr,
        n_train=dict(sorted(n_train.items())),
        features=feat_cal,
        probes=probe_cal,
        recon_error_quantiles=recon_q,
        warnings=warnings,
    )
    return new, cal


def _ceil(x: float, digits: int) -> float:
    """``x`` rounded *up* to ``digits`` decimals: a threshold never drops below the level it must exceed."""
    scale = 10.0**digits
    return math.ceil(x * scale) / scale


def _clip_prob(p: float) -> float:
    """A probability threshold the policy schema accepts, in (0, 1]."""
    return float(min(max(_ceil(p, 6), 1e-6), 1.0))


class _Flow(dict):  # type: ignore[type-arg]
    """A mapping written on one line (``{feature: x, agg: max, threshold: 1.0}``) in generated YAML."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Flow, lambda d, data: d.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=True))


def policy_from_calibration(
    cal: Calibration,
    *,
    library_ref: str,
    name: str = "default",
    feature_rules: bool = False,
    anomaly_quantile: str | None = "0.999",
) -> str:
    """The default policy as YAML text, from a calibration record.

    Per category: a probe rule at the target FPR (alert) and one at the strict
    FPR with the higher severity (``block`` added when that severity is critical),
    each also requiring one of the probe's positively weighted features to be
    active (a ``<category>_evidence`` macro), so alerts name the features behind them;
    with ``feature_rules`` also a rule on the category's best single feature. An
    anomaly rule annotates text the SAE reconstructs worse than the benign
    ``anomaly_quantile`` on several tokens.
    """
    pct = f"{cal.target_fpr * 100:g}%"
    strict_pct = f"{cal.strict_fpr * 100:g}%"
    rules: list[dict[str, Any]] = []
    macros: dict[str, Any] = {}
    for p in cal.probes:
        low, high = SEVERITY.get(p.category, ("low", "medium"))

        def condition(threshold: float, p: ProbeCalibration = p) -> dict[str, Any]:
            leaf = _Flow(probe=_Flow(name=p.name, threshold=threshold))
            return {"all": [leaf, {"macro": f"{p.category}_evidence"}]} if p.drivers else leaf

        if p.drivers:
            # The probe decides; the evidence leaves make every alert name the features that drove it
            # (each with its value and token spans) and keep a probe from firing on no feature at all.
            macros[f"{p.category}_evidence"] = {
                "any": [_Flow(feature=d, agg="max", threshold=EVIDENCE_LEVEL) for d in p.drivers]
            }
        rules.append(
            {
                "id": f"{p.category.replace('_', '-')}-probe",
                "description": f"{p.category} probe over the library's features ({pct} benign FPR on train)",
                "severity": low,
                "category": p.category,
                "condition": condition(p.threshold),
                "labels": {"category": p.category},
                "annotations": {"summary": f"Text looks like {p.category.replace('_', ' ')} content"},
                "actions": ["alert"],
            }
        )
        rules.append(
            {
                "id": f"{p.category.replace('_', '-')}-probe-strict",
                "description": f"{p.category} probe, confident ({strict_pct} benign FPR on train)",
                "severity": high,
                "category": p.category,
                "condition": condition(p.strict_threshold),
                "labels": {"category": p.category},
                "annotations": {"summary": f"Strong {p.category.replace('_', ' ')} signal"},
                "actions": ["alert", "block"] if high == "critical" else ["alert"],
            }
        )
        best = cal.best_feature(p.category)
        if feature_rules and best is not None:
            rules.append(
                {
                    "id": f"{p.category.replace('_', '-')}-feature",
                    "description": f"{best.name} alone above its {pct}-FPR level",
                    "severity": low,
                    "category": p.category,
                    "condition": _Flow(feature=best.name, agg="max", threshold=best.threshold),
                    "actions": ["alert"],
                }
            )
    if anomaly_quantile is not None and anomaly_quantile in cal.recon_error_quantiles:
        rules.append(
            {
                "id": "sae-anomaly",
                "description": f"Three or more tokens the SAE reconstructs worse than the benign {anomaly_quantile} quantile",
                "severity": "info",
                "category": "anomaly",
                "condition": _Flow(anomaly=_Flow(quantile=anomaly_quantile), agg="count_above", threshold=3.0),
                "actions": ["annotate"],
            }
        )
    doc = {
        "apiVersion": "auditor/v1",
        "kind": "Policy",
        "metadata": {
            "name": name,
            "description": "Default safety policy for SmolLM2-135M-Instruct: one calibrated probe per category",
            "version": "1",
        },
        "library": library_ref,
        **({"macros": macros} if macros else {}),
        "rules": rules,
    }
    header = (
        "# Default safety policy, generated by `auditor calibrate --write-policy` from\n"
        f"# calibration.json (data: {cal.dataset}). Thresholds: probe probabilities reached by\n"
        f"# {pct} (alert) and {strict_pct} (stricter rule) of benign training texts, out of fold.\n"
        "# Scores are value / threshold (>= 1 fires); category_scores take the max over a category's rules.\n"
    )
    return header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
