"""The compiler: tensors it produces, sharing of leaves and nodes, and file-based loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from sklearn.linear_model import LogisticRegression

from auditor.errors import PolicyErrors
from auditor.features.library import FeatureLibrary
from auditor.policy.compile import AGG_PROBE, AGGS, OP_ALL, OP_ANY, OP_NOT, SCOPES, compile_policy
from auditor.policy.engine import AuditBatch, load_policy, validate_files
from auditor.policy.probes import save_probe
from auditor.policy.schema import Policy

REPO = Path(__file__).resolve().parents[3]
LIB = {
    "apiVersion": "auditor/v1",
    "kind": "FeatureLibrary",
    "id": "lib",
    "sae": {"id": "s", "model": "m", "hookpoint": "blocks.0.hook_resid_post"},
    "features": [
        {"name": "x.a", "index": 30, "category": "x"},
        {"name": "x.b", "index": 4, "category": "x"},
        {"name": "x.c", "index": 12, "category": "x"},
        {"name": "y.d", "index": 4000, "category": "y"},
    ],
}


def compiled(policy: dict[str, Any], base_dir: Path = Path(".")) -> Any:
    data = {"apiVersion": "auditor/v1", "kind": "Policy", "metadata": {"name": "p"}, "library": "lib", **policy}
    return compile_policy(Policy.model_validate(data), FeatureLibrary.model_validate(LIB), base_dir=base_dir)


def rule(rid: str, condition: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": rid, "severity": "low", "category": "x", "condition": condition, **extra}


def test_leaf_tensors_and_watched_columns() -> None:
    c = compiled(
        {
            "rules": [
                rule("one", {"features": ["x.a", "y.d", "x.b"], "agg": "count_above", "above": 0.5, "threshold": 2.0}, scope="prompt"),
                rule("two", {"feature": "x.c", "agg": "mean", "threshold": 1.5}),
            ]
        }
    )
    assert c.watched.tolist() == [4, 12, 30, 4000]
    assert c.watched.dtype == torch.long
    pad = c.pad_column
    assert pad == 5 and c.recon_column == 4
    # Group columns: positions of 4, 30, 4000 in watched, padded to the widest leaf.
    assert c.leaf_columns.tolist() == [[0, 2, 3], [1, pad, pad]]
    assert c.leaf_agg.tolist() == [AGGS.index("count_above"), AGGS.index("mean")]
    torch.testing.assert_close(c.leaf_above, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(c.leaf_threshold, torch.tensor([2.0, 1.5]))
    assert c.leaf_scope.tolist() == [SCOPES.index("prompt"), SCOPES.index("any")]
    assert c.rule_node.tolist() == [0, 1]  # single-leaf rules point straight at their leaf
    assert not c.needs_recon_error and not c.needs_resid


def test_identical_leaves_and_subtrees_are_shared_per_scope() -> None:
    leaf = {"feature": "x.a", "threshold": 1.0}
    other = {"feature": "x.b", "agg": "mean", "threshold": 2.0}
    c = compiled(
        {
            "macros": {"m": {"any": [leaf, {"not": other}]}},
            "rules": [
                rule("r1", {"all": [{"macro": "m"}, leaf]}),
                rule("r2", {"all": [{"macro": "m"}, leaf]}),  # same tree: same nodes
                rule("r3", {"macro": "m"}, scope="completion"),  # same macro, other scope: new leaves
                rule("r4", {"all": [leaf]}),  # a one-child all is its child
            ]
        }
    )
    assert len(c.leaves) == 4
    assert [(l.name, l.scope) for l in c.leaves] == [("x.a", "any"), ("x.b", "any"), ("x.a", "completion"), ("x.b", "completion")]
    r1, r2, r3, r4 = c.rule_node.tolist()
    assert r1 == r2 and r3 != r1 and r4 == 0
    assert c.rules[0].leaves == (0, 1)
    ops = sorted((g.op, g.out.numel()) for g in c.groups)
    # not(x.b) twice, any(...) twice, one all(...)
    assert ops == [(OP_ALL, 1), (OP_ANY, 2), (OP_NOT, 2)]
    ready = set(range(c.const_false + 1))  # leaves and the two constants
    for g in c.groups:  # every group reads only nodes that earlier groups computed
        assert set(g.children.flatten().tolist()) <= ready
        ready |= set(g.out.tolist())
    assert ready == set(range(c.n_nodes))


def test_disabled_rules_and_their_features_are_compiled_out() -> None:
    c = compiled(
        {
            "rules": [
                rule("on", {"feature": "x.a", "threshold": 1.0}),
                rule("off", {"feature": "y.d", "threshold": 1.0}, enabled=False),
            ]
        }
    )
    assert [r.id for r in c.rules] == ["on"] and c.watched.tolist() == [30]


def test_probe_leaves_read_their_features_in_coef_order(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    x, y = g.normal(size=(50, 2)), g.integers(0, 2, 50)
    save_probe(LogisticRegression().fit(x, y), tmp_path / "p.json", features=["y.d", "x.b"], pool="max")
    c = compiled({"rules": [rule("p", {"probe": {"path": "p.json", "threshold": 0.5}})]}, tmp_path)
    (leaf,) = c.leaves
    assert leaf.kind == "probe" and leaf.latents == (4000, 4) and c.leaf_agg.tolist() == [AGG_PROBE]
    assert c.watched.tolist() == [4, 4000]


def test_all_compile_problems_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(PolicyErrors) as info:
        compiled(
            {
                "rules": [
                    rule("a", {"feature": "x.zz", "threshold": 1.0}),
                    rule("b", {"probe": {"path": "nope.json", "threshold": 0.5}}),
                    rule("c", {"anomaly": {"quantile": "0.99"}}),
                ]
            },
            tmp_path,
        )
    assert [e.rule for e in info.value.errors] == ["a", "b", "c"]


def test_hookpoint_probe_end_to_end(tmp_path: Path) -> None:
    """A policy file with a hookpoint probe reproduces sklearn on the pooled residual stream."""
    g = np.random.default_rng(1)
    d_in = 6
    x, y = g.normal(size=(80, d_in)), g.integers(0, 2, 80)
    clf = LogisticRegression().fit(x, y)
    save_probe(clf, tmp_path / "probes" / "resid.json", inputs="hookpoint", pool="mean")
    (tmp_path / "library.yaml").write_text(yaml.safe_dump(LIB))
    (tmp_path / "policy.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "auditor/v1",
                "kind": "Policy",
                "metadata": {"name": "resid"},
                "library": "library.yaml",
                "rules": [rule("resid", {"probe": {"path": "probes/resid.json", "threshold": 0.5}}, scope="completion")],
            }
        )
    )
    engine = load_policy(tmp_path / "policy.yaml")
    assert engine.needs_resid and engine.watched.numel() == 0
    resid = torch.from_numpy(g.normal(size=(3, 5, d_in)))
    mask = torch.tensor([[True] * 5, [False, True, True, True, False], [True] * 5])
    comp = torch.tensor([[False, False, True, True, True]] * 3)
    batch = AuditBatch(torch.zeros(3, 5, 0), mask, comp, resid=resid.float())
    verdicts = engine.evaluate(batch)
    scoped = (mask & comp).double().unsqueeze(-1)
    pooled = (resid * scoped).sum(1) / scoped.sum(1)
    want = clf.predict_proba(pooled.numpy())[:, 1]
    got = torch.tensor([v.scores["resid"] * 0.5 for v in verdicts], dtype=torch.float64)
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-5, atol=1e-6)
    assert [v.action == "alert" for v in verdicts] == list(want >= 0.5)


def test_example_policies_load_and_evaluate() -> None:
    files = sorted((REPO / "policies" / "examples").glob("*.yaml"))
    assert files and validate_files(files) == []
    for f in files:
        engine = load_policy(f)
        assert len(engine.hash) == 64
        b, t = 2, 6
        acts = torch.zeros(b, t, engine.watched.numel())
        recon = torch.zeros(b, t) if engine.needs_recon_error else None
        verdicts = engine.evaluate(AuditBatch(acts, torch.ones(b, t, dtype=torch.bool), torch.zeros(b, t, dtype=torch.bool), recon_error=recon))
        assert [v.action for v in verdicts] == ["allow", "allow"]


def test_example_deception_policy_fires_and_steers() -> None:
    engine = load_policy(REPO / "policies" / "examples" / "deception.yaml")
    names = [engine.library.name_for_index(i) for i in engine.watched.tolist()]
    t = 6
    acts = torch.zeros(1, t, len(names))
    acts[0, 2:5, names.index("deception.fraud")] = 5.0  # three completion tokens, above 4.0
    comp = torch.tensor([[False, False, True, True, True, True]])
    (v,) = engine.evaluate(AuditBatch(acts, torch.ones(1, t, dtype=torch.bool), comp))
    assert "fraud-completion" in [m.rule_id for m in v.matches] and v.action == "block"
    assert any(s.feature == "deception.fraud" and s.mode == "clamp" for s in v.steering)
    # The hash covers the policy content: same file, same hash.
    assert load_policy(REPO / "policies" / "examples" / "deception.yaml").hash == engine.hash


def test_validate_files_reports_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "library.yaml").write_text(yaml.safe_dump(LIB))
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: auditor/v1\nkind: Policy\nmetadata: {name: bad}\nlibrary: library.yaml\n"
        "rules:\n  - id: r\n    severity: low\n    category: x\n    condition: {feature: x.q, threshold: 1.0}\n"
    )
    (err,) = validate_files([bad])
    assert err.path.endswith("bad.yaml") and err.line == 9 and "x.q" in err.message
    with pytest.raises(PolicyErrors):
        load_policy(bad)
