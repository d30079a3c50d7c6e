"""The evaluation's NumPy twin (``auditor.policy._host``, ``PolicyEngine.host_program``).

On a CPU, batches of up to ``MAX_ELEMENTS`` feature values go through it. It must give what the
torch program gives: every node and rule score, every leaf's value and decision, the per-token
holds behind explanations and ``for_tokens`` runs, the matched rules (exceptions included), on
random policies of every kind of leaf and on activations with NaN and infinities. The reference
test in ``test_engine.py`` runs against both programs as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditor.policy import _host
from auditor.policy.engine import AuditBatch, PolicyEngine
from tests.unit.policy.test_engine import full_batch, make_engine, policies, probe_dir, random_inputs  # noqa: F401

POLICY = {
    "lists": {"grp": ["a.one", "b.three"]},
    "rules": [
        {"id": "peak", "severity": "high", "category": "alpha", "actions": ["block"],
         "condition": {"any": [{"list": "grp", "threshold": 2.0}, {"probe": {"path": "p_max.json", "threshold": 0.5}}]},
         "exceptions": [{"name": "calm", "condition": {"feature": "c.six", "agg": "mean", "threshold": 1.0}}]},
        {"id": "steady", "severity": "low", "category": "beta", "scope": "completion", "for_tokens": 2,
         "condition": {"all": [{"feature": "a.two", "threshold": 0.5}, {"not": {"feature": "b.four", "threshold": 2.5}}]}},
        {"id": "often", "severity": "low", "category": "beta", "scope": "prompt",
         "condition": {"features": ["c.five", "a.one"], "agg": "fraction_above", "above": 0.5, "threshold": 0.3}},
    ],
}


def both(engine: PolicyEngine, batch: AuditBatch) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The rule tensors of ``batch`` from the host program and from the torch program."""
    engine.host_program = True
    host = engine._rule_tensors(batch)
    engine.host_program = False
    ref = engine._rule_tensors(batch)
    engine.host_program = True
    assert isinstance(host.score, np.ndarray) and isinstance(ref.score, torch.Tensor)
    return host, ref


def assert_same(engine: PolicyEngine, batch: AuditBatch) -> None:
    host, ref = both(engine, batch)
    for got, want in [(host.nodes, ref.nodes), (host.score, ref.score), (host.leaf_value, ref.leaf_value)]:
        torch.testing.assert_close(torch.from_numpy(got), want, equal_nan=True)
    assert np.array_equal(host.leaf_fired, ref.leaf_fired.numpy())
    assert np.array_equal(host.holds.get(), ref.holds.get().numpy())
    engine.host_program = False
    want_matched = engine.matched(batch)
    engine.host_program = True
    assert torch.equal(engine.matched(batch), want_matched)


def continuous_inputs(seed: int, bsz: int, t: int, nan: bool) -> tuple[torch.Tensor, ...]:
    """Activations of any value (sums round), a NaN or an infinity here and there."""
    full, mask, comp, recon = random_inputs(seed, bsz, t)
    g = np.random.default_rng(seed + 1)
    full = full + torch.from_numpy(g.random(full.shape, dtype=np.float32)) * (full > 0)
    if nan and full.numel():
        b, t_, f = (int(g.integers(n)) for n in full.shape)
        full[b, t_, f] = float("nan")
        b, t_, f = (int(g.integers(n)) for n in full.shape)
        full[b, t_, f] = float("inf")
        # -inf in another feature column than +inf's (or another row): a feature probe reads
        # +-inf as +-bound, and where one feature holds both in one scope, the two programs sum
        # them in different orders (features first, or each token's logit), so what is left of the
        # other tokens' values differs (a known limit: before the bound both gave NaN, counted as 0).
        b2, t2 = int(g.integers(full.shape[0])), int(g.integers(full.shape[1]))
        f2 = (f + 1 + int(g.integers(full.shape[2] - 1))) % full.shape[2] if b2 == b else int(g.integers(full.shape[2]))
        full[b2, t2, f2] = float("-inf")
    return full, mask, comp, recon


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), seed=st.integers(0, 2**31 - 1), bsz=st.integers(1, 5), t=st.integers(1, 12), nan=st.booleans())
def test_the_host_program_gives_the_torch_programs_numbers(
    probe_dir: Path, policy: dict[str, Any], seed: int, bsz: int, t: int, nan: bool
) -> None:
    engine = make_engine(policy, probe_dir)
    full, mask, comp, recon = continuous_inputs(seed, bsz, t, nan)
    assert_same(engine, full_batch(full, mask, comp, engine, recon))


def test_a_policy_of_every_kind_on_texts_of_every_shape(probe_dir: Path) -> None:
    engine = make_engine(POLICY, probe_dir)
    matched = 0
    for seed, (bsz, t) in enumerate([(1, 1), (1, 30), (4, 7), (2, 0), (3, 64)]):
        full, mask, comp, recon = continuous_inputs(seed, bsz, t, nan=seed == 2)
        batch = full_batch(full, mask, comp, engine, recon)
        assert_same(engine, batch)
        verdicts = engine.evaluate(batch)
        matched += sum(len(v.matches) for v in verdicts)
        engine.host_program = False
        want = engine.evaluate(batch)
        engine.host_program = True
        assert [v.to_dict() for v in verdicts] == [v.to_dict() for v in want]  # explanations and spans too
    assert matched > 0  # the comparison saw rules match, explanations built


def test_large_batches_and_gradients_stay_with_torch(probe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(POLICY, probe_dir)
    full, mask, comp, recon = continuous_inputs(7, 4, 16, nan=False)
    batch = full_batch(full, mask, comp, engine, recon)
    assert isinstance(engine._rule_tensors(batch).score, np.ndarray)
    monkeypatch.setattr("auditor.policy.engine.HOST_MAX_ELEMENTS", batch.features.numel() - 1)
    assert isinstance(engine._rule_tensors(batch).score, torch.Tensor)
    monkeypatch.undo()
    engine.host_program = False
    assert isinstance(engine._rule_tensors(batch).score, torch.Tensor)
    assert _host.MAX_ELEMENTS >= 32 * 27 * 75  # the default policy's batches of 32 short texts


def test_evaluate_outside_inference_mode_and_with_grad(probe_dir: Path) -> None:
    engine = make_engine(POLICY, probe_dir)
    full, mask, comp, recon = continuous_inputs(3, 2, 9, nan=False)
    feats = full[..., engine.watched].clone().requires_grad_(True)  # a caller's training graph
    got = engine.evaluate(AuditBatch(feats, mask, comp, recon_error=recon))
    want = engine.evaluate(full_batch(full, mask, comp, engine, recon))
    assert [v.to_dict() for v in got] == [v.to_dict() for v in want]
    assert not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("only_any", [False, True], ids=["three-scopes", "any-scope"])
def test_explanations_read_the_batch_as_it_was_evaluated(probe_dir: Path, only_any: bool) -> None:
    # Explanations are built on first read, maybe long after the evaluation; a caller may have
    # written its next batch into the same tensors by then. The torch program's per-token values
    # are its own copy; the host program's must be too: the features, and the content mask, which
    # is the scope mask itself when every rule reads the "any" scope. (No for_tokens rule: its runs
    # would compute the holds during the evaluation.)
    rules = [{k: v for k, v in rule.items() if k != "for_tokens"} for rule in POLICY["rules"]]
    engine = make_engine({**POLICY, "rules": rules[:1] if only_any else rules}, probe_dir)
    assert (engine._numpy.scopes == (0,)) is only_any
    full, mask, comp, _ = continuous_inputs(5, 3, 20, nan=False)
    feats = full[..., engine.watched].contiguous()
    want = [v.to_dict() for v in engine.evaluate(AuditBatch(feats.clone(), mask.clone(), comp))]
    assert any(v["matches"] for v in want)
    verdicts = engine.evaluate(AuditBatch(feats, mask, comp))
    pending = engine.decide(AuditBatch(feats, mask, comp))
    feats.zero_()  # the next batch, written over this one
    mask.fill_(True)
    assert [v.to_dict() for v in verdicts] == want
    assert [v.to_dict() for v in pending.verdicts()] == want


@pytest.mark.parametrize("t", [0, 5])
def test_a_batch_of_no_rows(probe_dir: Path, t: int) -> None:
    # Every kind of leaf, groups, an exception and a for_tokens rule: no verdict, no decision, no error.
    engine = make_engine(POLICY, probe_dir)
    none = torch.zeros(0, t, dtype=torch.bool)
    batch = AuditBatch(torch.zeros(0, t, engine.watched.numel()), none, none)
    assert engine.evaluate(batch) == []
    assert engine.matched(batch).shape == (0, len(engine.compiled.rules))
    # Both programs agree, probes included.
    assert_same(engine, batch)
    engine.host_program = False
    assert engine.evaluate(batch) == []


def test_the_steering_engine_keeps_the_setting(probe_dir: Path) -> None:
    # What generation evaluates while decoding is the same policy: an engine told to leave the
    # host program off must not have it back in its steering rules' engine.
    steer = {"steer": {"feature": "a.one", "mode": "clamp", "value": 0.0}}
    rules = [{**POLICY["rules"][0], "actions": ["alert", steer]}, *POLICY["rules"][1:]]
    engine = make_engine({**POLICY, "rules": rules}, probe_dir)
    engine.host_program, engine.graph_max_tokens = False, 4096
    sub = engine.steering_engine
    assert sub is not None and sub is not engine and sub.host_program is False
    assert sub.graph_max_tokens == 4096  # the CUDA graphs' size limit too
    full, mask, comp, _ = continuous_inputs(2, 2, 6, nan=False)
    batch = full_batch(full, mask, comp, sub)
    assert isinstance(sub._rule_tensors(batch).score, torch.Tensor)


@pytest.mark.parametrize("host_program", [True, False], ids=["numpy", "torch"])
def test_a_batch_without_roles(probe_dir: Path, host_program: bool) -> None:
    # A policy that reads only the "any" scope decides the same without roles (the pipeline then
    # skips computing them); one that reads a prompt or completion scope says it needs them.
    any_only = make_engine({**POLICY, "rules": POLICY["rules"][:1]}, probe_dir)
    any_only.host_program = host_program
    assert not any_only.reads_roles
    full, mask, comp, recon = continuous_inputs(11, 3, 14, nan=False)
    feats = full[..., any_only.watched]
    want = [v.to_dict() for v in any_only.evaluate(AuditBatch(feats, mask, comp))]
    assert any(v["matches"] for v in want)
    assert [v.to_dict() for v in any_only.evaluate(AuditBatch(feats, mask, None))] == want
    assert torch.equal(any_only.matched(AuditBatch(feats, mask, None)), any_only.matched(AuditBatch(feats, mask, comp)))
    assert any_only.evaluate(AuditBatch(feats[:, :0], mask[:, :0], None))[0].action == "allow"  # empty texts

    scoped = make_engine(POLICY, probe_dir)
    assert scoped.reads_roles
    with pytest.raises(ValueError, match="completion-scoped rules: is_completion"):
        scoped.evaluate(AuditBatch(full[..., scoped.watched], mask, None))
