"""Evaluate a compiled policy on a batch of feature activations: one :class:`Verdict` per row.

``PolicyEngine.evaluate`` runs a fixed handful of tensor ops for the whole batch
and every rule: gather the leaf columns (``[B, T, L]``), aggregate them under
their scope masks (``[B, L]``), run the node program of the condition trees, and
compute sustained-run lengths for ``for_tokens`` rules with a cumulative max.
The rule scores and the exceptions' scores then cross to the host in one copy,
where Python loops over batch rows to decide which rules fired and which an
exception suppressed, and builds the result objects. On a CPU the same program runs as one C call
(:mod:`auditor.policy._host`'s C twin, in the kernel library; ``PolicyEngine.host_program``), or
for a small batch where that library does not build, in NumPy, whose calls cost a fraction of
torch's on arrays this small. On a CUDA device, where those ops
cost more to launch than to run, a batch shape that recurs replays them as one CUDA graph
(:mod:`auditor.policy._graphs`; ``PolicyEngine.cuda_graphs``).

Rule semantics (leaf semantics are in :mod:`auditor.policy.compile`):

- scores: a leaf scores ``value / threshold``; ``all`` takes the min of its
  children, ``any`` the max, ``not`` ``1 / score`` (capped at 1e6); a node fires
  exactly when its score is ``>= 1``;
- ``for_tokens: N`` adds a requirement: the per-token condition (leaves' per-token
  holds combined by the same all/any/not) must hold on ``N`` consecutive scoped
  tokens (a masked or out-of-scope token breaks the run); the rule's score is
  ``min(condition score, longest run / N)``;
- a rule with no token in scope scores 0 and does not fire; a rule whose
  exception fires keeps its score but does not match (``Verdict.suppressed``);
- identical leaves (same features, agg, levels, scope) are evaluated once.

Example::

    engine = load_policy("policies/default.yaml")
    acts = full_acts[..., engine.watched]                     # [B, T, F]
    verdicts = engine.evaluate(AuditBatch(acts, mask, is_completion))
    verdicts[0].action                                        # "allow" | "alert" | "block"
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
import weakref
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from auditor._cuda import HostCopy
from auditor.errors import AuditorError, PolicyError, PolicyErrors
from auditor.features.library import FeatureLibrary
from auditor.policy import schema as s
from auditor.policy._graphs import MAX_TOKENS, MAX_TOKENS_COMPILED, EvalGraphs
from auditor.policy._host import MAX_ELEMENTS as HOST_MAX_ELEMENTS
from auditor.policy._host import HostProgram, HostRows, NativeRun
from auditor.policy.compile import (
    AGGS,
    SCOPES,
    NOT_SCORE_CAP,
    OP_ALL,
    OP_ANY,
    OP_NOT,
    CompiledPolicy,
    compile_policy,
    policy_hash,
)

_log = logging.getLogger(__name__)

__all__ = [
    "AuditBatch",
    "LeafExplanation",
    "RuleMatch",
    "SteerAction",
    "Verdict",
    "RuleInfo",
    "PolicyEngine",
    "PendingVerdicts",
    "build_engine",
    "load_policy",
    "validate_files",
]

_ONE_MINUS = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))  # largest float32 below 1
_COUNT_AGGS = (AGGS.index("count_above"), AGGS.index("fraction_above"))


@dataclass
class AuditBatch:
    """What the engine reads: activations of the watched latents plus token masks."""

    features: Tensor
    """``[B, T, F]`` activations of the watched latents, columns in ``engine.watched`` order."""
    mask: Tensor
    """``[B, T]`` bool: real content tokens (False for padding, BOS, chat special tokens)."""
    is_completion: Tensor | None
    """``[B, T]`` bool: True on completion tokens, False on prompt tokens. None only for an engine
    whose policy reads no prompt or completion scope (``engine.reads_roles`` False): the roles
    decide nothing there, and a pipeline need not compute them."""
    recon_error: Tensor | None = None
    """``[B, T]`` relative reconstruction error; needed iff ``engine.needs_recon_error``."""
    resid: Tensor | None = None
    """``[B, T, d_in]`` raw hookpoint activations; needed iff ``engine.needs_resid``."""
    tokens: list[list[str]] | None = None
    """Token strings, for explanations."""
    is_prompt: Tensor | None = None
    """``[B, T]`` bool: True on prompt tokens; None means ``~is_completion``. Text that is
    neither prompt nor completion (a bare text to audit) is True in both, so prompt- and
    completion-scoped rules all see it."""


@dataclass
class LeafExplanation:
    """One leaf of a matched rule: its aggregated value and where it held."""

    kind: Literal["feature", "probe", "anomaly"]
    name: str
    agg: str
    value: float
    threshold: float
    fired: bool
    token_spans: list[tuple[int, int]]
    """Half-open token spans where the per-token value reached its level (``above`` or ``threshold``)."""
    above: float | None = None
    """Per-token level of count_above / fraction_above leaves."""
    span_texts: list[str] = field(default_factory=list)
    """The text of each span (joined token strings) when the batch carried ``tokens``."""


@dataclass
class SteerAction:
    """Steer one feature (from a matched rule's ``steer`` action)."""

    feature: str
    index: int
    """Latent index of the feature in the SAE."""
    mode: Literal["clamp", "scale", "add"]
    value: float
    rule_id: str


@dataclass(eq=False)
class RuleMatch:
    """A rule that fired on a row and was not suppressed by an exception.

    ``explanation`` (one :class:`LeafExplanation` per leaf of the rule, with token
    spans) is built on first access: a caller that only needs the action or the
    rule ids never pays for it.
    """

    rule_id: str
    description: str
    severity: str
    category: str
    actions: list[str]
    score: float
    labels: dict[str, str]
    annotations: dict[str, str]
    explain: Callable[[], list[LeafExplanation]] = field(repr=False)
    """Builds :attr:`explanation` (called once)."""

    @functools.cached_property
    def explanation(self) -> list[LeafExplanation]:
        """Each leaf of the rule's condition: value, threshold, whether it fired, where it held."""
        return self.explain()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (explanation included)."""
        return {
            "rule_id": self.rule_id,
            "description": self.description,
            "severity": self.severity,
            "category": self.category,
            "actions": list(self.actions),
            "score": self.score,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "explanation": [dataclasses.asdict(e) for e in self.explanation],
        }


@dataclass
class Verdict:
    """The policy's decision on one batch row."""

    action: Literal["allow", "alert", "block"]
    matches: list[RuleMatch]
    scores: dict[str, float]
    """Rule id -> score for every enabled rule (>= 1 means its condition held)."""
    category_scores: dict[str, float]
    annotations: list[str]
    steering: list[SteerAction]
    suppressed: dict[str, str] = field(default_factory=dict)
    """Rule id -> name of the exception that suppressed a rule whose condition held."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, matches with their explanations."""
        return {
            "action": self.action,
            "matches": [m.to_dict() for m in self.matches],
            "scores": dict(self.scores),
            "category_scores": dict(self.category_scores),
            "annotations": list(self.annotations),
            "steering": [dataclasses.asdict(st) for st in self.steering],
            "suppressed": dict(self.suppressed),
        }


@dataclass(frozen=True)
class RuleInfo:
    """A rule as listed by ``GET /v1/policies`` and ``auditor policy list``."""

    id: str
    description: str
    severity: str
    category: str
    scope: str
    enabled: bool
    actions: tuple[str, ...]
    for_tokens: int | None


def _inference(method: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.inference_mode()`` around ``method``, entered only when it is not on already (a
    pipeline's calls): on a CPU, right after a forward, entering it cost about as much as a
    short text's whole evaluation."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            return method(*args, **kwargs)
        with torch.inference_mode():
            return method(*args, **kwargs)

    return wrapper


def _spans(tok: Tensor) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Half-open spans of True along dim 1 of ``tok [B, T, L]``, keyed by ``(row, leaf)``.

    One vectorized edge detection; Python then walks the edges (two per span), not the tokens.
    """
    b, t, n = tok.shape
    padded = torch.zeros(b, n, t + 2, dtype=torch.int8)
    padded[:, :, 1:-1] = tok.permute(0, 2, 1)
    edges = torch.nonzero(padded[:, :, 1:] != padded[:, :, :-1]).tolist()  # [K, 3] (row, leaf, t), sorted
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (row, leaf, start), (_, _, end) in zip(edges[0::2], edges[1::2]):
        out.setdefault((row, leaf), []).append((start, end))
    return out


def _longest_run(x: Tensor) -> Tensor:
    """Longest run of True along dim 1 of ``x [B, T, R]`` -> ``[B, R]`` (int64)."""
    t = x.shape[1]
    pos = torch.arange(t, device=x.device).view(1, t, 1)  # [1, T, 1]
    last_false = torch.where(x, torch.full_like(pos, -1), pos).cummax(dim=1).values  # [B, T, R]
    run = torch.where(x, pos - last_false, torch.zeros_like(pos))
    return run.amax(dim=1) if t > 0 else x.new_zeros(x.shape[0], x.shape[2], dtype=torch.long)


def _as(t: Tensor, device: torch.device | None, dtype: torch.dtype) -> Tensor:
    """``t`` on ``device`` (None: where it is) as ``dtype``, without a call when it already is."""
    if t.dtype == dtype and (device is None or t.device == device):
        return t
    return t.to(device or t.device, dtype)


def _scope_masks(mask: Tensor, prompt: Tensor, comp: Tensor) -> Tensor:
    """Which tokens each scope sees, ``[B, T, 3]`` in ``SCOPES`` order (any, prompt, completion)."""
    return torch.stack([mask, mask & prompt, mask & comp], dim=-1)


def _consistent(score: Tensor, fired: Tensor) -> Tensor:
    """Nudge scores so ``score >= 1`` exactly where ``fired`` (rounding can disagree at the boundary)."""
    return torch.where(fired, score.clamp(min=1.0), score.clamp(max=_ONE_MINUS))


def _stack_feature_probes(compiled: CompiledPolicy, col_of: dict[int, int]) -> tuple[dict[str, Tensor] | None, bool]:
    """Every feature-input probe folded into one ``[F, U]`` weight matrix over the watched columns,
    and whether any of them max-pools.

    A probe is linear after its scaler: ``((x - m) / s) . w + b == x . (w / s) + (b - (m / s) . w)``,
    so per-token logits of all ``U`` distinct probes are one matmul, and pooling is a masked
    mean / max of the watched columns per scope followed by the same matmul. Leaves that use the
    same probe (different thresholds or scopes) share its column.
    """
    leaves = [
        i for i in compiled.probe_leaves
        if compiled.leaves[i].probe is not None and compiled.leaves[i].probe.inputs == "features"  # type: ignore[union-attr]
    ]
    if not leaves:
        return None, False
    units: dict[tuple[str | None, tuple[int, ...]], int] = {}
    weights: list[list[float]] = []
    bias: list[float] = []
    unit, scope, pool = [], [], []
    n_cols = len(col_of)
    for i in leaves:
        leaf = compiled.leaves[i]
        probe = leaf.probe
        assert probe is not None
        key = (leaf.probe_key, leaf.latents)
        if key not in units:
            units[key] = len(weights)
            w = [0.0] * n_cols
            mean = probe.scaler_mean if probe.scaler_mean is not None else (0.0,) * len(probe.coef)
            sd = probe.scaler_scale if probe.scaler_scale is not None else (1.0,) * len(probe.coef)
            b = float(probe.intercept)
            for lat, c_j, m_j, s_j in zip(leaf.latents, probe.coef, mean, sd):
                w[col_of[lat]] += c_j / s_j
                b -= m_j / s_j * c_j
            weights.append(w)
            bias.append(b)
        unit.append(units[key])
        scope.append(SCOPES.index(leaf.scope))
        pool.append(1 if probe.pool == "max" else 0)
    tensors = {
        "leaves": torch.tensor(leaves, dtype=torch.long),
        "weight": torch.tensor(weights, dtype=torch.float32).T.contiguous(),  # [F, U]
        "bias": torch.tensor(bias, dtype=torch.float32),  # [U]
        "unit": torch.tensor(unit, dtype=torch.long),  # [P]
        # Index into the flattened [pool (mean, max), scope, U] pooled logits.
        "pooled_index": torch.tensor([(pl * len(SCOPES) + sc) * len(weights) + u for pl, sc, u in zip(pool, scope, unit)], dtype=torch.long),
    }
    return tensors, any(pool)


def _probe_bound(fp: dict[str, Tensor] | None) -> float:
    """What an infinite (or larger finite) feature reads as in the feature probes' product (see
    :meth:`PolicyEngine._probe_input`): 2^64 over the largest weight, a float32 value, so that
    every product stays finite and no sum over tokens and features reaches float32's limit."""
    top = float(fp["weight"].abs().max()) if fp is not None and fp["weight"].numel() else 0.0
    return float(torch.tensor(2.0**64 / max(top, 1.0), dtype=torch.float32))


def _no_roles(mask: Tensor) -> tuple[Tensor, Tensor]:
    """The completion and prompt masks of a batch without roles: all False, two tensors, not one
    twice (a compiled program would compile again for the aliasing)."""
    return torch.zeros_like(mask), torch.zeros_like(mask)


class PolicyEngine:
    """One compiled policy: immutable, safe to share across threads."""

    cuda_graphs: bool = True
    """On a CUDA device, replay evaluations of batch shapes that recur as CUDA graphs (see
    :mod:`auditor.policy._graphs`); off evaluates every batch eagerly. Per engine, or for every
    engine on the class."""

    graph_max_tokens: int | None = None
    """Padded tokens (rows x tokens) of the largest batch replayed as a CUDA graph; the graphs kept
    hold twice that in all. None: 8,192, or 32,768 with :attr:`compile_program` (whose graphs keep
    a quarter of the memory a token)."""

    compile_program: bool | str | Callable[..., Any] = False
    """``torch.compile`` the evaluation's tensor program (True for inductor, or a backend), for
    GPUs: its hundred-odd small kernels become a few fused ones, which is what a CUDA graph then
    replays too. The first evaluations compile (tens of seconds; shapes are dynamic, so a few
    compilations in all, not one per batch shape). A compilation that fails is logged once and the
    engine evaluates eagerly; policies with hookpoint probes always do. On a CPU it is slower right
    after a forward (its guards cost more than the fused operations save on small batches). Per
    engine, or for every engine on the class."""

    host_program: bool = True
    """On a CPU, evaluate with the program's host twin (:mod:`auditor.policy._host`): one C call
    where the kernel library builds (:mod:`auditor.models.skinny`), 2.2-4.9x faster than torch's
    program at every batch size measured (``benchmarks/policy_eval.py``); else, for batches of up to
    :data:`auditor.policy._host.MAX_ELEMENTS` feature values, NumPy, whose operations cost a
    fraction of torch's per call. Off, torch evaluates every batch. Not with
    :attr:`compile_program` or hookpoint probes. Per engine, or for every engine on the class."""

    def __init__(
        self,
        policy: s.Policy,
        library: FeatureLibrary,
        compiled: CompiledPolicy,
        *,
        path: str | None = None,
        sources: tuple[Path, ...] = (),
    ) -> None:
        self.policy = policy
        self.library = library
        self.compiled = compiled
        self.path = path
        self.sources = sources
        """Files the engine was built from (policy, library, probes), for reload watching."""
        self.name: str = policy.metadata.name
        probes = [leaf.probe for leaf in compiled.leaves if leaf.probe is not None]
        self.hash: str = policy_hash(policy, library, probes)
        self.watched: Tensor = compiled.watched
        self.needs_recon_error: bool = compiled.needs_recon_error
        self.needs_resid: bool = compiled.needs_resid
        self.rules: tuple[RuleInfo, ...] = tuple(
            RuleInfo(
                id=r.id,
                description=r.description,
                severity=r.severity,
                category=r.category,
                scope=r.scope,
                enabled=r.enabled,
                actions=tuple(r.action_names),
                for_tokens=r.for_tokens,
            )
            for r in policy.rules
        )
        self.categories: tuple[str, ...] = tuple(dict.fromkeys(r.category for r in policy.rules))
        col_of = {int(lat): c for c, lat in enumerate(compiled.watched.tolist())}
        # The host side of a verdict, made once: the rule indices of each category, and per rule its
        # exceptions (their first column in a host row, past the R rule scores, and their names)
        # and its annotation text.
        n_r = len(compiled.rules)
        self._cat_rules = [[i for i, r in enumerate(compiled.rules) if r.category == cat] for cat in self.categories]
        self._rule_exc: list[tuple[int, tuple[str, ...]] | None] = []
        pos = n_r
        for r in compiled.rules:
            self._rule_exc.append((pos, tuple(e.name for e in r.exceptions)) if r.exceptions else None)
            pos += len(r.exceptions)
        self._rule_note = [
            f"{r.id}: {r.annotations.get('summary') or r.description or r.id}" if "annotate" in r.actions else None
            for r in compiled.rules
        ]
        self.reads_roles: bool = bool((compiled.leaf_scope != 0).any() or (compiled.rule_scope != 0).any())
        """Whether any rule or leaf is prompt- or completion-scoped (else a batch may come without
        roles: ``AuditBatch.is_completion`` None)."""
        self._ft_rules = torch.nonzero(compiled.rule_for_tokens > 0).flatten()
        self._has_exceptions = compiled.exc_node.numel() > 0
        # A `not` of leaves that saw no token scores high: rules are then zeroed where their scope
        # has no token. Without one, out-of-scope leaves score 0, and so do their rules.
        self._scope_guard = any(g.op == OP_NOT for g in compiled.groups)
        self._all_positive = bool((compiled.leaf_threshold > 0).all())
        # Which leaves take the mean, count tokens above `above` (count_above and fraction_above),
        # or divide that count by the tokens in scope; and whether any do (each adds a few
        # operations to an evaluation only when present).
        agg = compiled.leaf_agg
        self._leaf_mean = agg == AGGS.index("mean")
        self._leaf_counting = (agg == _COUNT_AGGS[0]) | (agg == _COUNT_AGGS[1])
        self._leaf_fraction = agg == _COUNT_AGGS[1]
        self._has_mean, self._has_count, self._has_fraction = (
            bool(m.any()) for m in (self._leaf_mean, self._leaf_counting, self._leaf_fraction)
        )
        self._rule_ids = [r.id for r in compiled.rules]
        self._rule_level = [2 if "block" in r.actions else 1 if "alert" in r.actions else 0 for r in compiled.rules]
        self._feature_probes, self._probe_max_pool = _stack_feature_probes(compiled, col_of)
        self._probe_bound = _probe_bound(self._feature_probes)
        self._value_columns, self._value_pad = self._value_layout()
        self._device_cache: dict[torch.device, dict[str, Any]] = {}
        # Through a weak reference: a bound method would make the engine a reference cycle, which
        # only the cyclic collector frees, and never once `auditor serve` has frozen the heap
        # (gc.freeze) with the engine in it: a reload would leak the engines it replaces, with
        # their CUDA graphs' memory. Without the cycle, the last reference's drop frees it.
        compute = weakref.WeakMethod(self._program_outputs)
        self._graphs = EvalGraphs(lambda values: compute()(values))  # type: ignore[misc]
        self._program: Callable[..., tuple[Tensor, ...]] | None = None  # compile_program's, made on first use
        self._program_failed = False

    @functools.cached_property
    def steering_engine(self) -> PolicyEngine | None:
        """This policy restricted to its enabled rules with ``steer`` actions (None when it has none).

        What generation must evaluate while decoding, to switch steering on as soon as such a
        rule matches; the other rules only decide the verdict, which needs one evaluation at
        the end. Same rule ids, macros, lists and library; compiled once, on first use.
        """
        rules = [r for r in self.policy.rules if r.enabled and r.steering]
        if not rules:
            return None
        if len(rules) == len(self.compiled.rules):
            return self
        sub = self.policy.model_copy(update={"rules": rules})
        base = Path(self.path).parent if self.path is not None else Path.cwd()
        compiled = compile_policy(sub, self.library, base_dir=base, path=self.path or "<policy>")
        engine = PolicyEngine(sub, self.library, compiled, path=self.path, sources=self.sources)
        engine.cuda_graphs, engine.compile_program = self.cuda_graphs, self.compile_program
        engine.host_program, engine.graph_max_tokens = self.host_program, self.graph_max_tokens
        return engine

    def __repr__(self) -> str:
        return f"PolicyEngine(name={self.name!r}, rules={len(self.compiled.rules)}, watched={self.watched.numel()})"

    def _tensors(self, device: torch.device) -> dict[str, Any]:
        cached = self._device_cache.get(device)
        if cached is None:
            c = self.compiled
            cached = {
                "value_columns": self._value_columns.to(device),
                "leaf_above": c.leaf_above.to(device),
                "leaf_threshold": c.leaf_threshold.to(device),
                "leaf_positive": (c.leaf_threshold > 0).to(device),
                "leaf_divisor": torch.where(c.leaf_threshold > 0, c.leaf_threshold, 1.0).to(device),
                "leaf_mean": self._leaf_mean.to(device),
                "leaf_counting": self._leaf_counting.to(device),
                "leaf_fraction": self._leaf_fraction.to(device),
                "leaf_scope": c.leaf_scope.to(device),
                "groups": [(g.op, g.out.to(device), g.children.to(device), g.children.reshape(-1).to(device)) for g in c.groups],
                # Scores of the nodes after the leaves before the program runs: const_true inf (neutral
                # for min), const_false and the internal nodes 0.
                "node_tail": torch.tensor(
                    [math.inf if i == c.const_true else 0.0 for i in range(len(c.leaves), c.n_nodes)], device=device
                ).unsqueeze(0),
                "rule_node": c.rule_node.to(device),
                "rule_scope": c.rule_scope.to(device),
                "rule_for_tokens": c.rule_for_tokens.to(device),
                "exc_node": c.exc_node.to(device),
                "exc_rule": c.exc_rule.to(device),
                "ft_rules": self._ft_rules.to(device),
                "feature_probes": (
                    {k: v.to(device) for k, v in self._feature_probes.items()} if self._feature_probes is not None else None
                ),
            }
            self._device_cache[device] = cached  # benign race: equal values either way
        return cached

    def _value_layout(self) -> tuple[Tensor, bool]:
        """Where each leaf's per-token values come from, ``[L * G]`` flat columns of the value matrix
        that :meth:`_token_values` builds (the watched latents, the reconstruction error if the policy
        reads it, the feature probes' probabilities if it has any, a ``-inf`` column if a leaf's group
        needs padding), and whether that padding column is there."""
        c = self.compiled
        n_feat = int(c.watched.numel())
        recon = int(c.needs_recon_error)
        fp = self._feature_probes
        n_units = int(fp["weight"].shape[1]) if fp is not None else 0
        pad = n_feat + recon + n_units
        cols = torch.where(c.leaf_columns == c.pad_column, pad, c.leaf_columns)  # the recon column keeps its place
        if fp is not None:
            cols[fp["leaves"], 0] = n_feat + recon + fp["unit"]  # a feature probe's per-token probability
        return cols.reshape(-1), bool((cols == pad).any())

    def _check(self, batch: AuditBatch) -> None:
        f = batch.features
        if f.dim() != 3:
            raise ValueError(f"features must be [B, T, F], got shape {tuple(f.shape)}")
        b, t, n = f.shape
        if n != self.watched.numel():
            raise ValueError(
                f"features has {n} columns but policy {self.name!r} watches {self.watched.numel()} latents; "
                "select full activations with acts[..., engine.watched]"
            )
        if batch.is_completion is None and self.reads_roles:
            raise ValueError(
                f"policy {self.name!r} has prompt- or completion-scoped rules: is_completion [B, T] is required"
            )
        for label, m in (("mask", batch.mask), ("is_completion", batch.is_completion), ("is_prompt", batch.is_prompt)):
            if m is not None and tuple(m.shape) != (b, t):
                raise ValueError(f"{label} must be [B, T] = {(b, t)}, got {tuple(m.shape)}")
        if self.needs_recon_error and (batch.recon_error is None or tuple(batch.recon_error.shape) != (b, t)):
            raise ValueError(f"policy {self.name!r} has anomaly rules: recon_error [B, T] = {(b, t)} is required")
        if self.needs_resid:
            r = batch.resid
            d_in = self.compiled.d_in
            if r is None or tuple(r.shape) != (b, t, d_in):
                raise ValueError(f"policy {self.name!r} has hookpoint probes: resid [B, T, {d_in}] is required")

    @_inference
    def evaluate(self, batch: AuditBatch) -> list[Verdict]:
        """One :class:`Verdict` per batch row (see the module docstring)."""
        return self.decide(batch).verdicts()

    @_inference
    def decide(self, batch: AuditBatch) -> PendingVerdicts:
        """:meth:`evaluate` in two halves: the device's work queued now, the verdicts built by
        :meth:`PendingVerdicts.verdicts` later.

        On a CUDA device nothing here waits for the GPU: the numbers the verdicts need are
        copied to the host behind the evaluation on the same stream, so a caller can queue more
        work (the next batch's forward) before it builds these verdicts, and the host's Python
        runs while the GPU computes. On a CPU the evaluation is done when this returns.
        """
        return self._pending(self._rule_tensors(batch), batch.tokens)

    def _pending(self, r: _RuleTensors | NativeRun, tokens: list[list[str]] | None) -> PendingVerdicts:
        # What every verdict needs (the rule scores and the exceptions' node scores) crosses to the
        # host in one copy and becomes Python numbers in one call; fired (score >= 1), matched and
        # category scores follow from them there. What only explanations need (values, per-token
        # holds) stays where it is until an explanation is read.
        if r.rows is not None:  # the host program's C twin's
            return PendingVerdicts(self, HostRows(r.rows), r, tokens)
        if isinstance(r.score, np.ndarray):  # the host program's
            return PendingVerdicts(self, HostRows(self._numpy.host_rows(r.nodes, r.score)), r, tokens)
        host = r.score
        if self._has_exceptions:
            host = torch.cat([host, r.nodes.index_select(1, self._tensors(host.device)["exc_node"])], dim=1)
        return PendingVerdicts(self, HostCopy(host), r, tokens)

    @torch.inference_mode()
    def warm_up(self, device: torch.device | str = "cpu", *, tokens: int = 512) -> None:
        """Evaluate empty batches of one and of two rows of ``tokens`` tokens on ``device``, so
        that what a first evaluation prepares (the policy's tensors there and, with
        :attr:`compile_program`, the compilations, tens of seconds each) happens now rather than
        on the first audits. Policies with hookpoint probes, which always run eagerly, are left
        as they are.

        The compiled program serves every length, but inductor tunes its kernels to the sizes it
        first sees: warmed up on 512-token rows, the decision of 32 x 512 tokens took 1.09 ms
        directly and 0.80 ms as a graph on an H100, against 1.36 and 0.89 ms warmed up on 16
        (``benchmarks/policy_graphs.py --warm-up-tokens 16,512``)."""
        if self.needs_resid:
            return
        dev = torch.device(device)
        for rows in (1, 2):
            # Separate mask tensors: passing one tensor twice would compile for that aliasing.
            mask, comp = (torch.zeros(rows, tokens, dtype=torch.bool, device=dev) for _ in range(2))
            recon = torch.zeros(rows, tokens, device=dev) if self.needs_recon_error else None
            self.matched(AuditBatch(torch.zeros(rows, tokens, self.watched.numel(), device=dev), mask, comp, recon_error=recon))

    @_inference
    def matched(self, batch: AuditBatch) -> Tensor:
        """Which rules matched, ``[B, R]`` bool in ``compiled.rules`` order, left on the batch's device.

        The same decision as :meth:`evaluate`'s ``Verdict.matches`` without building verdicts or
        copying anything to the host: on an accelerator nothing waits for the device, so a caller
        that only needs the decision (steering while decoding) keeps the GPU's queue full.
        """
        r = self._rule_tensors(batch)
        if isinstance(r.score, np.ndarray):  # the host program's
            return torch.from_numpy(self._numpy.matched(r.nodes, r.score))  # type: ignore[arg-type]
        return self._matched(self._tensors(r.score.device), r.nodes, r.score)

    def _rule_tensors(self, batch: AuditBatch) -> _RuleTensors | NativeRun:
        """Every node's and rule's score (and what explanations need), on the batch's device."""
        feats, mask, comp, prompt, recon, resid = self._inputs(batch, roles=False)
        if feats.shape[1] == 0:
            # Empty texts: one masked-out token keeps every reduction defined; nothing is in scope.
            bsz = feats.shape[0]
            feats, mask = feats.new_zeros(bsz, 1, feats.shape[2]), mask.new_zeros(bsz, 1)
            comp, prompt = mask.new_zeros(bsz, 1), mask.new_zeros(bsz, 1)
            recon = feats.new_zeros(bsz, 1) if recon is not None else None
            resid = feats.new_zeros(bsz, 1, resid.shape[2]) if resid is not None else None
        if (
            self.host_program and resid is None and feats.device.type == "cpu"
            and not feats.requires_grad and (recon is None or not recon.requires_grad) and not self._compiles
        ):
            # The C twin's run, whose parts are CPU tensors; or NumPy arrays over the same memory
            # (see _host), which _pending and matched read as such, for a small batch. A batch
            # without roles (a policy that reads none) needs no role masks there.
            out = self._numpy.run(feats, mask, comp, prompt, recon, numpy=feats.numel() <= HOST_MAX_ELEMENTS)
            if out is not None:
                return out if isinstance(out, NativeRun) else _RuleTensors(*out)
        if comp is None:
            comp, prompt = _no_roles(mask)
        if feats.is_cuda and self.cuda_graphs and not self.needs_resid:
            # Hookpoint probes (resid) run their own modules: those policies stay eager. A compiled
            # program's graphs keep less memory a token, so they may be larger.
            self._graphs.max_tokens = self.graph_max_tokens or (MAX_TOKENS_COMPILED if self._compiles else MAX_TOKENS)
            out = self._graphs.run((feats, mask, comp, prompt, recon))
            if out is not None:
                nodes, rscore, value, fired, tok = out
                return _RuleTensors(nodes, rscore, value, fired, _KnownHolds(tok))
        if self._compiles and resid is None:
            nodes, rscore, value, fired, tok = self._program_outputs((feats, mask, comp, prompt, recon))
            return _RuleTensors(nodes, rscore, value, fired, _KnownHolds(tok))
        return self._compute(feats, mask, comp, prompt, recon, resid)

    def _compute(
        self, feats: Tensor, mask: Tensor, comp: Tensor, prompt: Tensor, recon: Tensor | None, resid: Tensor | None
    ) -> _RuleTensors:
        k = self._tensors(feats.device)
        scope_masks = _scope_masks(mask, prompt, comp)  # [B, T, 3]
        n_scope = scope_masks.sum(1)  # [B, 3]

        value, score, fired, holds = self._leaves(k, feats, recon, resid, scope_masks, n_scope)
        scores, tok_nodes = self._nodes(k, score, holds)
        run = _longest_run(self._held_runs(k, tok_nodes, scope_masks)) if tok_nodes is not None else None
        return _RuleTensors(scores, self._rule_scores(k, scores, n_scope, run), value, fired, holds)

    @functools.cached_property
    def _numpy(self) -> HostProgram:
        """The program's NumPy twin (:attr:`host_program`), made on first use."""
        return HostProgram(self)

    def _graph_outputs(self, values: tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]) -> tuple[Tensor, ...]:
        """What a captured evaluation writes: the rule tensors, per-token holds included."""
        r = self._compute(*values, None)
        return r.nodes, r.score, r.leaf_value, r.leaf_fired, r.holds.get()

    @property
    def _compiles(self) -> bool:
        """Whether evaluations run the compiled program: asked for, and its compilation has not failed."""
        return bool(self.compile_program) and not self._program_failed

    def _program_outputs(self, values: tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]) -> tuple[Tensor, ...]:
        """:meth:`_graph_outputs`, compiled when :attr:`compile_program` asks (eager once that failed)."""
        if self._compiles:
            if self._program is None:
                backend = "inductor" if self.compile_program is True else self.compile_program
                # Dynamic shapes: one compilation serves every batch size and length (a row count of
                # 1 is specialized, so two in all; one token is padded to two), not one per shape up to dynamo's limit.
                # Its own copy of the method's code: dynamo keeps compiled entries, and its limit of
                # recompilations (8), per code object, which engines would otherwise share.
                fn = PolicyEngine._graph_outputs
                own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
                self._program = torch.compile(types.MethodType(own, self), backend=backend, dynamic=True, fullgraph=True)
            self._tensors(values[0].device)  # made outside: made inside, its cache filling would recompile
            # Inputs as inference-mode tensors (what graphs' buffers and most callers' tensors are):
            # dynamo guards on the kind, and would compile again for the other.
            values = tuple(x if x is None or x.is_inference() else x.clone() for x in values)  # type: ignore[assignment]
            # The watched features are fixed per engine; rows and tokens vary. No duck sizing: a
            # batch whose row count happens to equal its token count would otherwise compile a
            # graph for that coincidence (and the next one for its end).
            # One token would be specialized too: another compilation (tens of seconds) on the first
            # audit of one-token (or empty) texts, after warm_up. A second, masked token changes nothing.
            tokens = values[0].shape[1]
            if tokens == 1:
                values = tuple(None if x is None else torch.cat([x, torch.zeros_like(x)], 1) for x in values)  # type: ignore[assignment]
            torch._dynamo.mark_static(values[0], 2)
            try:
                with fx_config.patch(use_duck_shape=False):
                    out = self._program(values)
                return out if tokens != 1 else tuple(o[:, :1] if o.dim() == 3 else o for o in out)
            except torch.OutOfMemoryError:
                raise  # this batch is too large (eagerly too, with more intermediate tensors); the program is fine
            except Exception as exc:  # noqa: BLE001 - a compiler missing or failing: evaluate eagerly
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                self._program_failed = True
                cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc  # the compiler's, not dynamo's wrapper
                detail = next((line for line in str(cause).splitlines() if line.strip()), "")
                _log.warning("policy %r: its evaluation cannot be compiled (%s: %s); evaluating it eagerly",
                             self.name, type(cause).__name__, detail)
        return self._graph_outputs(values)

    def _inputs(self, batch: AuditBatch, roles: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """The batch checked and converted: features, mask, completion, prompt, recon error, resid.

        A batch without roles (``is_completion`` None, for a policy that reads none) has no
        prompt or completion token: two all-False masks, or None for both with ``roles=False``."""
        self._check(batch)
        feats = _as(batch.features, None, torch.float32)  # [B, T, F]
        dev = feats.device
        mask = _as(batch.mask, dev, torch.bool)
        recon = _as(batch.recon_error, dev, torch.float32) if batch.recon_error is not None else None
        resid = _as(batch.resid, dev, torch.float32) if batch.resid is not None else None
        if batch.is_completion is not None:
            comp = _as(batch.is_completion, dev, torch.bool)
            prompt = ~comp if batch.is_prompt is None else _as(batch.is_prompt, dev, torch.bool)
        elif roles:
            comp, prompt = _no_roles(mask)
        else:
            comp = prompt = None  # type: ignore[assignment]
        return feats, mask, comp, prompt, recon, resid

    @staticmethod
    def _held_runs(k: dict[str, Any], tok_nodes: Tensor, scope_masks: Tensor) -> Tensor:
        """Per token, whether each ``for_tokens`` rule's condition held in its scope: ``[B, T, Rf]``."""
        ft = k["ft_rules"]
        return tok_nodes[:, :, k["rule_node"][ft]] & scope_masks[:, :, k["rule_scope"][ft]]

    def _rule_scores(self, k: dict[str, Any], scores: Tensor, n_scope: Tensor, run: Tensor | None) -> Tensor:
        """Rule scores ``[B, R]`` from the node program's scores ``[B, N]``; ``run [B, Rf]`` is each
        ``for_tokens`` rule's longest run of held tokens. A rule fired when its score is >= 1."""
        rscore = scores.index_select(1, k["rule_node"])  # [B, R]
        if run is not None:
            ft = k["ft_rules"]
            need = k["rule_for_tokens"][ft]  # [Rf]
            run_score = _consistent(run.to(torch.float32) / need.to(torch.float32), run >= need)
            rscore[:, ft] = torch.minimum(rscore[:, ft], run_score)  # >= 1: the condition and the run
        if not self._scope_guard:
            return rscore  # without `not`, a rule with no token in scope scores 0 already (its leaves do)
        return torch.where(n_scope.index_select(1, k["rule_scope"]) > 0, rscore, 0.0)  # no token in scope: 0

    def _matched(self, k: dict[str, Any], scores: Tensor, rscore: Tensor) -> Tensor:
        """Which rules matched ``[B, R]``: fired (``rscore >= 1``) and no exception's node fired."""
        rfired = rscore >= 1.0
        if not self._has_exceptions:
            return rfired
        exc_fired = scores.index_select(1, k["exc_node"]) >= 1.0  # [B, E]
        excepted = torch.zeros_like(rscore).index_add_(1, k["exc_rule"], exc_fired.to(rscore.dtype)) > 0
        return rfired & ~excepted

    def incremental(self, batch_size: int, device: torch.device | str = "cpu") -> IncrementalMatcher | None:
        """A :class:`IncrementalMatcher` for ``batch_size`` sequences that grow chunk by chunk, or
        None when the policy has hookpoint probes (their pooled inputs are not kept)."""
        if self.needs_resid:
            return None
        return IncrementalMatcher(self, batch_size, torch.device(device))

    def _leaves(
        self,
        k: dict[str, Any],
        feats: Tensor,
        recon: Tensor | None,
        resid: Tensor | None,
        scope_masks: Tensor,
        n_scope: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, _TokenHolds]:
        """Aggregated value ``[B, L]``, score ``[B, L]``, fired ``[B, L]`` and (lazily) per-token holds ``[B, T, L]``."""
        c = self.compiled
        vals, leaf_mask, logit, pin = self._token_values(k, feats, recon, scope_masks)
        n = n_scope.index_select(1, k["leaf_scope"])  # [B, L]
        value = self._aggregate(k, *self._partials(k, vals, leaf_mask), n)  # [B, L]
        fp = k["feature_probes"]
        if fp is not None and logit is not None and pin is not None:
            sm = scope_masks.transpose(1, 2).to(feats.dtype)  # [B, 3, T]
            top = self._scope_max(pin, sm) if self._probe_max_pool else None
            value[:, fp["leaves"]] = self._probe_pool(fp, torch.bmm(sm, logit), n_scope, top)
        for i in c.probe_leaves:
            probe = c.leaves[i].probe
            if probe is None or probe.inputs != "hookpoint" or resid is None:
                continue  # feature probes ran above; _check insists on resid for hookpoint probes
            vals[:, :, i] = probe.decision(resid)
            value[:, i] = probe.decision(probe.pool_inputs(resid, leaf_mask[:, :, i]))
        value, score, fired = self._leaf_decisions(k, value, n)
        return value, score, fired, _TokenHolds(vals, k["leaf_above"], leaf_mask, k["leaf_counting"], k["leaf_threshold"])

    def _token_values(
        self, k: dict[str, Any], feats: Tensor, recon: Tensor | None, scope_masks: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Per-token leaf values ``[B, T, L]`` (feature probes: their per-token probability), which
        tokens each leaf sees ``[B, T, L]``, the feature probes' per-token logits ``[B, T, U]`` and
        the features as they read them (:meth:`_probe_input`)."""
        bsz, t, _ = feats.shape
        parts = [feats]  # [B, T, F + ...]: the value matrix, columns as in _value_layout
        if self.compiled.needs_recon_error:
            assert recon is not None  # _check insists on it
            parts.append(recon.unsqueeze(-1))
        fp = k["feature_probes"]
        logit = pin = None
        if fp is not None:
            # All feature-input probes at once: per-token logits and probabilities.
            pin = self._probe_input(feats)
            logit = pin @ fp["weight"] + fp["bias"]  # [B, T, U]
            parts.append(torch.sigmoid(logit))
        if self._value_pad:
            parts.append(feats.new_full((bsz, t, 1), float("-inf")))
        vals = (torch.cat(parts, dim=-1) if len(parts) > 1 else feats).index_select(2, k["value_columns"])  # [B, T, L * G]
        n_leaves, width = self.compiled.leaf_columns.shape
        if width > 1:
            vals = vals.view(bsz, t, n_leaves, width).amax(-1)  # [B, T, L]: max over each leaf's group
        return vals, scope_masks.index_select(2, k["leaf_scope"]), logit, pin

    def _probe_input(self, feats: Tensor) -> Tensor:
        """The features as the feature probes read them: NaN as 0, anything beyond +-``_probe_bound``
        (+-inf, or a huge finite value) as +-``_probe_bound``.

        The probes' weights are one matrix with zeros for the features a probe does not read, and
        pooling multiplies out-of-scope tokens by 0: a non-finite feature taken as it is would make
        0 x inf = NaN there, and every probe's value NaN (counted as 0), also the probes that do not
        read it. Read this way, a probe depends on its own features only, a read +-inf still
        saturates its probability, and a read NaN counts as 0. Finite values past the bound are
        clamped too: two of 3e38 summed over tokens (the NumPy program sums a scope's features
        before the product) or two tokens' logits of opposite signs would overflow all the same."""
        return torch.nan_to_num(feats, nan=0.0).clamp(-self._probe_bound, self._probe_bound)

    def _partials(self, k: dict[str, Any], vals: Tensor, leaf_mask: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """What the aggregations need from some tokens, each adding up over more tokens, ``[B, L]``
        each: every leaf's max, and when the policy has such leaves its sum (for ``mean``) and its
        count of tokens above ``above`` (for ``count_above`` / ``fraction_above``), else None. The
        sum and the count are taken over every leaf, a few cheap operations on small tensors
        where picking the leaves that need them out and back would be more; the others' are unused."""
        vmax = torch.where(leaf_mask, vals, float("-inf")).amax(1)
        vsum = torch.where(leaf_mask, vals, 0.0).sum(1) if self._has_mean else None
        vcount = ((vals > k["leaf_above"]) & leaf_mask).sum(1, dtype=torch.float32) if self._has_count else None
        return vmax, vsum, vcount

    def _aggregate(self, k: dict[str, Any], vmax: Tensor, vsum: Tensor | None, vcount: Tensor | None, n: Tensor) -> Tensor:
        """Each leaf's aggregated value ``[B, L]`` from :meth:`_partials` over its ``n [B, L]`` tokens in
        scope (``vmax`` itself when every leaf takes the max, so the caller hands it over)."""
        value = vmax
        if vsum is None and not self._has_fraction:
            return value if vcount is None else torch.where(k["leaf_counting"], vcount, value)
        nf = n.clamp(min=1).to(torch.float32)
        if vsum is not None:
            value = torch.where(k["leaf_mean"], vsum / nf, value)
        if vcount is not None:
            if self._has_fraction:
                vcount = torch.where(k["leaf_fraction"], vcount / nf, vcount)
            value = torch.where(k["leaf_counting"], vcount, value)
        return value

    @staticmethod
    def _scope_max(feats: Tensor, sm: Tensor) -> Tensor:
        """Each scope's elementwise max of the features ``[B, 3, F]`` (-inf for a scope with no token)."""
        return feats.unsqueeze(1).masked_fill(sm.unsqueeze(-1) == 0, -math.inf).amax(2)

    def _probe_pool(self, fp: dict[str, Tensor], logit_sum: Tensor, n_scope: Tensor, top: Tensor | None) -> Tensor:
        """Pooled probabilities of the feature-probe leaves ``[B, n]`` from each scope's sum of token
        logits ``[B, 3, U]`` and (max pooling) its feature max ``[B, 3, F]``."""
        counts = n_scope.unsqueeze(-1).clamp(min=1).to(logit_sum.dtype)  # [B, 3, 1]
        # The model is linear: the logit of the mean input is the mean of the token logits
        # (for a scope with no token the leaf is 0 anyway).
        logits = logit_sum / counts  # [B, 3, U]
        if top is not None:
            top = torch.where(n_scope.unsqueeze(-1) > 0, top, 0.0)
            logits = torch.stack([logits, top @ fp["weight"] + fp["bias"]], 1)  # [B, 2 (mean, max), 3, U]
        # Without max pooling every index is in the mean half, which is all there is.
        # flatten, not reshape(bsz, -1): the -1 is ambiguous for a batch of no rows.
        return torch.sigmoid(logits.flatten(1).index_select(1, fp["pooled_index"]))

    def _leaf_decisions(self, k: dict[str, Any], value: Tensor, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Aggregated leaf values ``[B, L]`` (with ``n [B, L]`` tokens in scope) -> value, score, fired.

        A NaN value (broken activations) counts as 0: the leaf does not fire and scores 0, so every
        score stays a number and ``score >= 1`` stays the node's decision."""
        value = torch.nan_to_num(value, nan=0.0, posinf=math.inf, neginf=-math.inf).masked_fill_(n == 0, 0.0)
        thr = k["leaf_threshold"]
        if self._all_positive:
            fired = value >= thr  # a value out of scope is 0, below every threshold
            score = value / thr
        else:
            fired = (value >= thr) & (n > 0)
            score = torch.where(
                k["leaf_positive"],
                value / k["leaf_divisor"],
                fired.to(torch.float32) * NOT_SCORE_CAP,  # a threshold <= 0 fires on anything in scope
            )
        return value, _consistent(score, fired), fired

    def _nodes(self, k: dict[str, Any], score: Tensor, holds: _TokenHolds) -> tuple[Tensor, Tensor | None]:
        """Run the node program: scores ``[B, N]``, and per-token holds ``[B, T, N]`` when needed.

        A node fires exactly when its score is >= 1 (the leaves' scores are made consistent with
        their decisions, and min, max and the capped ``not`` keep that), so the program runs on
        scores alone and callers read ``fired`` as ``score >= 1``.
        """
        c = self.compiled
        bsz, t, n_leaves = holds.vals.shape
        scores = torch.cat([score, k["node_tail"].expand(bsz, -1)], dim=1)  # [B, N]
        tok_nodes = None
        if self._ft_rules.numel() > 0:
            # Per-token truth is only needed for for_tokens rules' run lengths.
            tok_nodes = torch.zeros(bsz, t, c.n_nodes, dtype=torch.bool, device=score.device)
            tok_nodes[:, :, :n_leaves] = holds.get()
            tok_nodes[:, :, c.const_true] = True
        for op, out, children, flat in k["groups"]:
            cs = scores.index_select(1, flat).view(bsz, *children.shape)  # [B, n, c]
            if op == OP_ALL:
                scores[:, out] = cs.amin(-1)
            elif op == OP_ANY:
                scores[:, out] = cs.amax(-1)
            else:
                child = cs[..., 0]
                inv = torch.where(child > 0, 1.0 / child, NOT_SCORE_CAP)
                scores[:, out] = _consistent(inv.clamp(max=NOT_SCORE_CAP), child < 1.0)
            if tok_nodes is not None:
                ct = tok_nodes.index_select(2, flat).view(bsz, t, *children.shape)  # [B, T, n, c]
                if op == OP_ALL:
                    tok_nodes[:, :, out] = ct.all(-1)
                elif op == OP_ANY:
                    tok_nodes[:, :, out] = ct.any(-1)
                else:
                    tok_nodes[:, :, out] = ~ct[..., 0]
        return scores, tok_nodes

    def _verdicts(
        self,
        rows: list[list[float]],
        r: _RuleTensors | NativeRun,
        tokens: list[list[str]] | None,
        ready: torch.cuda.Event | None = None,
    ) -> list[Verdict]:
        """Verdicts from each row's host numbers: the ``R`` rule scores, then each exception's node
        score (a row may go on; the rest is not read); the rest of ``r`` stays on the device for
        explanations, read only when a rule matched (``ready``: recorded behind the evaluation on
        a CUDA stream)."""
        c = self.compiled
        n_r = len(c.rules)
        rule_exc, cat_rules = self._rule_exc, self._cat_rules
        hits: list[list[int]] = []
        held: list[dict[int, str]] = []  # rule -> the exception that suppressed it
        for row in rows:
            hit: list[int] = []
            excepted: dict[int, str] = {}
            for r_i in [i for i, score in enumerate(row[:n_r]) if score >= 1.0]:
                exc = rule_exc[r_i]
                name = next((n for j, n in enumerate(exc[1]) if row[exc[0] + j] >= 1.0), None) if exc else None
                if name is None:
                    hit.append(r_i)
                else:
                    excepted[r_i] = name
            hits.append(hit)
            held.append(excepted)
        matched_rules = sorted({r_i for hit in hits for r_i in hit})
        detail = _BatchDetail(c, r, tokens, matched_rules, ready) if matched_rules else None
        verdicts: list[Verdict] = []
        for b, row in enumerate(rows):
            matches: list[RuleMatch] = []
            annotations: list[str] = []
            steering: list[SteerAction] = []
            level = 0
            for r_i in hits[b]:
                rule = c.rules[r_i]
                # Positional, in RuleMatch's field order (keywords cost as much as the rest of the
                # object here; a batch can hold thousands of matches). Each match has its own copies.
                matches.append(
                    RuleMatch(
                        rule.id, rule.description, rule.severity, rule.category, list(rule.actions), row[r_i],
                        dict(rule.labels), dict(rule.annotations),
                        functools.partial(detail.explain, b, r_i),  # type: ignore[union-attr]
                    )
                )
                if self._rule_level[r_i] > level:
                    level = self._rule_level[r_i]
                if self._rule_note[r_i] is not None:
                    annotations.append(self._rule_note[r_i])  # type: ignore[arg-type]
                if rule.steering:
                    steering.extend(
                        SteerAction(st.feature, st.index, st.mode, st.value, rule.id)  # type: ignore[arg-type]
                        for st in rule.steering
                    )
            # Each category's score: its highest rule score, 0 at least.
            cat_scores = {}
            for cat, idx in zip(self.categories, cat_rules):
                top = max(map(row.__getitem__, idx), default=0.0)  # a category of disabled rules only: 0
                cat_scores[cat] = top if top > 0.0 else 0.0
            verdicts.append(
                Verdict(
                    action=_LEVEL_ACTIONS[level],
                    matches=matches,
                    scores=dict(zip(self._rule_ids, row)),
                    category_scores=cat_scores,
                    annotations=annotations,
                    steering=steering,
                    suppressed={c.rules[r_i].id: name for r_i, name in held[b].items()},
                )
            )
        return verdicts


_LEVEL_ACTIONS: tuple[Literal["allow", "alert", "block"], ...] = ("allow", "alert", "block")


class IncrementalMatcher:
    """:meth:`PolicyEngine.matched` for sequences that grow chunk by chunk, at a cost per chunk that
    does not grow with the sequence.

    Feed each chunk's new positions only (:meth:`update`, an :class:`AuditBatch` of ``[B, t]``);
    it returns which rules match on everything fed so far, the same decision as ``matched`` on the
    concatenated sequence. What the aggregations need is kept per row and leaf: the running max,
    the sum (``mean``), the count (``count_above`` / ``fraction_above``), the tokens in each scope,
    each scope's sum of feature-probe logits and (max pooling) its feature max, and each
    ``for_tokens`` rule's current and longest run. Means and probe logits are sums in a different
    order than one full evaluation, so a value within float rounding of its threshold may decide
    differently; max, counts and runs are exact. Everything stays on the device, and the running
    state is updated in place (the same tensors for the matcher's life), so a captured CUDA graph
    of an update stays valid; :meth:`update` returns the matcher's own decision tensor.
    """

    def __init__(self, engine: PolicyEngine, batch_size: int, device: torch.device) -> None:
        c = engine.compiled
        self.engine = engine
        self._k = k = engine._tensors(device)
        n_leaves = len(c.leaves)
        b = batch_size
        self.n_scope = torch.zeros(b, 3, dtype=torch.long, device=device)
        self.vmax = torch.full((b, n_leaves), float("-inf"), device=device)
        self.vsum = torch.zeros(b, n_leaves, device=device) if engine._has_mean else None
        self.vcount = torch.zeros(b, n_leaves, device=device) if engine._has_count else None
        fp = k["feature_probes"]
        self.logit_sum = torch.zeros(b, 3, int(fp["weight"].shape[1]), device=device) if fp is not None else None
        n_feat = int(engine.watched.numel())
        self.feat_max = (
            torch.full((b, 3, n_feat), float("-inf"), device=device) if fp is not None and engine._probe_max_pool else None
        )
        n_ft = int(k["ft_rules"].numel())
        self.run_now = torch.zeros(b, n_ft, dtype=torch.long, device=device)
        self.run_best = torch.zeros(b, n_ft, dtype=torch.long, device=device)
        self._last = torch.zeros(b, len(c.rules), dtype=torch.bool, device=device)

    @torch.inference_mode()
    def update(self, chunk: AuditBatch, *, decide: bool = True) -> Tensor:
        """Add ``chunk``'s positions; return ``[B, R]`` bool, which rules match on all fed so far.

        ``decide=False`` only records the chunk (a fraction of the work) and returns the last
        decision; policies with ``for_tokens`` rules always decide (their runs need it).
        """
        engine, k = self.engine, self._k
        feats, mask, comp, prompt, recon, _resid = engine._inputs(chunk)
        if feats.shape[1] == 0:
            return self._last  # nothing new: the decision stands
        scope_masks = _scope_masks(mask, prompt, comp)  # [B, t, 3]
        self.n_scope += scope_masks.sum(1)
        vals, leaf_mask, logit, pin = engine._token_values(k, feats, recon, scope_masks)
        vmax, vsum, vcount = engine._partials(k, vals, leaf_mask)
        torch.maximum(self.vmax, vmax, out=self.vmax)
        if self.vsum is not None and vsum is not None:
            self.vsum += vsum
        if self.vcount is not None and vcount is not None:
            self.vcount += vcount
        sm = scope_masks.transpose(1, 2).to(feats.dtype)  # [B, 3, t]
        if self.logit_sum is not None and logit is not None:
            self.logit_sum += torch.bmm(sm, logit)
        if self.feat_max is not None and pin is not None:
            torch.maximum(self.feat_max, engine._scope_max(pin, sm), out=self.feat_max)
        if not decide and not self.run_now.shape[1]:
            return self._last

        n = self.n_scope.index_select(1, k["leaf_scope"])  # [B, L]
        value = engine._aggregate(k, self.vmax.clone(), self.vsum, self.vcount, n)
        fp = k["feature_probes"]
        if fp is not None and self.logit_sum is not None:
            value[:, fp["leaves"]] = engine._probe_pool(fp, self.logit_sum, self.n_scope, self.feat_max)
        value, score, _ = engine._leaf_decisions(k, value, n)
        holds = _TokenHolds(vals, k["leaf_above"], leaf_mask, k["leaf_counting"], k["leaf_threshold"])
        scores, tok_nodes = engine._nodes(k, score, holds)  # per-token truth of this chunk only
        run = None
        if tok_nodes is not None:
            run = self._runs(engine._held_runs(k, tok_nodes, scope_masks))
        self._last.copy_(engine._matched(k, scores, engine._rule_scores(k, scores, self.n_scope, run)))
        return self._last

    def _runs(self, held: Tensor) -> Tensor:
        """Carry each ``for_tokens`` rule's run through ``held [B, t, Rf]``; the longest so far ``[B, Rf]``."""
        t = held.shape[1]
        if t:
            pos = torch.arange(t, device=held.device).view(1, t, 1)
            last_false = torch.where(held, torch.full_like(pos, -1), pos).cummax(dim=1).values  # [B, t, Rf]
            run = torch.where(held, pos - last_false, torch.zeros_like(pos))
            # Held since the chunk began: the run that was going on goes on.
            run = run + torch.where(held & (last_false < 0), self.run_now.unsqueeze(1), torch.zeros_like(run))
            torch.maximum(self.run_best, run.amax(1), out=self.run_best)
            self.run_now.copy_(run[:, -1])
        return self.run_best


class _RuleTensors(NamedTuple):
    """One evaluation's results on the batch's device (``[B, R]`` unless noted): NumPy arrays when
    the host program (:attr:`PolicyEngine.host_program`) computed them, CPU tensors when its C
    twin did, with holds of their own."""

    nodes: Tensor
    """``[B, N]`` every node's score (exceptions read theirs)."""
    score: Tensor
    """The rule's score: its condition held (before exceptions) where it is >= 1."""
    leaf_value: Tensor
    """``[B, L]`` aggregated leaf values (for explanations)."""
    leaf_fired: Tensor
    """``[B, L]``."""
    holds: _TokenHolds | _KnownHolds
    rows: Tensor | None = None
    """What every verdict needs (:meth:`PolicyEngine._pending`), where the program has made it."""


class _TokenHolds:
    """Where each leaf held, per token (``[B, T, L]`` bool), computed on first use: only
    ``for_tokens`` rules and explanations need it."""

    def __init__(self, vals: Tensor, above: Tensor, leaf_mask: Tensor, counting: Tensor, threshold: Tensor) -> None:
        self.vals, self._above, self._mask, self._counting, self._thr = vals, above, leaf_mask, counting, threshold
        self._tok: Tensor | None = None

    def get(self) -> Tensor:
        if self._tok is None:
            # count_above / fraction_above leaves hold where v > above; the others where v >= threshold.
            self._tok = torch.where(self._counting, self.vals > self._above, self.vals >= self._thr) & self._mask
        return self._tok


class _KnownHolds:
    """Per-token holds already computed (by a CUDA graph replay)."""

    def __init__(self, tok: Tensor) -> None:
        self._tok = tok

    def get(self) -> Tensor:
        return self._tok


class PendingVerdicts:
    """An evaluation queued by :meth:`PolicyEngine.decide`; :meth:`verdicts` builds its verdicts
    (once; later calls return the same list)."""

    def __init__(self, engine: PolicyEngine, host: HostCopy | HostRows, r: _RuleTensors | NativeRun, tokens: list[list[str]] | None) -> None:
        self._engine, self._host, self._r, self._tokens = engine, host, r, tokens
        self._verdicts: list[Verdict] | None = None
        self._lock = threading.Lock()  # callers in several threads: one builds, the others wait

    @property
    def ready(self) -> torch.cuda.Event | None:
        """The CUDA event recorded after the evaluation's numbers were copied out (None off CUDA)."""
        return self._host.ready

    def verdicts(self) -> list[Verdict]:
        """One :class:`Verdict` per batch row; waits for this evaluation's numbers to reach the host."""
        with self._lock:
            if self._verdicts is None:
                r = self._r
                rows = self._host.get().tolist()
                self._verdicts = self._engine._verdicts(rows, r, self._tokens, self._host.ready)
                del self._r
        return self._verdicts


class _BatchDetail:
    """What explanations of one evaluated batch need, left where it was computed until the first
    explanation is asked for (then copied to the host once)."""

    def __init__(
        self,
        compiled: CompiledPolicy,
        r: _RuleTensors | NativeRun,
        tokens: list[list[str]] | None,
        matched_rules: list[int],
        ready: torch.cuda.Event | None = None,
    ) -> None:
        self.compiled = compiled
        self._device = r  # its leaf values, decisions and holds moved to the host on first use
        self._ready = ready
        self._lock = threading.Lock()
        self._host: tuple[list[list[float]], list[list[bool]], Tensor] | None = None
        self.tokens, self.matched_rules = tokens, matched_rules
        self._spans: dict[tuple[int, int], list[tuple[int, int]]] | None = None

    def host(self) -> tuple[list[list[float]], list[list[bool]], Tensor]:
        with self._lock:  # explanations of one batch may be read in several threads
            if self._host is None:
                value, fired, tok = self._device.leaf_value, self._device.leaf_fired, self._device.holds
                if self._ready is None or not value.is_cuda:
                    # (NumPy arrays from the host program: as tensors over the same memory.)
                    self._host = (value.tolist(), fired.tolist(), torch.as_tensor(tok.get()).cpu())
                else:
                    # Read later (a server answering), when the stream may hold the next batch's
                    # forward: the copies wait for this evaluation only, on a stream of their own.
                    # A high-priority one: CUDA graphs are captured on streams of the other pool,
                    # and work put on a stream while it is being captured would join the graph.
                    side = torch.cuda.Stream(value.device, priority=-1)
                    side.wait_event(self._ready)
                    with torch.cuda.stream(side), torch.inference_mode():
                        held = tok.get()
                        copies = [t.to("cpu", non_blocking=True) for t in (value, fired, held)]
                    side.synchronize()
                    self._host = (copies[0].tolist(), copies[1].tolist(), copies[2])
                self._device = None  # type: ignore[assignment]
            return self._host

    def spans(self) -> dict[tuple[int, int], list[tuple[int, int]]]:
        if self._spans is None:
            # Spans only for leaves that a matched rule explains: [B, T, L'] -> keyed by the original leaf index.
            c = self.compiled
            needed = sorted({li for r_i in self.matched_rules for li in c.rules[r_i].leaves})
            found = _spans(self.host()[2][:, :, needed]) if needed else {}
            self._spans = {(b, needed[j]): v for (b, j), v in found.items()}
        return self._spans

    def explain(self, b: int, r_i: int) -> list[LeafExplanation]:
        c = self.compiled
        spans = self.spans()
        values, fired = self.host()[0][b], self.host()[1][b]
        out = []
        for li in c.rules[r_i].leaves:
            leaf = c.leaves[li]
            leaf_spans = spans.get((b, li), [])
            texts = ["".join(self.tokens[b][i:j]) for i, j in leaf_spans] if self.tokens is not None else []
            out.append(
                LeafExplanation(
                    kind=leaf.kind,
                    name=leaf.name,
                    agg=leaf.agg,
                    value=values[li],
                    threshold=leaf.threshold,
                    fired=fired[li],
                    token_spans=leaf_spans,
                    above=leaf.above,
                    span_texts=texts,
                )
            )
        return out


def build_engine(policy: s.Policy, library: FeatureLibrary, *, path: str | Path, base_dir: str | Path | None = None) -> PolicyEngine:
    """Compile an already-parsed policy into an engine (probe paths resolve against ``base_dir``)."""
    p = Path(path)
    compiled = compile_policy(policy, library, base_dir=base_dir if base_dir is not None else p.parent, path=str(p))
    sources = [p.resolve()]
    if library.path is not None:
        sources.append(library.path)
    sources.extend(Path(leaf.probe_key) for leaf in compiled.leaves if leaf.probe_key is not None)
    return PolicyEngine(policy, library, compiled, path=str(p), sources=tuple(dict.fromkeys(sources)))


def load_policy(
    path: str | Path,
    *,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> PolicyEngine:
    """Parse, validate and compile one policy file.

    Raises :class:`PolicyErrors` listing every problem (YAML, schema, library
    references, probe files), each located by file and, where known, line.
    ``search_dirs`` / ``env`` are passed to the library lookup; relative paths
    resolve against ``base_dir``, by default the file's folder.
    """
    from auditor.policy.loader import parse_policy_file

    policy, library = parse_policy_file(path, search_dirs=search_dirs, env=env, base_dir=base_dir)
    return build_engine(policy, library, path=path, base_dir=base_dir)


def validate_files(
    paths: Iterable[str | os.PathLike[str]],
    *,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> list[PolicyError]:
    """Every problem :func:`load_policy` would raise for ``paths`` (empty when all load).

    The loader's checks (with file:line:column positions, duplicate policy names)
    plus the few that only compilation finds.
    """
    from auditor.policy.loader import validate_files as check_files

    paths = [os.fspath(p) for p in paths]
    errors = check_files(paths, search_dirs=search_dirs, env=env, base_dir=base_dir)
    failed = {e.path for e in errors}
    for path in paths:
        if path in failed:
            continue
        try:
            load_policy(path, search_dirs=search_dirs, env=env, base_dir=base_dir)
        except PolicyErrors as exc:
            errors.extend(exc.errors)
        except AuditorError as exc:
            errors.append(PolicyError(path, None, None, exc.message))
    return errors
