"""Compile a validated policy (plus its feature library) into tensors, once per load.

Every leaf of every enabled rule (macros expanded, with the rule's scope) becomes
one column of a ``[B, T, L]`` per-token value tensor; its aggregation, per-token
level and threshold become entries of ``[L]`` vectors. Condition trees become a
small node program: nodes grouped by depth and operator, each group evaluated
with a gather over its children, so a batch costs a few tensor ops per tree
level, never a Python loop over tokens or rows.

Leaf semantics (what :mod:`auditor.policy.engine` computes):

- per-token value ``v[t]``: a feature (or the max over a group of features), the
  relative reconstruction error (anomaly), or the probe's per-token probability;
- ``max`` / ``mean``: max / mean of ``v`` over the scoped tokens; a token "holds"
  when ``v[t] >= threshold``;
- ``count_above`` / ``fraction_above``: number / share of scoped tokens with
  ``v[t] > above``; a token "holds" when ``v[t] > above``;
- probe: the probe's probability of the pooled inputs; a token holds when its
  own probability is ``>= threshold``;
- the leaf fires when the aggregated value ``>= threshold``; its score is
  ``value / threshold``, adjusted so that ``score >= 1`` exactly when it fires.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from auditor.errors import AuditorError, PolicyError, PolicyErrors
from auditor.features.library import FeatureLibrary
from auditor.policy import schema as s
from auditor.policy.probes import Probe, load_probe

__all__ = [
    "SCOPES",
    "AGGS",
    "AGG_PROBE",
    "NOT_SCORE_CAP",
    "OP_ALL",
    "OP_ANY",
    "OP_NOT",
    "CompiledLeaf",
    "CompiledRule",
    "CompiledException",
    "CompiledSteer",
    "NodeGroup",
    "CompiledPolicy",
    "compile_policy",
    "policy_hash",
]

SCOPES: tuple[str, ...] = ("any", "prompt", "completion")
"""Scope codes: the index into the ``[B, T, 3]`` scope-mask stack."""
AGGS: tuple[str, ...] = ("max", "mean", "count_above", "fraction_above")
"""Aggregation codes for feature and anomaly leaves."""
AGG_PROBE = len(AGGS)
"""Aggregation code of probe leaves (pooled inputs -> probability)."""
NOT_SCORE_CAP = 1.0e6
"""``not`` scores are ``1 / child score``; a child scoring 0 would give infinity."""

OP_ALL, OP_ANY, OP_NOT = 0, 1, 2


@dataclass(frozen=True)
class CompiledLeaf:
    """One leaf column: what it reads, how it aggregates, where it fires."""

    kind: Literal["feature", "probe", "anomaly"]
    name: str
    """Feature name, ``a|b`` for a group, ``list:NAME``, probe name/path, or ``recon_error``."""
    agg: str
    """``max`` | ``mean`` | ``count_above`` | ``fraction_above`` | ``probe``."""
    above: float | None
    threshold: float
    scope: str
    latents: tuple[int, ...] = ()
    """Latent indices the leaf reads (a feature leaf's group, a feature probe's inputs)."""
    probe: Probe | None = None
    probe_key: str | None = None


@dataclass(frozen=True)
class CompiledSteer:
    """A steer action of a rule, with the feature resolved to its latent index."""

    feature: str
    index: int
    mode: str
    value: float


@dataclass(frozen=True)
class CompiledException:
    """A rule exception: its name and the root node of its condition."""

    name: str
    node: int


@dataclass(frozen=True)
class CompiledRule:
    """A rule's metadata plus where its tree lives in the node program."""

    id: str
    description: str
    severity: str
    category: str
    scope: str
    for_tokens: int | None
    actions: tuple[str, ...]
    steering: tuple[CompiledSteer, ...]
    labels: dict[str, str]
    annotations: dict[str, str]
    node: int
    """Root node of the condition."""
    leaves: tuple[int, ...]
    """Leaf columns of the condition (not of exceptions), in first-use order, for explanations."""
    exceptions: tuple[CompiledException, ...] = ()


@dataclass(frozen=True)
class NodeGroup:
    """Nodes of one operator at one depth: ``out[n] = op(children[n, :])``."""

    op: int
    out: Tensor  # [n] node indices written
    children: Tensor  # [n, c] child node indices, padded with a neutral constant node


@dataclass(frozen=True)
class CompiledPolicy:
    """Everything :class:`~auditor.policy.engine.PolicyEngine` needs, as tensors and plain data."""

    watched: Tensor  # [F] int64 latent indices, sorted unique
    leaves: tuple[CompiledLeaf, ...]
    leaf_columns: Tensor  # [L, G] int64 columns of the value matrix, padded with the -inf column
    leaf_agg: Tensor  # [L] int64 agg codes (AGGS index, AGG_PROBE)
    leaf_above: Tensor  # [L] float32 per-token levels (0 where unused)
    leaf_threshold: Tensor  # [L] float32
    leaf_scope: Tensor  # [L] int64 scope codes
    probe_leaves: tuple[int, ...]
    n_nodes: int
    const_true: int
    const_false: int
    groups: tuple[NodeGroup, ...]
    rules: tuple[CompiledRule, ...]
    rule_node: Tensor  # [R] int64
    rule_scope: Tensor  # [R] int64
    rule_for_tokens: Tensor  # [R] int64 (0: no for_tokens)
    exc_node: Tensor  # [E] int64
    exc_rule: Tensor  # [E] int64
    needs_recon_error: bool
    needs_resid: bool
    d_in: int | None
    """Width of hookpoint probes' inputs, when any."""

    @property
    def recon_column(self) -> int:
        """Column of the value matrix that holds the reconstruction error."""
        return int(self.watched.numel())

    @property
    def pad_column(self) -> int:
        """Column of the value matrix that holds ``-inf`` (group padding)."""
        return int(self.watched.numel()) + 1


# ---------------------------------------------------------------- lowering


@dataclass
class _Builder:
    policy: s.Policy
    library: FeatureLibrary
    base_dir: Path
    path: str
    leaves: list[CompiledLeaf] = field(default_factory=list)
    leaf_index: dict[tuple[Any, ...], int] = field(default_factory=dict)
    # Internal nodes: (op, children); numbered after leaves and the two constants at finalize.
    nodes: list[tuple[int, tuple[tuple[str, int], ...]]] = field(default_factory=list)
    node_index: dict[tuple[Any, ...], tuple[str, int]] = field(default_factory=dict)
    probes: dict[str, Probe] = field(default_factory=dict)
    errors: list[PolicyError] = field(default_factory=list)

    def error(self, msg: str, rule: str | None) -> None:
        self.errors.append(PolicyError(self.path, None, None, msg, rule))

    # A node reference is ("leaf", i) or ("node", j) until finalize numbers them.
    def lower(self, cond: Any, scope: str, rule: str, stack: tuple[str, ...] = ()) -> tuple[str, int] | None:
        if isinstance(cond, s.MacroRef):
            if cond.macro in stack:
                self.error(f"macro cycle: {' -> '.join((*stack, cond.macro))}", rule)
                return None
            macro = self.policy.macros.get(cond.macro)
            if macro is None:
                self.error(f"unknown macro {cond.macro!r}", rule)
                return None
            return self.lower(macro, scope, rule, (*stack, cond.macro))
        if isinstance(cond, (s.AllNode, s.AnyNode)):
            op = OP_ALL if isinstance(cond, s.AllNode) else OP_ANY
            kids = cond.all_ if isinstance(cond, s.AllNode) else cond.any_
            refs = [self.lower(k, scope, rule, stack) for k in kids]
            if any(r is None for r in refs):
                return None
            unique = tuple(dict.fromkeys(r for r in refs if r is not None))
            if len(unique) == 1:
                return unique[0]
            return self.node(op, unique)
        if isinstance(cond, s.NotNode):
            ref = self.lower(cond.not_, scope, rule, stack)
            return None if ref is None else self.node(OP_NOT, (ref,))
        leaf = self.leaf(cond, scope, rule)
        return None if leaf is None else ("leaf", leaf)

    def node(self, op: int, children: tuple[tuple[str, int], ...]) -> tuple[str, int]:
        key = (op, children)
        if key not in self.node_index:
            self.nodes.append((op, children))
            self.node_index[key] = ("node", len(self.nodes) - 1)
        return self.node_index[key]

    def add_leaf(self, leaf: CompiledLeaf) -> int:
        # The name is part of the key: a leaf written as `list: grp` and one written as
        # `feature: a` may compute the same values, but each explanation names what its
        # rule says.
        key = (leaf.kind, leaf.name, leaf.latents, leaf.probe_key, leaf.agg, leaf.above, leaf.threshold, leaf.scope)
        if key not in self.leaf_index:
            self.leaves.append(leaf)
            self.leaf_index[key] = len(self.leaves) - 1
        return self.leaf_index[key]

    def feature_index(self, name: str, rule: str | None) -> int | None:
        try:
            return int(self.library.feature(name).index)
        except AuditorError as exc:
            self.error(exc.message, rule)
        return None

    def leaf(self, cond: Any, scope: str, rule: str) -> int | None:
        if isinstance(cond, s.FeatureLeaf):
            target, value = cond.target
            if target == "feature":
                names = [str(value)]
                label = str(value)
            elif target == "features":
                names = list(value)
                label = "|".join(names)
            else:
                names = list(self.policy.lists.get(str(value), []))
                label = f"list:{value}"
                if not names:
                    self.error(f"unknown list {value!r}", rule)
                    return None
            idx = [self.feature_index(n, rule) for n in names]
            if any(i is None for i in idx):
                return None
            latents = tuple(sorted({i for i in idx if i is not None}))
            return self.add_leaf(
                CompiledLeaf("feature", label, cond.agg, cond.above, float(cond.threshold), scope, latents)
            )
        if isinstance(cond, s.AnomalyLeaf):
            level = self.anomaly_level(cond.anomaly, rule)
            if level is None:
                return None
            if cond.agg in ("count_above", "fraction_above"):
                above, threshold = level, float(cond.threshold or 0.0)
            else:
                above, threshold = None, level
            return self.add_leaf(CompiledLeaf("anomaly", "recon_error", cond.agg, above, threshold, scope))
        if isinstance(cond, s.ProbeLeaf):
            loaded = self.probe(cond.probe, rule)
            if loaded is None:
                return None
            key, name, probe = loaded
            inputs = [self.feature_index(n, rule) for n in probe.features or ()]
            if any(i is None for i in inputs):
                return None
            columns = tuple(int(i) for i in inputs if i is not None)  # coef order, not sorted
            return self.add_leaf(
                CompiledLeaf("probe", name, "probe", None, float(cond.probe.threshold), scope, columns, probe, key)
            )
        self.error(f"unsupported condition node {type(cond).__name__}", rule)
        return None

    def anomaly_level(self, level: s.AnomalyLevel, rule: str) -> float | None:
        if level.threshold is not None:
            return float(level.threshold)
        quantiles = _recon_quantiles(self.library)
        if quantiles is None or level.quantile not in quantiles:
            known = ", ".join(sorted(quantiles)) if quantiles else "none"
            self.error(
                f"anomaly quantile {level.quantile!r} is not in the library's "
                f"sae.stats.recon_error_quantiles (known: {known}); use one of those keys or 'threshold'",
                rule,
            )
            return None
        return float(quantiles[str(level.quantile)])

    def probe(self, ref: s.ProbeRef, rule: str) -> tuple[str, str, Probe] | None:
        if ref.path is not None:
            file = (self.base_dir / ref.path).resolve()
            name = ref.path
        else:
            entry = next((p for p in self.library.probes if p.name == ref.name), None)
            if entry is None:
                known = ", ".join(p.name for p in self.library.probes) or "none"
                self.error(f"unknown library probe {ref.name!r} (library probes: {known})", rule)
                return None
            file = Path(self.library.resolve_path(entry.path)).resolve()
            name = str(ref.name)
        key = str(file)
        if key not in self.probes:
            try:
                self.probes[key] = load_probe(file)
            except AuditorError as exc:
                self.error(f"probe {name!r}: {exc.message}", rule)
                return None
        return key, name, self.probes[key]


def _recon_quantiles(library: FeatureLibrary) -> dict[str, float] | None:
    stats = library.sae.stats
    q = stats.recon_error_quantiles if stats is not None else None
    return {str(k): float(v) for k, v in q.items()} if q else None


def compile_policy(policy: s.Policy, library: FeatureLibrary, *, base_dir: str | Path, path: str = "<policy>") -> CompiledPolicy:
    """Compile ``policy`` against ``library`` (probe paths resolve against ``base_dir``).

    Raises :class:`PolicyErrors` listing every problem found (unknown features,
    missing probe files, unknown anomaly quantiles, unknown steer features).
    """
    b = _Builder(policy, library, Path(base_dir), path)
    pending: list[tuple[s.Rule, tuple[str, int], list[tuple[str, tuple[str, int]]]]] = []
    for rule in policy.rules:
        if not rule.enabled:
            continue
        root = b.lower(rule.condition, rule.scope, rule.id)
        excs: list[tuple[str, tuple[str, int]]] = []
        for exc in rule.exceptions:
            ref = b.lower(exc.condition, rule.scope, rule.id)
            if ref is not None:
                excs.append((exc.name, ref))
        for steer in rule.steering:
            b.feature_index(steer.feature, rule.id)
        if root is not None:
            pending.append((rule, root, excs))
    if b.errors:
        raise PolicyErrors(b.errors)
    return _finalize(b, pending)


def _leaves_under(b: _Builder, ref: tuple[str, int], out: dict[int, None]) -> None:
    kind, i = ref
    if kind == "leaf":
        out[i] = None
        return
    for child in b.nodes[i][1]:
        _leaves_under(b, child, out)


def _finalize(
    b: _Builder, pending: list[tuple[s.Rule, tuple[str, int], list[tuple[str, tuple[str, int]]]]]
) -> CompiledPolicy:
    leaves = b.leaves
    n_leaves = len(leaves)
    const_true, const_false = n_leaves, n_leaves + 1
    first_internal = n_leaves + 2

    def number(ref: tuple[str, int]) -> int:
        return ref[1] if ref[0] == "leaf" else first_internal + ref[1]

    # Depth of each internal node; children always precede parents in b.nodes.
    depth: list[int] = []
    for _, children in b.nodes:
        depth.append(1 + max((depth[c[1]] if c[0] == "node" else 0) for c in children))
    buckets: dict[tuple[int, int], list[int]] = {}
    for j, (op, _) in enumerate(b.nodes):
        buckets.setdefault((depth[j], op), []).append(j)
    groups: list[NodeGroup] = []
    for (_, op), members in sorted(buckets.items()):
        width = max(len(b.nodes[j][1]) for j in members)
        pad = const_true if op == OP_ALL else const_false
        children = [[number(c) for c in b.nodes[j][1]] + [pad] * (width - len(b.nodes[j][1])) for j in members]
        groups.append(
            NodeGroup(
                op=op,
                out=torch.tensor([first_internal + j for j in members], dtype=torch.long),
                children=torch.tensor(children, dtype=torch.long).reshape(len(members), width),
            )
        )

    latents = sorted({i for leaf in leaves for i in leaf.latents})
    watched = torch.tensor(latents, dtype=torch.long)
    col_of = {lat: c for c, lat in enumerate(latents)}
    n_watched = len(latents)
    recon_col, pad_col = n_watched, n_watched + 1
    width = max([len(leaf.latents) for leaf in leaves if leaf.kind == "feature"] + [1])
    columns = []
    for leaf in leaves:
        if leaf.kind == "feature":
            cols = [col_of[i] for i in leaf.latents]
        elif leaf.kind == "anomaly":
            cols = [recon_col]
        else:
            cols = [pad_col]  # probes fill their column separately
        columns.append(cols + [pad_col] * (width - len(cols)))

    rules: list[CompiledRule] = []
    exc_node: list[int] = []
    exc_rule: list[int] = []
    for r_i, (rule, root, excs) in enumerate(pending):
        used: dict[int, None] = {}
        _leaves_under(b, root, used)
        steering = tuple(
            CompiledSteer(st.feature, int(b.library.feature(st.feature).index), st.mode, float(st.value or 0.0))
            for st in rule.steering
        )
        rules.append(
            CompiledRule(
                id=rule.id,
                description=rule.description,
                severity=rule.severity,
                category=rule.category,
                scope=rule.scope,
                for_tokens=rule.for_tokens,
                actions=tuple(rule.action_names),
                steering=steering,
                labels=dict(rule.labels),
                annotations=dict(rule.annotations),
                node=number(root),
                leaves=tuple(used),
                exceptions=tuple(CompiledException(name, number(ref)) for name, ref in excs),
            )
        )
        for _, ref in excs:
            exc_node.append(number(ref))
            exc_rule.append(r_i)

    hookpoint_widths = {leaf.probe.n_inputs for leaf in leaves if leaf.probe is not None and leaf.probe.inputs == "hookpoint"}
    if len(hookpoint_widths) > 1:
        raise PolicyErrors(
            [PolicyError(b.path, None, None, f"hookpoint probes disagree on d_in: {sorted(hookpoint_widths)}")]
        )
    return CompiledPolicy(
        watched=watched,
        leaves=tuple(leaves),
        leaf_columns=torch.tensor(columns, dtype=torch.long).reshape(n_leaves, width),
        leaf_agg=torch.tensor([AGG_PROBE if l.agg == "probe" else AGGS.index(l.agg) for l in leaves], dtype=torch.long),
        leaf_above=torch.tensor([l.above if l.above is not None else 0.0 for l in leaves], dtype=torch.float32),
        leaf_threshold=torch.tensor([l.threshold for l in leaves], dtype=torch.float32),
        leaf_scope=torch.tensor([SCOPES.index(l.scope) for l in leaves], dtype=torch.long),
        probe_leaves=tuple(i for i, l in enumerate(leaves) if l.kind == "probe"),
        n_nodes=first_internal + len(b.nodes),
        const_true=const_true,
        const_false=const_false,
        groups=tuple(groups),
        rules=tuple(rules),
        rule_node=torch.tensor([r.node for r in rules], dtype=torch.long),
        rule_scope=torch.tensor([SCOPES.index(r.scope) for r in rules], dtype=torch.long),
        rule_for_tokens=torch.tensor([r.for_tokens or 0 for r in rules], dtype=torch.long),
        exc_node=torch.tensor(exc_node, dtype=torch.long),
        exc_rule=torch.tensor(exc_rule, dtype=torch.long),
        needs_recon_error=any(l.kind == "anomaly" for l in leaves),
        needs_resid=bool(hookpoint_widths),
        d_in=next(iter(hookpoint_widths)) if hookpoint_widths else None,
    )


def policy_hash(policy: s.Policy, library: FeatureLibrary, probes: list[Probe] | None = None) -> str:
    """sha256 of the canonical policy, its library and the probes it uses (hex)."""
    h = hashlib.sha256()
    h.update(json.dumps(policy.model_dump(mode="json", by_alias=True), sort_keys=True).encode())
    h.update(b"\0")
    h.update(json.dumps(library.model_dump(mode="json", by_alias=True), sort_keys=True).encode())
    for probe in sorted(probes or [], key=lambda p: p.path or ""):
        h.update(b"\0")
        h.update(json.dumps(probe.to_dict(), sort_keys=True).encode())
    return h.hexdigest()

