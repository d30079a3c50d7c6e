"""The detection report: how well each category is detected on the held-out split.

Per category, positives are its held-out texts and negatives the held-out benign
texts. Three detectors are compared, each with AUROC and the true-positive rate
at 5% false positives (read off the held-out ROC curve):

(a) the best single SAE latent, chosen by training AUROC over every latent, max-pooled;
(b) the shipped policy: ``category_scores[category]`` from :meth:`Auditor.run`
    with the policy engine, end to end (tokenizer, model, SAE, engine);
(c) the reference: a logistic probe on the raw hookpoint activation
    (mean over content tokens), fitted on the training split.

The policy's own operating point (score >= 1) is reported too: its true- and
false-positive rates on held-out texts, and its alert rate on benign near-misses.

Example::

    report = evaluate_detection(rows, split, pooled, auditor, engine, categories=["bias", "deception"])
    Path("REPORT.md").write_text(render_report(report))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from auditor.errors import DatasetError
from auditor.features.discover import auroc_columns, category_rows, check_fpr, sample_warnings, tpr_at_fpr
from auditor.features.labelled import BENIGN, HELDOUT, TRAIN, LabelledRow, Pooled, Side

if TYPE_CHECKING:
    from auditor.pipeline import Auditor
    from auditor.policy import PolicyEngine

__all__ = [
    "Detector",
    "CategoryResult",
    "HookpointResult",
    "DetectionReport",
    "best_single_feature",
    "raw_probe",
    "policy_scores",
    "evaluate_detection",
    "compare_hookpoints",
    "render_report",
]


@dataclass
class Detector:
    """AUROC and TPR at the target FPR of one detector on one category's held-out texts."""

    auroc: float
    tpr: float
    detail: str = ""


def _detector(pos: np.ndarray, neg: np.ndarray, fpr: float, detail: str = "") -> Detector:
    auc = float(auroc_columns(np.asarray(pos, dtype=np.float64)[:, None], np.asarray(neg, dtype=np.float64)[:, None])[0])
    tpr, _ = tpr_at_fpr(pos, neg, fpr)
    return Detector(auc, tpr, detail)


@dataclass
class CategoryResult:
    category: str
    n_pos: int
    n_neg: int
    single: Detector
    policy: Detector | None
    raw: Detector
    policy_tpr_at_1: float | None = None
    """Share of held-out category texts the policy flags (score >= 1)."""
    policy_fpr_at_1: float | None = None
    """Share of held-out benign texts the policy flags for this category."""
    near_miss_rate: float | None = None
    """Share of held-out benign near-miss texts flagged for this category (None when there are none)."""
    by_kind: dict[str, Detector] = field(default_factory=dict)
    """The policy detector with positives restricted to prompts or to completions."""


@dataclass
class HookpointResult:
    name: str
    hookpoint: str
    single: dict[str, float]
    """Category -> held-out AUROC of the best training latent."""
    probe: dict[str, float]
    """Category -> held-out AUROC of an L1 probe over the 32 best training latents (max-pooled)."""
    raw: dict[str, float]
    """Category -> held-out AUROC of the raw-activation probe at this hookpoint."""


@dataclass
class DetectionReport:
    dataset: str
    target_fpr: float
    counts: dict[str, dict[str, int]]
    categories: list[CategoryResult]
    hookpoints: list[HookpointResult] = field(default_factory=list)
    library_features: list[dict[str, Any]] = field(default_factory=list)
    policy: str | None = None
    library: str | None = None
    hookpoint: str | None = None
    warnings: list[str] = field(default_factory=list)
    """What the held-out sample is too small to support (see :func:`~auditor.features.discover.sample_warnings`)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def best_single_feature(
    pooled: Pooled, rows: Sequence[LabelledRow], split: dict[str, Side], category: str
) -> tuple[int, float]:
    """The latent with the highest training AUROC (max-pooled) for ``category``, and that AUROC."""
    pos, neg = category_rows(pooled, rows, split, category, TRAIN)
    auc = auroc_columns(pooled.max[pos].numpy(), pooled.max[neg].numpy())
    i = int(np.argmax(auc))
    return i, float(auc[i])


def raw_probe(
    pooled: Pooled,
    rows: Sequence[LabelledRow],
    split: dict[str, Side],
    category: str,
    *,
    seed: int = 0,
    cs: Sequence[float] = (0.001, 0.01, 0.1, 1.0),
) -> tuple[np.ndarray, np.ndarray, float]:
    """Held-out probabilities (positives, negatives) of an L2 logistic probe on the mean raw activation.

    ``C`` is chosen by 5-fold cross-validated AUROC on the training split only.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pos, neg = category_rows(pooled, rows, split, category, TRAIN)
    hpos, hneg = category_rows(pooled, rows, split, category, HELDOUT)
    x = pooled.resid_mean.numpy().astype(np.float64)
    xt = np.concatenate([x[pos], x[neg]])
    yt = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])

    def model(c: float) -> Any:
        return make_pipeline(
            StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed)
        )

    k = max(2, min(5, len(pos), len(neg)))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    scores = [float(cross_val_score(model(c), xt, yt, cv=cv, scoring="roc_auc").mean()) for c in cs]
    c = cs[int(np.argmax(scores))]
    clf = model(c).fit(xt, yt)
    return clf.predict_proba(x[hpos])[:, 1], clf.predict_proba(x[hneg])[:, 1], c


def _top_latent_probe(
    pooled: Pooled, rows: Sequence[LabelledRow], split: dict[str, Side], category: str, n: int = 32, seed: int = 0
) -> float:
    """Held-out AUROC of an L1 probe over the ``n`` best training latents (a hookpoint comparison)."""
    from auditor.features.calibrate import fit_sparse_probe

    pos, neg = category_rows(pooled, rows, split, category, TRAIN)
    hpos, hneg = category_rows(pooled, rows, split, category, HELDOUT)
    x = pooled.max.numpy()
    auc = auroc_columns(x[pos], x[neg])
    cols = np.argsort(-auc, kind="stable")[:n]
    xt = np.concatenate([x[pos][:, cols], x[neg][:, cols]])
    yt = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    scaler, clf, _, _ = fit_sparse_probe(xt, yt, seed=seed)
    p = clf.predict_proba(scaler.transform(x[hpos][:, cols]))[:, 1]
    q = clf.predict_proba(scaler.transform(x[hneg][:, cols]))[:, 1]
    return float(auroc_columns(p[:, None], q[:, None])[0])


def compare_hookpoints(
    pooled_by_name: dict[str, Pooled], rows: Sequence[LabelledRow], split: dict[str, Side], categories: Sequence[str]
) -> list[HookpointResult]:
    """Held-out AUROC per category of three detectors at each SAE's hookpoint (see :class:`HookpointResult`)."""
    out = []
    for name, pooled in pooled_by_name.items():
        single, probe, raw = {}, {}, {}
        for cat in categories:
            i, _ = best_single_feature(pooled, rows, split, cat)
            hpos, hneg = category_rows(pooled, rows, split, cat, HELDOUT)
            single[cat] = _detector(pooled.max[hpos, i].numpy(), pooled.max[hneg, i].numpy(), 0.05).auroc
            probe[cat] = _top_latent_probe(pooled, rows, split, cat)
            p, q, _ = raw_probe(pooled, rows, split, cat)
            raw[cat] = _detector(p, q, 0.05).auroc
        out.append(HookpointResult(name, pooled.hookpoint, single, probe, raw))
    return out


def policy_scores(
    auditor: Auditor, engine: PolicyEngine, texts: Sequence[str], *, chunk: int = 64
) -> list[dict[str, float]]:
    """``category_scores`` of each text, audited as plain text through :meth:`Auditor.run`."""
    from auditor.text import AuditInput

    out: list[dict[str, float]] = []
    for i in range(0, len(texts), chunk):
        items = [AuditInput(text=t, id=str(i + j)) for j, t in enumerate(texts[i : i + chunk])]
        for res in auditor.run(items, policy=engine):
            if res.verdict is None:
                raise DatasetError("<policy>", "the auditor returned no verdict; is a policy loaded?")
            out.append(dict(res.verdict.category_scores))
    return out


def evaluate_detection(
    rows: Sequence[LabelledRow],
    split: dict[str, Side],
    pooled: Pooled,
    categories: Sequence[str],
    *,
    auditor: Auditor | None = None,
    engine: PolicyEngine | None = None,
    dataset: str = "",
    target_fpr: float = 0.05,
    seed: int = 0,
) -> DetectionReport:
    """Evaluate detectors (a), (b), (c) on the held-out split (see the module docstring).

    Without ``auditor`` and ``engine`` the policy column is left empty.
    """
    from auditor.features.labelled import split_counts

    check_fpr(target_fpr)
    by_id = {r.id: r for r in rows}
    held_ids = [r.id for r in rows if split[r.id] == HELDOUT and (r.category in categories or r.category == BENIGN)]
    scores: dict[str, dict[str, float]] = {}
    if auditor is not None and engine is not None:
        missing = [c for c in categories if c not in engine.categories]
        if missing:
            raise DatasetError(
                str(engine.path), f"the policy has no rules for categories {missing}; it scores {list(engine.categories)}"
            )
        got = policy_scores(auditor, engine, [by_id[i].text for i in held_ids])
        scores = dict(zip(held_ids, got))
    results = []
    warnings: list[str] = []
    for cat in categories:
        hpos, hneg = category_rows(pooled, rows, split, cat, HELDOUT)
        warnings += sample_warnings(cat, len(hpos), len(hneg), [target_fpr], negatives="held-out benign texts")
        i, train_auc = best_single_feature(pooled, rows, split, cat)
        name = engine.library.name_for_index(i) if engine is not None else None
        single = _detector(
            pooled.max[hpos, i].numpy(),
            pooled.max[hneg, i].numpy(),
            target_fpr,
            f"latent {i}" + (f" ({name})" if name else "") + f", train AUROC {train_auc:.3f}",
        )
        p, q, c = raw_probe(pooled, rows, split, cat, seed=seed)
        raw = _detector(p, q, target_fpr, f"C={c:g}")
        res = CategoryResult(cat, len(hpos), len(hneg), single, None, raw)
        if scores:
            pos_ids = [pooled.ids[j] for j in hpos]
            neg_ids = [pooled.ids[j] for j in hneg]
            ps = np.array([scores[k][cat] for k in pos_ids])
            ns = np.array([scores[k][cat] for k in neg_ids])
            res.policy = _detector(ps, ns, target_fpr)
            res.policy_tpr_at_1 = float((ps >= 1.0).mean())
            res.policy_fpr_at_1 = float((ns >= 1.0).mean())
            near = [scores[k][cat] for k in neg_ids if by_id[k].near_miss]
            res.near_miss_rate = float(np.mean(np.array(near) >= 1.0)) if near else None
            for kind in ("prompt", "completion"):
                kp = np.array([scores[k][cat] for k in pos_ids if by_id[k].kind == kind])
                if len(kp):
                    res.by_kind[kind] = _detector(kp, ns, target_fpr, f"n={len(kp)}")
        results.append(res)
    feats = []
    if engine is not None:
        for f in engine.library.features:
            feats.append(
                {
                    "name": f.name,
                    "index": f.index,
                    "auroc": f.stats.auroc if f.stats is not None else None,
                    "description": f.description,
                }
            )
    return DetectionReport(
        dataset=dataset,
        target_fpr=target_fpr,
        counts=split_counts(rows, split),
        categories=results,
        library_features=feats,
        policy=str(engine.path) if engine is not None else None,
        library=str(engine.library.path) if engine is not None and engine.library.path is not None else None,
        hookpoint=pooled.hookpoint,
        warnings=warnings,
    )


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def render_report(report: DetectionReport, *, commands: Sequence[str] = (), notes: str = "") -> str:
    """The report as Markdown (what ``auditor evaluate-detection`` writes to REPORT.md)."""
    pct = f"{report.target_fpr * 100:g}%"
    lines = [
        "# Detection report: SmolLM2-135M-Instruct default library and policy",
        "",
        f"Data: `{report.dataset}`, held-out split; features, probes and thresholds were fitted on the training split. "
        f"Hookpoint: `{report.hookpoint}`. Policy: `{report.policy}`.",
        "",
        f"Per category, positives are its held-out texts and negatives the held-out benign texts. "
        f"TPR@{pct} is the true-positive rate at {pct} false positives on the held-out ROC curve.",
        "",
    ]
    if report.warnings:
        lines += ["**Too few held-out texts for some of these numbers:**", ""]
        lines += [f"- Warning: {w}" for w in report.warnings]
        lines += [""]
    lines += [
        f"| category | n pos / neg | (a) best single feature AUROC | (a) TPR@{pct} | (b) default policy AUROC | "
        f"(b) TPR@{pct} | (c) raw-activation probe AUROC | (c) TPR@{pct} | goal: (b) >= 0.90 and (c) - (b) <= 0.05 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report.categories:
        goal = "—"
        if r.policy is not None:
            ok = r.policy.auroc >= 0.90 and r.raw.auroc - r.policy.auroc <= 0.05
            goal = "met" if ok else "missed"
            if sample_warnings(r.category, r.n_pos, r.n_neg, [report.target_fpr]):
                goal += " (too few texts to tell)"
        lines.append(
            f"| {r.category} | {r.n_pos} / {r.n_neg} | {_f(r.single.auroc)} | {_f(r.single.tpr)} | "
            f"{_f(r.policy.auroc if r.policy else None)} | {_f(r.policy.tpr if r.policy else None)} | "
            f"{_f(r.raw.auroc)} | {_f(r.raw.tpr)} | {goal} |"
        )
    lines += ["", "(a) latents chosen on the training split:", ""]
    lines += [f"- {r.category}: {r.single.detail}; (c) {r.raw.detail}" for r in report.categories]
    if any(r.policy is not None for r in report.categories):
        lines += [
            "",
            "## The policy's own operating point (score >= 1, thresholds set on training data)",
            "",
            "| category | TPR (held-out) | FPR on held-out benign | alert rate on held-out benign near-misses |",
            "| --- | --- | --- | --- |",
        ]
        for r in report.categories:
            lines.append(f"| {r.category} | {_f(r.policy_tpr_at_1)} | {_f(r.policy_fpr_at_1)} | {_f(r.near_miss_rate)} |")
        lines += [
            "",
            "## Policy by kind of positive text (negatives: all held-out benign)",
            "",
            f"| category | prompts AUROC | prompts TPR@{pct} | completions AUROC | completions TPR@{pct} |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in report.categories:
            pr, co = r.by_kind.get("prompt"), r.by_kind.get("completion")
            lines.append(
                f"| {r.category} | {_f(pr.auroc if pr else None)} ({pr.detail if pr else 'n=0'}) | {_f(pr.tpr if pr else None)} | "
                f"{_f(co.auroc if co else None)} ({co.detail if co else 'n=0'}) | {_f(co.tpr if co else None)} |"
            )
    if report.hookpoints:
        cats = [r.category for r in report.categories]
        lines += [
            "",
            "## Which hookpoint separates categories best (held-out AUROC)",
            "",
            "Best single latent / L1 probe over the 32 best latents / raw-activation probe, each chosen or fitted on train.",
            "",
            "| SAE | hookpoint | " + " | ".join(cats) + " | mean |",
            "| --- | --- | " + " | ".join("---" for _ in cats) + " | --- |",
        ]
        for h in report.hookpoints:
            cells = [f"{h.single[c]:.3f} / {h.probe[c]:.3f} / {h.raw[c]:.3f}" for c in cats]
            means = [np.mean([d[c] for c in cats]) for d in (h.single, h.probe, h.raw)]
            lines.append(
                f"| {h.name} | `{h.hookpoint}` | " + " | ".join(cells) + " | " + " / ".join(f"{m:.3f}" for m in means) + " |"
            )
    lines += [
        "",
        "## Data",
        "",
        "| category | train | held-out | prompts | completions | near-misses |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cat, c in report.counts.items():
        lines.append(f"| {cat} | {c['train']} | {c['heldout']} | {c['prompt']} | {c['completion']} | {c['near_miss']} |")
    if report.library_features:
        lines += ["", "## Library features", "", "| name | latent | train AUROC | description |", "| --- | --- | --- | --- |"]
        for f in report.library_features:
            desc = str(f["description"]).replace("|", "\\|")
            lines.append(f"| `{f['name']}` | {f['index']} | {_f(f['auroc'])} | {desc} |")
    if commands:
        lines += ["", "## How this report was made", "", "```bash", *commands, "```"]
    if notes.strip():
        lines += ["", "## Notes", "", notes.strip()]
    return "\n".join(lines) + "\n"
