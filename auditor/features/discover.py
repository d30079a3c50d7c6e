"""Contrastive discovery: rank SAE latents by how well they separate a category from benign text.

For each latent the score of a text is its max activation over the text's
content tokens (what a policy's ``agg: max`` leaf reads). A latent is ranked by
its AUROC for "category text vs benign text" on the training split, with the
mean difference of the pooled activations and the share of texts it is active
on beside it, and shown with its top-activating contexts: the texts of the
category where it fires hardest, the strongest token marked ``[[like this]]``.

Example::

    rows = load_labelled("datasets/safety-v1")
    split = assign_split(rows)
    pooled = cached_pooled(rows, [("sae-l15", sae_path)])["sae-l15"]
    for cand in discover(pooled, rows, split, "deception", top=10):
        print(cand.index, cand.auroc, cand.contexts[0])
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from auditor.errors import ConfigError, DatasetError
from auditor.features.labelled import BENIGN, TRAIN, LabelledRow, Pooled, Side

__all__ = [
    "Candidate",
    "auroc_columns",
    "tpr_at_fpr",
    "check_fpr",
    "check_latents",
    "sample_warnings",
    "MIN_POSITIVES",
    "discover",
    "category_rows",
    "context_snippet",
    "top_tokens",
    "select_latents_l1",
]


def auroc_columns(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC of every column as a score for "positive": ``pos [P, F]``, ``neg [Q, F]`` -> ``[F]``.

    The Mann-Whitney statistic with average ranks for ties, so it equals
    ``sklearn.metrics.roc_auc_score`` column by column (0.5 for a constant column).
    """
    from scipy.stats import rankdata

    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise ValueError(f"pos and neg must be [P, F] and [Q, F], got {pos.shape} and {neg.shape}")
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative row")
    ranks = rankdata(np.concatenate([pos, neg], axis=0), axis=0, method="average")  # [P + Q, F]
    rank_sum = ranks[:n_pos].sum(axis=0)
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def tpr_at_fpr(pos_scores: np.ndarray, neg_scores: np.ndarray, fpr: float = 0.05) -> tuple[float, float]:
    """Best true-positive rate with false-positive rate <= ``fpr`` on these scores, and the threshold giving it.

    The threshold is the smallest score ``t`` such that at most ``floor(fpr * Q)``
    negatives score ``>= t``; the detector is "score >= t".
    """
    neg = np.sort(np.asarray(neg_scores, dtype=np.float64))[::-1]
    allowed = int(np.floor(fpr * len(neg) + 1e-9))
    if len(neg) == 0:
        raise ValueError("TPR at a fixed FPR needs negative scores")
    # Scores strictly above the (allowed+1)-th highest negative keep the FPR within budget. The
    # step up is a float32 one so the threshold still separates once a policy holds it in float32.
    bar = neg[allowed] if allowed < len(neg) else -np.inf
    thr = float(np.nextafter(np.float32(bar), np.float32(np.inf))) if np.isfinite(bar) else float(neg[-1])
    pos = np.asarray(pos_scores, dtype=np.float64)
    return float((pos >= thr).mean()) if len(pos) else 0.0, thr


MIN_POSITIVES = 20
"""Fewer positive texts than this and a rate or an AUROC moves by 5 points or more per text: warned about."""


def check_fpr(target_fpr: float, strict_fpr: float | None = None) -> None:
    """Refuse false-positive-rate targets outside ``0 < strict_fpr <= target_fpr < 1`` (NaN included).

    The one check behind ``calibrate --target-fpr/--strict-fpr`` and
    ``evaluate-detection --target-fpr``, run before any features are computed.
    """
    if not 0.0 < target_fpr < 1.0:
        raise ConfigError(f"--target-fpr must be a rate between 0 and 1 (exclusive), such as 0.05; got {target_fpr}")
    if strict_fpr is not None and not 0.0 < strict_fpr <= target_fpr:
        raise ConfigError(
            f"--strict-fpr must be a rate above 0 and at most --target-fpr ({target_fpr}), such as 0.01; got {strict_fpr}"
        )


def check_latents(indices: Sequence[int], d_sae: int | None, what: str = "latent") -> None:
    """Refuse latent indices outside ``[0, d_sae)`` (a negative index would silently count from the
    end); with ``d_sae`` None (the SAE not read yet) only negative ones."""
    bad = sorted({int(i) for i in indices if int(i) < 0 or (d_sae is not None and int(i) >= d_sae)})
    if not bad:
        return
    if d_sae is None:
        raise ConfigError(f"{what} {', '.join(map(str, bad))}: out of range; latents are numbered from 0")
    raise ConfigError(
        f"{what} {', '.join(map(str, bad))}: out of range; the SAE has {d_sae} latents, numbered 0 to {d_sae - 1}"
    )


def _pct(rate: float) -> str:
    return f"{rate * 100:g}%"


def sample_warnings(
    what: str, n_pos: int | None, n_neg: int, fprs: Sequence[float], *, negatives: str = "benign texts"
) -> list[str]:
    """Warnings when ``n_neg`` negatives cannot resolve the false-positive rates ``fprs`` or ``n_pos`` is tiny.

    With ``n`` negatives a threshold can only allow ``floor(fpr * n)`` of them above it:
    below ``1 / fpr`` negatives that is none, and the rate reached is 0%, not ``fpr``;
    two rates with the same ``floor`` give the same threshold.
    """
    out = []
    allowed = [int(np.floor(f * n_neg + 1e-9)) for f in fprs]
    unresolved = [f for f, a in zip(fprs, allowed) if a == 0]
    if unresolved:
        needs = " and ".join(f"{_pct(f)} needs at least {int(np.ceil(1 / f - 1e-9))}" for f in unresolved)
        out.append(
            f"{what}: only {n_neg} {negatives}; a false-positive rate of {needs} to be measured "
            f"(with fewer, the threshold sits above all of them and the rate reached is 0%)"
        )
    elif len(set(allowed)) < len(set(fprs)):
        out.append(
            f"{what}: only {n_neg} {negatives}; the thresholds at {' and '.join(_pct(f) for f in fprs)} "
            f"false positives fall on the same text and come out equal"
        )
    if n_pos is not None and n_pos < MIN_POSITIVES:
        out.append(
            f"{what}: only {n_pos} positive texts (fewer than {MIN_POSITIVES}); each moves the true-positive rate by "
            f"{100 / max(n_pos, 1):.0f} points, so treat the numbers as rough"
        )
    return out


@dataclass
class Candidate:
    """One latent ranked for one category."""

    index: int
    category: str
    auroc: float
    """AUROC of the max-pooled activation, category vs benign (training split)."""
    mean_diff: float
    """Mean max-pooled activation on the category minus on benign text."""
    mean_pos: float
    mean_neg: float
    frac_pos: float
    """Share of the category's texts where the latent is active at all."""
    frac_neg: float
    """Share of benign texts where it is active."""
    auroc_other: float | None = None
    """AUROC against the other (non-benign) categories' texts: > 0.5 means specific to this category."""
    top_tokens: list[tuple[str, int]] = field(default_factory=list)
    """The tokens it fires hardest on in the category's texts, with counts."""
    contexts: list[str] = field(default_factory=list)
    """Top-activating contexts, strongest token in ``[[...]]``, activation in front."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def category_rows(
    pooled: Pooled, rows: Sequence[LabelledRow], split: dict[str, Side], category: str, side: Side = TRAIN
) -> tuple[list[int], list[int]]:
    """Row numbers in ``pooled`` of ``category`` and of benign texts on one side of the split."""
    where = pooled.row_index()
    pos = [where[r.id] for r in rows if r.category == category and split[r.id] == side]
    neg = [where[r.id] for r in rows if r.category == BENIGN and split[r.id] == side]
    if not pos:
        raise DatasetError("<data>", f"no {side} rows of category {category!r}")
    if not neg:
        raise DatasetError("<data>", f"no {side} benign rows")
    return pos, neg


_SPACE = re.compile(r"\s+")


def context_snippet(tokens: list[str], position: int, *, before: int = 12, after: int = 6) -> str:
    """The tokens around ``position`` on one line, that token in ``[[...]]``."""
    left = "".join(tokens[max(1, position - before) : position])
    right = "".join(tokens[position + 1 : position + 1 + after])
    text = f"{left}[[{tokens[position]}]]{right}"
    return _SPACE.sub(" ", text).strip()


def top_tokens(pooled: Pooled, latent: int, rows: Sequence[int], n: int = 8) -> list[tuple[str, int]]:
    """The most frequent strongest tokens of ``latent`` over ``rows`` (where it is active)."""
    counts: dict[str, int] = {}
    for r in rows:
        pos = int(pooled.argmax[r, latent])
        if pos < 0:
            continue
        tok = pooled.tokens[r][pos].strip().lower()
        counts[tok] = counts.get(tok, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _contexts(pooled: Pooled, latent: int, rows: Sequence[int], n: int) -> list[str]:
    vals = pooled.max[rows, latent]  # [len(rows)]
    order = torch.argsort(vals, descending=True)[:n].tolist()
    out = []
    for j in order:
        r = rows[j]
        pos = int(pooled.argmax[r, latent])
        if pos < 0:
            break
        out.append(f"{float(vals[j]):.2f}: {context_snippet(pooled.tokens[r], pos)}")
    return out


def discover(
    pooled: Pooled,
    rows: Sequence[LabelledRow],
    split: dict[str, Side],
    category: str,
    *,
    top: int = 20,
    n_contexts: int = 5,
    min_frac_pos: float = 0.05,
    exclude: Sequence[int] = (),
    only: Sequence[int] | None = None,
) -> list[Candidate]:
    """The ``top`` latents for ``category`` by training-split AUROC against benign text.

    Only latents that are higher on the category (positive mean difference) and
    active on at least ``min_frac_pos`` of its texts are kept, so a latent that
    separates by being *silent* on the category (useless as an alert) is not proposed.
    ``only`` restricts the ranking to those latents.
    """
    check_latents([*exclude, *(only or ())], pooled.max.shape[1])
    pos_rows, neg_rows = category_rows(pooled, rows, split, category)
    where = pooled.row_index()
    other_rows = [
        where[r.id] for r in rows if r.category not in (category, BENIGN) and split[r.id] == TRAIN
    ]
    x = pooled.max  # [N, d_sae]
    pos, neg = x[pos_rows].numpy(), x[neg_rows].numpy()
    auc = auroc_columns(pos, neg)
    mean_pos, mean_neg = pos.mean(0), neg.mean(0)
    frac_pos, frac_neg = (pos > 0).mean(0), (neg > 0).mean(0)
    ok = (mean_pos > mean_neg) & (frac_pos >= min_frac_pos)
    if exclude:
        ok[np.asarray(list(exclude), dtype=np.int64)] = False
    if only is not None:
        keep = np.zeros_like(ok)
        keep[np.asarray(list(only), dtype=np.int64)] = True
        ok &= keep
    # Ties in AUROC (common at 1.0 on easy data) go to the larger mean difference.
    order = np.lexsort((-(mean_pos - mean_neg), -auc))
    ranked = [int(i) for i in order if ok[i]][:top]
    auc_other = auroc_columns(pos[:, ranked], x[other_rows][:, ranked].numpy()) if other_rows and ranked else None
    out = []
    for j, i in enumerate(ranked):
        out.append(
            Candidate(
                index=i,
                category=category,
                auroc=float(auc[i]),
                mean_diff=float(mean_pos[i] - mean_neg[i]),
                mean_pos=float(mean_pos[i]),
                mean_neg=float(mean_neg[i]),
                frac_pos=float(frac_pos[i]),
                frac_neg=float(frac_neg[i]),
                auroc_other=float(auc_other[j]) if auc_other is not None else None,
                top_tokens=top_tokens(pooled, i, pos_rows),
                contexts=_contexts(pooled, i, pos_rows, n_contexts),
            )
        )
    return out


def select_latents_l1(
    pooled: Pooled,
    rows: Sequence[LabelledRow],
    split: dict[str, Side],
    category: str,
    *,
    top: int = 16,
    C: float = 0.05,
    pool: str = "mean",
    exclude: Sequence[int] = (),
    seed: int = 0,
) -> list[int]:
    """Latents with the largest positive weights in an L1 logistic probe over *all* latents.

    The probe reads every latent (``pool``-pooled, standardised) on the training
    split, category vs benign. Unlike ranking latents one by one, this picks latents
    that add information to each other, which is what a probe over the named
    features needs.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if pool not in ("max", "mean"):
        raise ValueError(f"pool must be 'max' or 'mean', not {pool!r}")
    pos, neg = category_rows(pooled, rows, split, category)
    x = (pooled.max if pool == "max" else pooled.mean).numpy()
    check_latents(exclude, x.shape[1], "excluded latent")
    z = np.concatenate([x[pos], x[neg]])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    z = StandardScaler().fit_transform(z)
    clf = LogisticRegression(
        C=C, l1_ratio=1.0, solver="liblinear", class_weight="balanced", max_iter=5000, random_state=seed
    ).fit(z, y)
    coef = clf.coef_[0]
    skip = set(int(i) for i in exclude)
    return [int(i) for i in np.argsort(-coef, kind="stable") if coef[i] > 0 and int(i) not in skip][:top]
