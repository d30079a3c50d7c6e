"""IncrementalMatcher: chunk by chunk, the same rule decisions as matched() on everything so far."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from auditor.policy import AuditBatch
from tests.unit.policy.test_engine import make_engine, one_rule, policies, probe_dir, random_inputs  # noqa: F401


def _chunks(t: int, seed: int) -> list[tuple[int, int]]:
    """Random cut points of ``[0, t)``: the first chunk is a prefill, the rest mostly single positions."""
    g = np.random.default_rng(seed)
    cuts = sorted({0, t, *[int(x) for x in g.integers(1, max(t, 2), size=g.integers(0, t + 1))]})
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _sub(x: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    return None if x is None else x[:, a:b]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), seed=st.integers(0, 2**31 - 1), bsz=st.integers(1, 3), t=st.integers(1, 12))
def test_incremental_equals_matched_on_the_prefix(probe_dir: Path, policy: dict[str, Any], seed: int, bsz: int, t: int) -> None:
    engine = make_engine(policy, probe_dir)
    inc = engine.incremental(bsz)
    assume(inc is not None)  # hookpoint probes: not incremental
    assert inc is not None
    full, mask, comp, recon = random_inputs(seed, bsz, t)
    feats = full[:, :, engine.watched]
    recon_in = recon if engine.needs_recon_error else None
    for a, b in _chunks(t, seed):
        got = inc.update(AuditBatch(feats[:, a:b], mask[:, a:b], comp[:, a:b], is_prompt=~comp[:, a:b], recon_error=_sub(recon_in, a, b)))
        prefix = AuditBatch(feats[:, :b], mask[:, :b], comp[:, :b], is_prompt=~comp[:, :b], recon_error=_sub(recon_in, 0, b))
        want = engine.matched(prefix)
        if not torch.equal(got, want):
            # Only a feature probe's pooled logit (summed in another order) may land on the other
            # side of its threshold, and only within rounding of it.
            score = engine._rule_tensors(prefix).score
            differ = got != want
            assert ((score[differ] - 1.0).abs() < 1e-4).all(), (a, b, got, want, score)


def test_for_tokens_runs_carry_across_chunks(tmp_path: Path) -> None:
    engine = make_engine(one_rule({"feature": "a.one", "threshold": 1.0}, for_tokens=3), tmp_path)
    inc = engine.incremental(1)
    assert inc is not None
    col = [int(i) for i in engine.watched.tolist()].index(engine.library.feature("a.one").index)
    values = [2.0, 0.0, 2.0, 2.0, 2.0, 0.0]  # the 3-token run spans chunks [2, 3) and [3, 5)
    seen = []
    for a, b in [(0, 2), (2, 3), (3, 5), (5, 6)]:
        f = torch.zeros(1, b - a, engine.watched.numel())
        f[0, :, col] = torch.tensor(values[a:b])
        ones = torch.ones(1, b - a, dtype=torch.bool)
        seen.append(bool(inc.update(AuditBatch(f, ones, ones, is_prompt=~ones))[0, 0]))
    assert seen == [False, False, True, True]
    # An empty chunk keeps the decision.
    empty = torch.zeros(1, 0, dtype=torch.bool)
    assert bool(inc.update(AuditBatch(torch.zeros(1, 0, engine.watched.numel()), empty, empty, is_prompt=empty))[0, 0])


def test_hookpoint_probes_are_not_incremental(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    from auditor.policy.probes import save_probe

    g = np.random.default_rng(1)
    clf = LogisticRegression().fit(g.normal(size=(40, 6)), g.integers(0, 2, 40))
    save_probe(clf, tmp_path / "resid.json", inputs="hookpoint", pool="mean")
    engine = make_engine(one_rule({"probe": {"path": "resid.json", "threshold": 0.5}}), tmp_path)
    assert engine.needs_resid and engine.incremental(2) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), seed=st.integers(0, 2**31 - 1))
def test_incremental_on_cuda_equals_matched_on_cpu(probe_dir: Path, policy: dict[str, Any], seed: int) -> None:
    engine = make_engine(policy, probe_dir)
    dev = torch.device("cuda")
    inc = engine.incremental(3, dev)
    assume(inc is not None)
    assert inc is not None
    full, mask, comp, recon = random_inputs(seed, 3, 10)
    feats = full[:, :, engine.watched]
    recon_in = recon if engine.needs_recon_error else None
    for a, b in _chunks(10, seed):
        got = inc.update(
            AuditBatch(feats[:, a:b].to(dev), mask[:, a:b].to(dev), comp[:, a:b].to(dev), is_prompt=~comp[:, a:b].to(dev),
                       recon_error=None if recon_in is None else recon_in[:, a:b].to(dev))
        )
        assert got.device.type == "cuda"
        prefix = AuditBatch(feats[:, :b], mask[:, :b], comp[:, :b], is_prompt=~comp[:, :b], recon_error=_sub(recon_in, 0, b))
        want = engine.matched(prefix)
        differ = got.cpu() != want
        if differ.any():
            score = engine._rule_tensors(prefix).score
            assert ((score[differ] - 1.0).abs() < 1e-4).all(), (a, b, got, want, score)
