"""The policy engine against a plain-Python reference implementation, plus hand-written cases.

The reference below loops over rows, rules and tokens with numpy float32
scalars and follows the contract in the engine/compile docstrings literally;
hypothesis draws small random policies (every agg, all/any/not nesting, lists,
macros, scopes, for_tokens, exceptions, probes, anomaly leaves) and random
activations with padding, and the two must agree exactly on what fired.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from auditor.errors import PolicyErrors
from auditor.features.library import FeatureLibrary
from auditor.policy.engine import AuditBatch, PolicyEngine, Verdict, build_engine
from auditor.policy.schema import Policy

F32 = np.float32
ONE_MINUS = np.nextafter(F32(1.0), F32(0.0))
CAP = F32(1.0e6)
D_SAE = 48
FEATURES = {"a.one": 3, "a.two": 17, "b.three": 5, "b.four": 40, "c.five": 8, "c.six": 11}
CATEGORY_OF = {"a.one": "alpha", "a.two": "alpha", "b.three": "beta", "b.four": "beta", "c.five": "gamma", "c.six": "gamma"}
QUANTILES = {"0.9": 1.0, "0.99": 2.0}
# Two probes, each written with mean and max pooling (``p_mean.json``, ``q_max.json``, ...): the
# engine folds every probe of a policy into one matrix, so a policy may read several at once.
PROBES = {
    "p": {"features": ["a.two", "c.five", "b.three"], "coef": [0.8, -0.5, 1.1], "intercept": -1.0,
          "scaler": {"mean": [0.5, 0.25, 0.75], "scale": [1.5, 2.0, 0.5]}},
    "q": {"features": ["b.four", "a.one"], "coef": [-0.6, 1.3], "intercept": 0.4,
          "scaler": {"mean": [0.25, 1.0], "scale": [0.5, 2.5]}},
}
PROBE_FILES = [f"{name}_{pool}.json" for name in PROBES for pool in ("mean", "max")]


def make_library(tmp: Path | None = None) -> FeatureLibrary:
    data = {
        "apiVersion": "auditor/v1",
        "kind": "FeatureLibrary",
        "id": "tiny",
        "sae": {
            "id": "tiny-sae",
            "model": "tiny-model",
            "hookpoint": "blocks.0.hook_resid_post",
            "stats": {"recon_error_quantiles": QUANTILES},
        },
        "features": [
            {"name": n, "index": i, "category": CATEGORY_OF[n], "description": n} for n, i in FEATURES.items()
        ],
    }
    return FeatureLibrary.model_validate(data)


def write_probes(folder: Path) -> None:
    for file in PROBE_FILES:
        name, pool = file.removesuffix(".json").split("_")
        (folder / file).write_text(json.dumps({"kind": "logistic", "inputs": "features", "pool": pool, **PROBES[name]}))


def make_engine(policy: dict[str, Any], folder: Path) -> PolicyEngine:
    base = {"apiVersion": "auditor/v1", "kind": "Policy", "metadata": {"name": "test"}, "library": "tiny"}
    parsed = Policy.model_validate({**base, **policy})
    return build_engine(parsed, make_library(), path=folder / "policy.yaml")


def full_batch(full: torch.Tensor, mask: torch.Tensor, comp: torch.Tensor, engine: PolicyEngine, recon: torch.Tensor | None = None) -> AuditBatch:
    return AuditBatch(full[..., engine.watched], mask, comp, recon_error=recon)


# ---------------------------------------------------------------- reference


def consistent(score: Any, fired: bool) -> Any:
    return max(F32(score), F32(1.0)) if fired else min(F32(score), ONE_MINUS)


class Reference:
    """Obviously-correct evaluation: Python loops over rows, rules and tokens."""

    def __init__(self, policy: dict[str, Any], full: np.ndarray, mask: np.ndarray, comp: np.ndarray, recon: np.ndarray, folder: Path):
        self.policy = policy
        self.full, self.mask, self.comp, self.recon = full, mask, comp, recon
        self.folder = folder
        self.T = full.shape[1]

    def scoped(self, b: int, scope: str) -> list[int]:
        return [
            t
            for t in range(self.T)
            if self.mask[b, t] and (scope == "any" or (scope == "completion") == bool(self.comp[b, t]))
        ]

    def probe_prob(self, path: str, x: list[Any]) -> Any:
        probe = PROBES[path.split("_")[0]]
        z = F32(probe["intercept"])
        for v, c, m, sc in zip(x, probe["coef"], probe["scaler"]["mean"], probe["scaler"]["scale"]):
            z = F32(z + F32(F32(F32(v) - F32(m)) / F32(sc)) * F32(c))
        return F32(1.0) / (F32(1.0) + np.exp(-z, dtype=np.float32))

    def probe_inputs(self, path: str, b: int, t: int) -> list[Any]:
        return [F32(self.full[b, t, FEATURES[n]]) for n in PROBES[path.split("_")[0]]["features"]]

    def leaf_spec(self, node: dict[str, Any]) -> tuple[Any, ...]:
        """(key, kind, name, agg, above, threshold)."""
        if "probe" in node:
            path = node["probe"]["path"]
            return ("probe", path, node["probe"]["threshold"]), "probe", path, "probe", None, node["probe"]["threshold"]
        if "anomaly" in node:
            a = node["anomaly"]
            level = QUANTILES[a["quantile"]] if "quantile" in a else a["threshold"]
            agg = node.get("agg", "max")
            if agg in ("count_above", "fraction_above"):
                above, thr = level, node["threshold"]
            else:
                above, thr = None, level
            return ("anomaly", agg, above, thr), "anomaly", "recon_error", agg, above, thr
        if "feature" in node:
            names, label = [node["feature"]], node["feature"]
        elif "features" in node:
            names, label = node["features"], "|".join(node["features"])
        else:
            names, label = self.policy["lists"][node["list"]], f"list:{node['list']}"
        idx = frozenset(FEATURES[n] for n in names)
        agg = node.get("agg", "max")
        return ("feature", idx, agg, node.get("above"), node["threshold"]), "feature", label, agg, node.get("above"), node["threshold"]

    def per_token(self, node: dict[str, Any], b: int, scope: str) -> list[Any]:
        if "probe" in node:
            path = node["probe"]["path"]
            return [self.probe_prob(path, self.probe_inputs(path, b, t)) for t in range(self.T)]
        if "anomaly" in node:
            return [F32(self.recon[b, t]) for t in range(self.T)]
        key = self.leaf_spec(node)[0]
        return [max(F32(self.full[b, t, i]) for i in key[1]) for t in range(self.T)]

    def leaf(self, node: dict[str, Any], b: int, scope: str) -> dict[str, Any]:
        key, kind, name, agg, above, thr = self.leaf_spec(node)
        toks = self.scoped(b, scope)
        pv = self.per_token(node, b, scope)
        counting = agg in ("count_above", "fraction_above")
        if not toks:
            value = F32(0.0)
        elif agg == "max":
            value = max(pv[t] for t in toks)
        elif agg == "mean":
            value = F32(sum(float(pv[t]) for t in toks)) / F32(len(toks))
        elif agg == "count_above":
            value = F32(sum(1 for t in toks if pv[t] > F32(above)))
        elif agg == "fraction_above":
            value = F32(sum(1 for t in toks if pv[t] > F32(above))) / F32(len(toks))
        else:
            path = node["probe"]["path"]
            vecs = [self.probe_inputs(path, b, t) for t in toks]
            width = len(vecs[0])
            if path.split("_")[1] == "mean.json":
                pooled = [F32(sum(float(v[j]) for v in vecs)) / F32(len(vecs)) for j in range(width)]
            else:
                pooled = [max(v[j] for v in vecs) for j in range(width)]
            value = self.probe_prob(path, pooled)
        fired = bool(toks) and value >= F32(thr)
        score = consistent(F32(value) / F32(thr), fired)
        level = F32(above) if counting else F32(thr)
        truth = [t in toks and (pv[t] > level if counting else pv[t] >= level) for t in range(self.T)]
        return {"score": score, "fired": fired, "truth": truth, "value": value, "key": key, "name": name, "kind": kind, "agg": agg, "thr": thr}

    def tree(self, node: dict[str, Any], b: int, scope: str) -> dict[str, Any]:
        if "macro" in node:
            return self.tree(self.policy["macros"][node["macro"]], b, scope)
        if "all" in node or "any" in node:
            kids = [self.tree(k, b, scope) for k in node.get("all", node.get("any"))]
            if "all" in node:
                return {
                    "score": min(k["score"] for k in kids),
                    "fired": all(k["fired"] for k in kids),
                    "truth": [all(k["truth"][t] for k in kids) for t in range(self.T)],
                }
            return {
                "score": max(k["score"] for k in kids),
                "fired": any(k["fired"] for k in kids),
                "truth": [any(k["truth"][t] for k in kids) for t in range(self.T)],
            }
        if "not" in node:
            kid = self.tree(node["not"], b, scope)
            inv = CAP if kid["score"] <= 0 else min(F32(1.0) / kid["score"], CAP)
            return {"score": consistent(inv, not kid["fired"]), "fired": not kid["fired"], "truth": [not x for x in kid["truth"]]}
        return self.leaf(node, b, scope)

    def leaves(self, node: dict[str, Any], b: int, scope: str, out: dict[Any, dict[str, Any]]) -> None:
        if "macro" in node:
            self.leaves(self.policy["macros"][node["macro"]], b, scope, out)
        elif "all" in node or "any" in node:
            for k in node.get("all", node.get("any")):
                self.leaves(k, b, scope, out)
        elif "not" in node:
            self.leaves(node["not"], b, scope, out)
        else:
            res = self.leaf(node, b, scope)
            # Leaves computing the same value under different names (a list of one feature and
            # the feature itself) keep their own names: one explanation each.
            out.setdefault((res["key"], res["name"]), res)

    def row(self, b: int) -> dict[str, Any]:
        scores: dict[str, Any] = {}
        matched: list[dict[str, Any]] = []
        suppressed: dict[str, str] = {}
        categories: dict[str, Any] = {}
        for rule in self.policy["rules"]:
            categories.setdefault(rule["category"], F32(0.0))
        for rule in self.policy["rules"]:
            if not rule.get("enabled", True):
                continue
            scope = rule.get("scope", "any")
            toks = self.scoped(b, scope)
            res = self.tree(rule["condition"], b, scope)
            score, fired = res["score"], res["fired"]
            n = rule.get("for_tokens")
            if n is not None:
                best = run = 0
                for t in range(self.T):
                    run = run + 1 if (t in toks and res["truth"][t]) else 0
                    best = max(best, run)
                score = min(score, consistent(F32(best) / F32(n), best >= n))
                fired = fired and best >= n
            if not toks:
                score, fired = F32(0.0), False
            scores[rule["id"]] = score
            categories[rule["category"]] = max(categories[rule["category"]], score)
            hit = next((e["name"] for e in rule.get("exceptions", []) if self.tree(e["condition"], b, scope)["fired"]), None)
            if fired and hit is not None:
                suppressed[rule["id"]] = hit
            elif fired:
                leaves: dict[Any, dict[str, Any]] = {}
                self.leaves(rule["condition"], b, scope, leaves)
                matched.append({"rule": rule, "score": score, "leaves": list(leaves.values())})
        actions = {a for m in matched for a in m["rule"].get("actions", ["alert"]) if isinstance(a, str)}
        action = "block" if "block" in actions else "alert" if "alert" in actions else "allow"
        return {"scores": scores, "matched": matched, "suppressed": suppressed, "categories": categories, "action": action}


def spans_of(truth: list[bool]) -> list[tuple[int, int]]:
    out, start = [], None
    for t, x in enumerate([*truth, False]):
        if x and start is None:
            start = t
        elif not x and start is not None:
            out.append((start, t))
            start = None
    return out


def assert_matches_reference(verdict: Verdict, ref: dict[str, Any]) -> None:
    assert verdict.action == ref["action"]
    assert list(verdict.scores) == list(ref["scores"])
    torch.testing.assert_close(
        torch.tensor(list(verdict.scores.values())), torch.tensor([float(v) for v in ref["scores"].values()])
    )
    assert verdict.category_scores.keys() == ref["categories"].keys()
    torch.testing.assert_close(
        torch.tensor(list(verdict.category_scores.values())), torch.tensor([float(v) for v in ref["categories"].values()])
    )
    assert [m.rule_id for m in verdict.matches] == [m["rule"]["id"] for m in ref["matched"]]
    assert verdict.suppressed == ref["suppressed"]
    for got, want in zip(verdict.matches, ref["matched"]):
        assert got.score >= 1.0
        assert [(e.kind, e.name, e.agg) for e in got.explanation] == [(l["kind"], l["name"], l["agg"]) for l in want["leaves"]]
        assert [e.fired for e in got.explanation] == [l["fired"] for l in want["leaves"]]
        assert [e.token_spans for e in got.explanation] == [spans_of(l["truth"]) for l in want["leaves"]]
        torch.testing.assert_close(
            torch.tensor([e.value for e in got.explanation]), torch.tensor([float(l["value"]) for l in want["leaves"]])
        )
        steer = [s for s in want["rule"].get("actions", []) if isinstance(s, dict)]
        assert [(s.feature, s.mode, s.value) for s in verdict.steering if s.rule_id == got.rule_id] == [
            (s["steer"]["feature"], s["steer"]["mode"], float(s["steer"].get("value", 0.0))) for s in steer
        ]


# ---------------------------------------------------------------- hypothesis strategies

NAMES = list(FEATURES)
THRESHOLDS = [0.25, 0.5, 1.0, 1.5, 2.0, 2.5]
LEVELS = [0.0, 0.5, 1.0, 2.0]


@st.composite
def leaves(draw: st.DrawFn, with_probe: bool = True) -> dict[str, Any]:
    kind = draw(st.sampled_from(["feature", "features", "list", "anomaly", "probe"] if with_probe else ["feature", "features", "list", "anomaly"]))
    agg = draw(st.sampled_from(["max", "mean", "count_above", "fraction_above"]))
    if kind == "probe":
        return {"probe": {"path": draw(st.sampled_from(PROBE_FILES)), "threshold": draw(st.sampled_from([0.2, 0.35, 0.5, 0.7]))}}
    if kind == "anomaly":
        level = draw(st.sampled_from([{"quantile": "0.9"}, {"quantile": "0.99"}, {"threshold": 0.5}]))
        node: dict[str, Any] = {"anomaly": level, "agg": agg}
        if agg == "count_above":
            node["threshold"] = draw(st.sampled_from([1.0, 2.0, 3.0]))
        elif agg == "fraction_above":
            node["threshold"] = draw(st.sampled_from([0.1, 0.25, 0.5]))
        return node
    if kind == "feature":
        node = {"feature": draw(st.sampled_from(NAMES))}
    elif kind == "features":
        node = {"features": draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True))}
    else:
        node = {"list": "grp"}
    node["agg"] = agg
    if agg == "count_above":
        node["above"] = draw(st.sampled_from(LEVELS))
        node["threshold"] = draw(st.sampled_from([1.0, 2.0, 3.0]))
    elif agg == "fraction_above":
        node["above"] = draw(st.sampled_from(LEVELS))
        node["threshold"] = draw(st.sampled_from([0.1, 0.25, 0.5, 1.0]))
    else:
        node["threshold"] = draw(st.sampled_from(THRESHOLDS))
    return node


def conditions(with_macro: bool) -> st.SearchStrategy[dict[str, Any]]:
    base = leaves() | st.just({"macro": "m1"}) if with_macro else leaves()
    return st.recursive(
        base,
        lambda kids: st.lists(kids, min_size=1, max_size=3).map(lambda k: {"all": k})
        | st.lists(kids, min_size=1, max_size=3).map(lambda k: {"any": k})
        | kids.map(lambda k: {"not": k}),
        max_leaves=5,
    )


@st.composite
def rules(draw: st.DrawFn, i: int) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "id": f"r{i}",
        "severity": draw(st.sampled_from(["low", "high"])),
        "category": draw(st.sampled_from(["alpha", "beta"])),
        "scope": draw(st.sampled_from(["any", "prompt", "completion"])),
        "condition": draw(conditions(with_macro=True)),
        "enabled": draw(st.sampled_from([True, True, True, False])),
        "actions": draw(
            st.sampled_from(
                [["alert"], ["block"], ["annotate"], ["alert", {"steer": {"feature": "a.one", "mode": "clamp", "value": 0.0}}]]
            )
        ),
    }
    if draw(st.booleans()):
        rule["for_tokens"] = draw(st.integers(1, 3))
    if draw(st.integers(0, 3)) == 0:
        rule["exceptions"] = [{"name": "exc", "condition": draw(conditions(with_macro=False))}]
    return rule


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 4))
    return {
        "lists": {"grp": draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True))},
        "macros": {"m1": draw(conditions(with_macro=False))},
        "rules": [draw(rules(i)) for i in range(n)],
    }


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("probes")
    write_probes(folder)
    return folder


def random_inputs(seed: int, bsz: int, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(seed)
    # Multiples of 0.25, mostly zero: sums are exact in float32, so means compare exactly.
    full = (g.integers(0, 13, size=(bsz, t, D_SAE)) * (g.random((bsz, t, D_SAE)) < 0.4)).astype(np.float32) * 0.25
    lengths = g.integers(0, t + 1, size=bsz)
    split = g.integers(0, t + 1, size=bsz)
    pos = np.arange(t)
    mask = pos[None, :] < lengths[:, None]
    mask &= g.random((bsz, t)) > 0.1  # scattered special tokens inside the text
    comp = pos[None, :] >= split[:, None]
    recon = (g.integers(0, 12, size=(bsz, t)) * 0.25).astype(np.float32)
    return torch.from_numpy(full), torch.from_numpy(mask), torch.from_numpy(comp), torch.from_numpy(recon)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), seed=st.integers(0, 2**31 - 1), bsz=st.integers(1, 4), t=st.integers(1, 9))
# Found by hypothesis: `list: grp` (grp = [a.one]) and `feature: a.one` compute the same
# values but must keep their own names in explanations.
@example(
    policy={
        "lists": {"grp": ["a.one"]},
        "macros": {"m1": {"feature": "a.one", "agg": "max", "threshold": 0.25}},
        "rules": [
            {"id": "r0", "severity": "low", "category": "alpha", "scope": "any",
             "condition": {"list": "grp", "agg": "max", "threshold": 0.25}, "enabled": True, "actions": ["alert"],
             "exceptions": [{"name": "exc", "condition": {"feature": "a.one", "agg": "max", "threshold": 0.25}}]},
            {"id": "r1", "severity": "low", "category": "alpha", "scope": "any",
             "condition": {"macro": "m1"}, "enabled": True, "actions": ["alert"]},
        ],
    },
    seed=0, bsz=1, t=2,
)
# Found by hypothesis: within one rule, a macro's `features: [b.three]` and `list: grp` (grp =
# [b.three]) compute the same value; the explanation names both.
@example(
    policy={
        "lists": {"grp": ["b.three"]},
        "macros": {"m1": {"all": [{"features": ["b.three"], "agg": "max", "threshold": 0.25}]}},
        "rules": [
            {"id": "r2", "severity": "low", "category": "alpha", "scope": "any", "enabled": True, "actions": ["alert"],
             "condition": {"all": [{"macro": "m1"}, {"list": "grp", "agg": "max", "threshold": 0.25}]}},
        ],
    },
    seed=0, bsz=1, t=3,
)
@pytest.mark.parametrize("program", ["c-twin", "numpy", "torch"])
def test_engine_matches_reference(probe_dir: Path, program: str, policy: dict[str, Any], seed: int, bsz: int, t: int) -> None:
    # Every program: on a CPU, batches this small go through the host program's C twin (NumPy's
    # where the kernel library does not build) unless told otherwise.
    engine = make_engine(policy, probe_dir)
    engine.host_program = program != "torch"
    engine._numpy.native = program == "c-twin"
    full, mask, comp, recon = random_inputs(seed, bsz, t)
    verdicts = engine.evaluate(full_batch(full, mask, comp, engine, recon))
    ref = Reference(policy, full.numpy(), mask.numpy(), comp.numpy(), recon.numpy(), probe_dir)
    assert len(verdicts) == bsz
    for b, verdict in enumerate(verdicts):
        assert_matches_reference(verdict, ref.row(b))


# ---------------------------------------------------------------- hand-written cases


def one_rule(condition: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"rules": [{"id": "r", "severity": "high", "category": "alpha", "condition": condition, **extra}]}


def batch_from(values: dict[str, list[float]], engine: PolicyEngine, *, mask: list[bool] | None = None, comp: list[bool] | None = None) -> AuditBatch:
    t = len(next(iter(values.values())))
    full = torch.zeros(1, t, D_SAE)
    for name, vals in values.items():
        full[0, :, FEATURES[name]] = torch.tensor(vals)
    m = torch.tensor([mask if mask is not None else [True] * t])
    c = torch.tensor([comp if comp is not None else [False] * t])
    return full_batch(full, m, c, engine)


def test_leaf_exactly_at_threshold_fires(tmp_path: Path) -> None:
    engine = make_engine(one_rule({"feature": "a.one", "threshold": 2.0}), tmp_path)
    at = engine.evaluate(batch_from({"a.one": [0.0, 2.0, 1.0]}, engine))[0]
    below = engine.evaluate(batch_from({"a.one": [0.0, 1.999, 1.0]}, engine))[0]
    assert at.action == "alert" and at.scores["r"] == 1.0
    assert at.matches[0].explanation[0].token_spans == [(1, 2)]
    assert below.action == "allow" and below.scores["r"] < 1.0
    torch.testing.assert_close(below.scores["r"], 1.999 / 2.0)


def test_a_nan_activation_counts_as_zero_and_scores_stay_numbers(tmp_path: Path) -> None:
    # Broken activations (NaN) must not leave NaN in scores (the verdict is JSON) nor hide a
    # sibling that fires: a NaN leaf is a leaf at 0.
    policy = {
        "rules": [
            {"id": "either", "severity": "high", "category": "alpha",
             "condition": {"any": [{"feature": "a.one", "threshold": 1.0}, {"feature": "a.two", "threshold": 1.0}]}},
            {"id": "both", "severity": "low", "category": "alpha",
             "condition": {"all": [{"feature": "a.one", "threshold": 1.0}, {"feature": "a.two", "threshold": 1.0}]}},
            {"id": "not-one", "severity": "low", "category": "beta", "condition": {"not": {"feature": "a.one", "threshold": 1.0}}},
        ]
    }
    engine = make_engine(policy, tmp_path)
    nan = float("nan")
    got = engine.evaluate(batch_from({"a.one": [nan, nan], "a.two": [0.5, 3.0]}, engine))[0]
    zero = engine.evaluate(batch_from({"a.one": [0.0, 0.0], "a.two": [0.5, 3.0]}, engine))[0]
    assert [m.rule_id for m in got.matches] == ["either", "not-one"] == [m.rule_id for m in zero.matches]
    assert got.scores == zero.scores and all(v == v for v in got.scores.values())
    assert got.category_scores == zero.category_scores
    assert json.loads(json.dumps(got.to_dict(), allow_nan=False))["action"] == "alert"
    matcher = engine.incremental(1)
    assert matcher is not None
    step = batch_from({"a.one": [nan, nan], "a.two": [0.5, 3.0]}, engine)
    assert matcher.update(step).tolist() == [[True, False, True]]


def test_padding_and_special_tokens_never_count(tmp_path: Path) -> None:
    engine = make_engine(
        one_rule({"feature": "a.one", "agg": "count_above", "above": 1.0, "threshold": 2.0}), tmp_path
    )
    vals = {"a.one": [9.0, 5.0, 9.0, 9.0]}
    masked = engine.evaluate(batch_from(vals, engine, mask=[False, True, False, False]))[0]
    assert masked.action == "allow" and masked.scores["r"] == 0.5
    full = engine.evaluate(batch_from(vals, engine))[0]
    assert full.action == "alert" and full.scores["r"] == 2.0
    nothing = engine.evaluate(batch_from(vals, engine, mask=[False] * 4))[0]
    assert nothing.action == "allow" and nothing.scores["r"] == 0.0


def test_scope_prompt_vs_completion(tmp_path: Path) -> None:
    cond = {"feature": "b.three", "threshold": 1.0}
    policy = {
        "rules": [
            {"id": "p", "severity": "low", "category": "beta", "scope": "prompt", "condition": cond},
            {"id": "c", "severity": "low", "category": "beta", "scope": "completion", "condition": cond},
            {"id": "a", "severity": "low", "category": "beta", "condition": cond},
        ]
    }
    engine = make_engine(policy, tmp_path)
    comp = [False, False, True, True]
    v = engine.evaluate(batch_from({"b.three": [0.0, 3.0, 0.5, 0.5]}, engine, comp=comp))[0]
    assert [m.rule_id for m in v.matches] == ["p", "a"]
    torch.testing.assert_close(v.scores["c"], 0.5)
    v = engine.evaluate(batch_from({"b.three": [0.0, 0.0, 0.5, 4.0]}, engine, comp=comp))[0]
    assert [m.rule_id for m in v.matches] == ["c", "a"]
    assert v.matches[0].explanation[0].token_spans == [(3, 4)]
    # No completion tokens: the completion rule cannot be evaluated and scores 0.
    v = engine.evaluate(batch_from({"b.three": [5.0, 5.0]}, engine, comp=[False, False]))[0]
    assert v.scores["c"] == 0.0 and [m.rule_id for m in v.matches] == ["p", "a"]


def test_text_marked_both_prompt_and_completion_is_seen_by_every_scope(tmp_path: Path) -> None:
    cond = {"feature": "b.three", "threshold": 1.0}
    policy = {
        "rules": [
            {"id": "p", "severity": "low", "category": "beta", "scope": "prompt", "condition": cond},
            {"id": "c", "severity": "low", "category": "beta", "scope": "completion", "condition": cond},
        ]
    }
    engine = make_engine(policy, tmp_path)
    batch = batch_from({"b.three": [0.0, 3.0, 0.5]}, engine, comp=[True, True, True])
    both = AuditBatch(batch.features, batch.mask, batch.is_completion, is_prompt=torch.ones_like(batch.mask))
    assert [m.rule_id for m in engine.evaluate(both)[0].matches] == ["p", "c"]
    # Without is_prompt the prompt scope is the complement of the completion mask.
    assert [m.rule_id for m in engine.evaluate(batch)[0].matches] == ["c"]
    prompt_only = AuditBatch(batch.features, batch.mask, torch.zeros_like(batch.mask), is_prompt=torch.zeros_like(batch.mask))
    v = engine.evaluate(prompt_only)[0]
    assert v.matches == [] and v.scores == {"p": 0.0, "c": 0.0}


def test_disabled_rules_compiled_out(tmp_path: Path) -> None:
    policy = {
        "rules": [
            {"id": "on", "severity": "low", "category": "alpha", "condition": {"feature": "a.one", "threshold": 1.0}},
            {"id": "off", "severity": "low", "category": "gamma", "enabled": False, "condition": {"feature": "c.six", "threshold": 1.0}},
        ]
    }
    engine = make_engine(policy, tmp_path)
    assert engine.watched.tolist() == [FEATURES["a.one"]]
    assert [r.id for r in engine.compiled.rules] == ["on"]
    assert [(r.id, r.enabled) for r in engine.rules] == [("on", True), ("off", False)]
    v = engine.evaluate(batch_from({"a.one": [2.0], "c.six": [9.0]}, engine))[0]
    assert list(v.scores) == ["on"]
    assert v.category_scores == {"alpha": 2.0, "gamma": 0.0}


def test_category_scores_take_the_max(tmp_path: Path) -> None:
    policy = {
        "rules": [
            {"id": "x", "severity": "low", "category": "alpha", "condition": {"feature": "a.one", "threshold": 4.0}},
            {"id": "y", "severity": "low", "category": "alpha", "condition": {"feature": "a.two", "threshold": 1.0}},
            {"id": "z", "severity": "low", "category": "beta", "condition": {"feature": "b.four", "agg": "mean", "threshold": 2.0}},
        ]
    }
    engine = make_engine(policy, tmp_path)
    v = engine.evaluate(batch_from({"a.one": [2.0, 0.0], "a.two": [0.0, 0.75], "b.four": [1.0, 2.0]}, engine))[0]
    torch.testing.assert_close(v.scores, {"x": 0.5, "y": 0.75, "z": 0.75})
    torch.testing.assert_close(v.category_scores, {"alpha": 0.75, "beta": 0.75})
    assert v.action == "allow"
    # A category whose rules all score below 0 (negative activations) scores 0.
    v = engine.evaluate(batch_from({"a.one": [2.0], "a.two": [0.5], "b.four": [-3.0]}, engine))[0]
    torch.testing.assert_close(v.scores, {"x": 0.5, "y": 0.5, "z": -1.5})
    torch.testing.assert_close(v.category_scores, {"alpha": 0.5, "beta": 0.0})


def test_explanation_values_and_spans(tmp_path: Path) -> None:
    cond = {
        "all": [
            {"list": "grp", "agg": "count_above", "above": 1.0, "threshold": 2.0},
            {"not": {"feature": "c.five", "agg": "mean", "threshold": 1.0}},
        ]
    }
    engine = make_engine({"lists": {"grp": ["a.one", "a.two"]}, **one_rule(cond)}, tmp_path)
    v = engine.evaluate(
        batch_from({"a.one": [2.0, 0.0, 0.0, 3.0], "a.two": [0.0, 1.5, 0.0, 0.0], "c.five": [0.0, 0.0, 2.0, 0.0]}, engine)
    )[0]
    (match,) = v.matches
    grp, five = match.explanation
    assert (grp.kind, grp.name, grp.agg, grp.value, grp.threshold, grp.above, grp.fired) == (
        "feature", "list:grp", "count_above", 3.0, 2.0, 1.0, True
    )
    assert grp.token_spans == [(0, 2), (3, 4)]
    assert (five.name, five.agg, five.value, five.fired, five.token_spans) == ("c.five", "mean", 0.5, False, [(2, 3)])
    # all -> min(3/2, 1/(0.5/1)) = min(1.5, 2.0)
    torch.testing.assert_close(match.score, 1.5)


def test_for_tokens_needs_a_consecutive_run(tmp_path: Path) -> None:
    engine = make_engine(one_rule({"feature": "a.one", "threshold": 1.0}, for_tokens=3), tmp_path)
    split = engine.evaluate(batch_from({"a.one": [2.0, 2.0, 0.0, 2.0, 2.0]}, engine))[0]
    assert split.action == "allow"
    torch.testing.assert_close(split.scores["r"], 2.0 / 3.0)
    run = engine.evaluate(batch_from({"a.one": [0.0, 2.0, 2.0, 2.0, 0.0]}, engine))[0]
    assert run.action == "alert" and run.scores["r"] == 1.0
    # A masked token inside the run breaks it.
    broken = engine.evaluate(batch_from({"a.one": [0.0, 2.0, 2.0, 2.0, 0.0]}, engine, mask=[True, True, False, True, True]))[0]
    assert broken.action == "allow"


def test_exceptions_suppress_but_keep_score(tmp_path: Path) -> None:
    rule = one_rule(
        {"feature": "a.one", "threshold": 1.0},
        exceptions=[{"name": "training", "condition": {"feature": "c.six", "threshold": 3.0}}],
        actions=["block"],
    )
    engine = make_engine(rule, tmp_path)
    hit = engine.evaluate(batch_from({"a.one": [2.0], "c.six": [0.0]}, engine))[0]
    assert hit.action == "block" and hit.suppressed == {}
    excused = engine.evaluate(batch_from({"a.one": [2.0], "c.six": [3.0]}, engine))[0]
    assert excused.action == "allow" and excused.matches == []
    assert excused.suppressed == {"r": "training"} and excused.scores["r"] == 2.0


def test_the_first_exception_that_holds_names_the_suppression(tmp_path: Path) -> None:
    rules = {
        "rules": [
            {"id": "q", "severity": "low", "category": "beta", "condition": {"feature": "b.three", "threshold": 1.0},
             "exceptions": [{"name": "quiet", "condition": {"feature": "b.four", "threshold": 1.0}}]},
            {"id": "r", "severity": "high", "category": "alpha", "condition": {"feature": "a.one", "threshold": 1.0},
             "actions": ["block"],
             "exceptions": [{"name": "training", "condition": {"feature": "c.five", "threshold": 1.0}},
                            {"name": "eval", "condition": {"feature": "c.six", "threshold": 1.0}}]},
        ]
    }
    engine = make_engine(rules, tmp_path)

    def verdict(**values: float) -> Any:
        return engine.evaluate(batch_from({k.replace("_", "."): [v] for k, v in values.items()}, engine))[0]

    v = verdict(a_one=2.0, b_three=2.0, b_four=0.0, c_five=0.0, c_six=3.0)  # only r's second exception holds
    assert v.suppressed == {"r": "eval"} and [m.rule_id for m in v.matches] == ["q"]
    v = verdict(a_one=2.0, b_three=2.0, b_four=2.0, c_five=2.0, c_six=3.0)  # both of r's hold: the first names it
    assert v.suppressed == {"q": "quiet", "r": "training"} and v.matches == [] and v.action == "allow"
    v = verdict(a_one=2.0, b_three=0.0, b_four=2.0, c_five=0.0, c_six=0.0)  # q's exception alone does not fire r's
    assert v.suppressed == {} and [m.rule_id for m in v.matches] == ["r"] and v.action == "block"


def test_actions_steering_and_annotations(tmp_path: Path) -> None:
    policy = {
        "rules": [
            {
                "id": "steer-me",
                "severity": "medium",
                "category": "alpha",
                "description": "alpha is up",
                "condition": {"feature": "a.one", "threshold": 1.0},
                "annotations": {"summary": "alpha summary"},
                "actions": [
                    "annotate",
                    {"steer": {"feature": "a.one", "mode": "clamp"}},
                    {"steer": {"feature": "b.four", "mode": "scale", "value": 0.5}},
                ],
            },
            {"id": "blocker", "severity": "critical", "category": "beta", "condition": {"feature": "b.three", "threshold": 1.0}, "actions": ["block", "alert"]},
        ]
    }
    engine = make_engine(policy, tmp_path)
    v = engine.evaluate(batch_from({"a.one": [1.0], "b.three": [0.0]}, engine))[0]
    assert v.action == "allow"  # annotate and steer alone do not alert
    assert v.annotations == ["steer-me: alpha summary"]
    assert [(s.feature, s.index, s.mode, s.value, s.rule_id) for s in v.steering] == [
        ("a.one", FEATURES["a.one"], "clamp", 0.0, "steer-me"),
        ("b.four", FEATURES["b.four"], "scale", 0.5, "steer-me"),
    ]
    assert FEATURES["b.four"] not in engine.watched.tolist()  # steering does not need the feature watched
    v = engine.evaluate(batch_from({"a.one": [1.0], "b.three": [1.0]}, engine))[0]
    assert v.action == "block"
    assert [m.actions for m in v.matches] == [["annotate", "steer", "steer"], ["block", "alert"]]


def test_anomaly_leaf_reads_recon_error(tmp_path: Path) -> None:
    engine = make_engine(one_rule({"anomaly": {"quantile": "0.99"}, "agg": "count_above", "threshold": 2.0}), tmp_path)
    assert engine.needs_recon_error and engine.watched.numel() == 0
    t = 4
    batch = AuditBatch(torch.zeros(1, t, 0), torch.ones(1, t, dtype=torch.bool), torch.zeros(1, t, dtype=torch.bool))
    with pytest.raises(ValueError, match="recon_error"):
        engine.evaluate(batch)
    batch.recon_error = torch.tensor([[2.5, 0.1, 2.0, 3.0]])
    v = engine.evaluate(batch)[0]
    assert v.action == "alert" and v.matches[0].explanation[0].token_spans == [(0, 1), (3, 4)]


def test_batch_rows_are_independent(tmp_path: Path, probe_dir: Path) -> None:
    engine = make_engine(one_rule({"feature": "a.one", "agg": "mean", "threshold": 1.0}), tmp_path)
    full, mask, comp, recon = random_inputs(7, 5, 6)
    together = engine.evaluate(full_batch(full, mask, comp, engine))
    for b in range(5):
        alone = engine.evaluate(full_batch(full[b : b + 1], mask[b : b + 1], comp[b : b + 1], engine))[0]
        assert alone.scores == together[b].scores and alone.action == together[b].action


PROBE_POLICY = {
    "rules": [
        {"id": f"{probe}", "severity": "low", "category": "alpha", "actions": ["alert"],
         "condition": {"probe": {"path": f"{probe}.json", "threshold": 0.5}}}
        for probe in ("p_mean", "p_max", "q_mean", "q_max")
    ] + [{"id": "six", "severity": "low", "category": "gamma", "actions": ["alert"],
          "condition": {"feature": "c.six", "threshold": 1.0}}],
}


PROGRAMS = ("c-twin", "numpy", "torch")


def probe_values(engine: PolicyEngine, full: torch.Tensor, mask: torch.Tensor, comp: torch.Tensor) -> dict[str, np.ndarray]:
    """Each probe leaf's value (p_mean, p_max, q_mean, q_max), from the host program's C twin, NumPy's
    and the torch program, and the incremental matcher's decisions fed the batch in two chunks
    against matched() on it."""
    batch = full_batch(full, mask, comp, engine)
    leaves = engine._feature_probes["leaves"]
    out = {}
    for name in PROGRAMS:
        engine.host_program, engine._numpy.native = name != "torch", name == "c-twin"
        value = engine._rule_tensors(batch).leaf_value
        out[name] = np.asarray(value)[:, leaves.numpy()]
    engine.host_program, engine._numpy.native = True, True
    inc = engine.incremental(full.shape[0])
    assert inc is not None
    feats, half = batch.features, full.shape[1] // 2
    inc.update(AuditBatch(feats[:, :half], mask[:, :half], comp[:, :half]))
    assert torch.equal(inc.update(AuditBatch(feats[:, half:], mask[:, half:], comp[:, half:])), engine.matched(batch))
    return out


def probe_case(probe_dir: Path) -> tuple[PolicyEngine, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
    """PROBE_POLICY's engine, three texts of six tokens (0 and 1 in scope, 5 out of it) and their probe values."""
    engine = make_engine(PROBE_POLICY, probe_dir)
    full, mask, comp, _ = random_inputs(3, 3, 6)
    mask[:, :2], mask[:, 5] = True, False
    return engine, full, mask, comp, probe_values(engine, full, mask, comp)


def assert_unread_changes_nothing(
    engine: PolicyEngine, full: torch.Tensor, mask: torch.Tensor, comp: torch.Tensor, base: dict[str, np.ndarray],
    value: float, tokens: tuple[int, ...],
) -> None:
    """c.six, which no probe reads, set to ``value`` at ``tokens``: every probe's value as in ``base``, in both programs."""
    broken = full.clone()
    for t in tokens:
        broken[:, t, FEATURES["c.six"]] = value
    got = probe_values(engine, broken, mask, comp)
    for name in PROGRAMS:
        np.testing.assert_array_equal(got[name], base[name])


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_a_probe_reads_its_own_features_only(probe_dir: Path, bad: float) -> None:
    # The probes' weights are one matrix with zeros for the features a probe does not read: a
    # non-finite feature taken as it is (0 x inf = NaN) used to make every probe's value NaN.
    engine, full, mask, comp, base = probe_case(probe_dir)
    for name in PROGRAMS:
        assert np.isfinite(base[name]).all()
    for name in ("c-twin", "numpy"):
        np.testing.assert_allclose(base[name], base["torch"], rtol=1e-5)  # they sum in other orders
    # c.six, which no probe reads, broken at a token in scope and at one out of scope.
    assert_unread_changes_nothing(engine, full, mask, comp, base, bad, (0, 5))
    # a.one, which q reads (with a positive weight) and p does not: an infinity saturates q's
    # probability (1 or 0 by its sign, mean and max pooling alike), a NaN reads as 0.
    broken = full.clone()
    broken[:, 0, FEATURES["a.one"]] = bad
    zeroed, lowered = full.clone(), full.clone()
    zeroed[:, 0, FEATURES["a.one"]] = 0.0
    lowered[:, 0, FEATURES["a.one"]] = -1.0  # below every other token's (random_inputs' are >= 0)
    want = probe_values(engine, zeroed, mask, comp)
    lowered = probe_values(engine, lowered, mask, comp)
    got = probe_values(engine, broken, mask, comp)
    for name in PROGRAMS:
        np.testing.assert_array_equal(got[name][:, :2], base[name][:, :2])  # p_mean, p_max
        if math.isnan(bad):
            np.testing.assert_array_equal(got[name][:, 2:], want[name][:, 2:])
        elif bad == math.inf:
            np.testing.assert_array_equal(got[name][:, 2:], np.ones((3, 2), dtype=np.float32))
        else:  # -inf: q_mean's mean goes to -inf; q_max pools the other tokens' max, as for any value below them
            np.testing.assert_array_equal(got[name][:, 2], np.zeros(3, dtype=np.float32))
            np.testing.assert_array_equal(got[name][:, 3], lowered[name][:, 3])
    for name in ("c-twin", "numpy"):
        np.testing.assert_allclose(got[name], got["torch"], rtol=1e-5)


@pytest.mark.parametrize("huge", [3e38, -3e38], ids=["+", "-"])
def test_a_huge_finite_feature_a_probe_does_not_read_leaves_the_probes_alone(probe_dir: Path, huge: float) -> None:
    # Finite, but two of them in one scope sum past float32's range: the NumPy program sums a
    # scope's features before the product (the torch program sums the tokens' logits), so an
    # unread feature's sum was inf there, inf x 0 = NaN, and every mean-pooled probe read 0.
    engine, full, mask, comp, base = probe_case(probe_dir)
    assert_unread_changes_nothing(engine, full, mask, comp, base, huge, (0, 1))
    # A read one reads as the bound, as an infinity of its sign does.
    broken = full.clone()
    broken[:, 0, FEATURES["a.one"]] = huge
    got = probe_values(engine, broken, mask, comp)
    broken[:, 0, FEATURES["a.one"]] = math.copysign(math.inf, huge)
    want = probe_values(engine, broken, mask, comp)
    for name in PROGRAMS:
        np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (one_rule({"feature": "a.onee", "threshold": 1.0}), "did you mean 'a.one'"),
        (one_rule({"anomaly": {"quantile": "0.5"}}), "anomaly quantile '0.5'"),
        (one_rule({"probe": {"path": "missing.json", "threshold": 0.5}}), "cannot read probe file"),
        (one_rule({"probe": {"name": "nope", "threshold": 0.5}}), "unknown library probe 'nope'"),
        (
            one_rule({"feature": "a.one", "threshold": 1.0}, actions=[{"steer": {"feature": "zz.top", "mode": "add", "value": 1.0}}]),
            "unknown feature 'zz.top'",
        ),
    ],
)
def test_compile_errors_name_the_rule(tmp_path: Path, policy: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyErrors) as info:
        make_engine(policy, tmp_path)
    (err,) = info.value.errors
    assert message in err.message and err.rule == "r"


def test_shape_errors_are_explained(tmp_path: Path) -> None:
    engine = make_engine(one_rule({"feature": "a.one", "threshold": 1.0}), tmp_path)
    with pytest.raises(ValueError, match="engine.watched"):
        engine.evaluate(AuditBatch(torch.zeros(1, 3, D_SAE), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool)))


def test_span_texts_come_from_tokens(tmp_path: Path) -> None:
    engine = make_engine(one_rule({"feature": "a.one", "threshold": 1.0}), tmp_path)
    batch = batch_from({"a.one": [0.0, 2.0, 3.0, 0.0, 1.0]}, engine)
    batch.tokens = [["<s>", "Send", " money", " now", "!"]]
    (leaf,) = engine.evaluate(batch)[0].matches[0].explanation
    assert leaf.token_spans == [(1, 3), (4, 5)] and leaf.span_texts == ["Send money", "!"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), seed=st.integers(0, 2**31 - 1))
def test_cuda_matches_cpu(probe_dir: Path, policy: dict[str, Any], seed: int) -> None:
    engine = make_engine(policy, probe_dir)
    full, mask, comp, recon = random_inputs(seed, 4, 12)
    cpu = engine.evaluate(full_batch(full, mask, comp, engine, recon))
    dev = torch.device("cuda")
    gpu = engine.evaluate(full_batch(full.to(dev), mask.to(dev), comp.to(dev), engine, recon.to(dev)))
    for a, b in zip(cpu, gpu):
        assert a.action == b.action and [m.rule_id for m in a.matches] == [m.rule_id for m in b.matches]
        assert a.scores.keys() == b.scores.keys()
        torch.testing.assert_close(torch.tensor(list(a.scores.values())), torch.tensor(list(b.scores.values())))
        assert [[e.token_spans for e in m.explanation] for m in a.matches] == [[e.token_spans for e in m.explanation] for m in b.matches]


def test_empty_texts_and_empty_policies(tmp_path: Path) -> None:
    engine = make_engine(one_rule({"feature": "a.one", "threshold": 1.0}, for_tokens=2), tmp_path)
    empty = AuditBatch(torch.zeros(2, 0, 1), torch.zeros(2, 0, dtype=torch.bool), torch.zeros(2, 0, dtype=torch.bool))
    assert [(v.action, v.scores) for v in engine.evaluate(empty)] == [("allow", {"r": 0.0})] * 2
    none = make_engine(one_rule({"feature": "a.one", "threshold": 1.0}, enabled=False), tmp_path)
    assert none.watched.numel() == 0
    (v,) = none.evaluate(AuditBatch(torch.zeros(1, 3, 0), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool)))
    assert (v.action, v.scores, v.category_scores) == ("allow", {}, {"alpha": 0.0})


def test_zero_threshold_fires_on_any_scoped_token(tmp_path: Path) -> None:
    engine = make_engine(one_rule({"feature": "a.one", "agg": "mean", "threshold": 0.0}, scope="completion"), tmp_path)
    v = engine.evaluate(batch_from({"a.one": [0.0, 0.0]}, engine, comp=[False, True]))[0]
    assert v.action == "alert" and v.scores["r"] == 1.0e6
    v = engine.evaluate(batch_from({"a.one": [0.0, 0.0]}, engine, comp=[False, False]))[0]
    assert v.action == "allow" and v.scores["r"] == 0.0


def test_steering_engine_keeps_only_rules_that_steer(tmp_path: Path) -> None:
    rules = {
        "rules": [
            {"id": "watch", "severity": "high", "category": "alpha", "condition": {"feature": "a.one", "threshold": 1.0}},
            {
                "id": "steer-b",
                "severity": "high",
                "category": "beta",
                "condition": {"feature": "b.three", "threshold": 1.0},
                "exceptions": [{"name": "calm", "condition": {"feature": "c.six", "threshold": 1.0}}],
                "actions": ["alert", {"steer": {"feature": "b.four", "mode": "clamp", "value": 0.0}}],
            },
            {
                "id": "off",
                "severity": "low",
                "category": "beta",
                "enabled": False,
                "condition": {"feature": "b.three", "threshold": 0.5},
                "actions": [{"steer": {"feature": "b.four", "mode": "scale", "value": 0.5}}],
            },
        ]
    }
    engine = make_engine(rules, tmp_path)
    sub = engine.steering_engine
    assert sub is not None and sub is engine.steering_engine  # compiled once
    assert [r.id for r in sub.compiled.rules] == ["steer-b"]
    assert sub.watched.tolist() == sorted([FEATURES["b.three"], FEATURES["c.six"]])
    cases = {"fires": ([0.0, 2.0], [0.0, 0.0]), "excepted": ([0.0, 2.0], [0.0, 3.0]), "quiet": ([0.5, 0.2], [0.0, 0.0])}
    for name, (b3, c6) in cases.items():
        full = torch.zeros(1, 2, D_SAE)
        full[0, :, FEATURES["a.one"]] = 5.0
        full[0, :, FEATURES["b.three"]] = torch.tensor(b3)
        full[0, :, FEATURES["c.six"]] = torch.tensor(c6)
        mask, comp = torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
        whole = engine.evaluate(full_batch(full, mask, comp, engine))[0]
        part = sub.evaluate(full_batch(full, mask, comp, sub))[0]
        assert [m.rule_id for m in part.matches] == [m.rule_id for m in whole.matches if m.rule_id == "steer-b"], name
        assert part.steering == whole.steering, name
        assert part.scores["steer-b"] == whole.scores["steer-b"], name
        assert "watch" in {m.rule_id for m in whole.matches}  # the full policy still sees the other rule
    no_steer = make_engine({"rules": rules["rules"][:1]}, tmp_path)
    assert no_steer.steering_engine is None
    only = make_engine({"rules": rules["rules"][1:2]}, tmp_path)
    assert only.steering_engine is only
