"""The evaluation's host program (``auditor.policy._host``, ``PolicyEngine.host_program``): NumPy's,
and its C twin (``_host.c``), which runs where the kernel library builds.

On a CPU, batches of up to ``MAX_ELEMENTS`` feature values go through it. Both must give what the
torch program gives: every node and rule score, every leaf's value and decision, the per-token
holds behind explanations and ``for_tokens`` runs, the matched rules (exceptions included), on
random policies of every kind of leaf and on activations with NaN and infinities. The reference
test in ``test_engine.py`` runs against the programs as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditor.models import skinny
from auditor.policy import _host
from auditor.policy.engine import AuditBatch, PolicyEngine
from tests.unit.policy.test_graphs import same_verdicts
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


def both(engine: PolicyEngine, batch: AuditBatch, native: bool = True) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The rule tensors of ``batch`` from the host program (its C twin where ``native`` and the
    kernel library builds, else NumPy's) and from the torch program."""
    engine.host_program = True
    engine._numpy.native = native
    host = engine._rule_tensors(batch)
    engine.host_program = False
    ref = engine._rule_tensors(batch)
    engine.host_program = True
    engine._numpy.native = True
    c_twin = native and isinstance(engine._numpy._native, _host._NativeProgram)
    assert c_twin == (native and skinny.library() is not None)
    assert isinstance(host.score, torch.Tensor if c_twin else np.ndarray) and isinstance(ref.score, torch.Tensor)
    assert (host.rows is not None) == c_twin
    return host, ref


def assert_same(engine: PolicyEngine, batch: AuditBatch, native: bool = True) -> None:
    host, ref = both(engine, batch, native)
    for got, want in [(host.nodes, ref.nodes), (host.score, ref.score), (host.leaf_value, ref.leaf_value)]:
        torch.testing.assert_close(torch.as_tensor(got), want, equal_nan=True)
    assert np.array_equal(np.asarray(host.leaf_fired), ref.leaf_fired.numpy())
    assert np.array_equal(host.holds.get(), ref.holds.get().numpy())
    if host.rows is not None:  # the rule scores, then each exception's node score (then more)
        exc = engine._tensors(torch.device("cpu"))["exc_node"]
        want_rows = torch.cat([host.score, host.nodes[:, exc]], dim=1)
        assert torch.equal(host.rows[:, : want_rows.shape[1]], want_rows)
    engine.host_program = False
    want_matched = engine.matched(batch)
    engine.host_program = True
    engine._numpy.native = native
    assert torch.equal(engine.matched(batch), want_matched)
    engine._numpy.native = True


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
    batch = full_batch(full, mask, comp, engine, recon)
    assert_same(engine, batch, native=True)  # C where the policy allows
    assert_same(engine, batch, native=False)


def without_for_tokens(policy: dict[str, Any]) -> dict[str, Any]:
    return {**policy, "rules": [{k: v for k, v in rule.items() if k != "for_tokens"} for rule in policy["rules"]]}


@pytest.mark.parametrize("for_tokens", [True, False], ids=["for-tokens", "no-for-tokens"])
def test_a_policy_of_every_kind_on_texts_of_every_shape(probe_dir: Path, for_tokens: bool) -> None:
    # With a for_tokens rule the C twin computes the per-token holds as it evaluates; without,
    # it keeps copies of the inputs to compute them from when an explanation is read.
    engine = make_engine(POLICY if for_tokens else without_for_tokens(POLICY), probe_dir)
    matched = 0
    for seed, (bsz, t) in enumerate([(1, 1), (1, 30), (4, 7), (2, 0), (3, 64)]):
        full, mask, comp, recon = continuous_inputs(seed, bsz, t, nan=seed == 2)
        batch = full_batch(full, mask, comp, engine, recon)
        assert_same(engine, batch)
        assert_same(engine, batch, native=False)
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
    c_twin = skinny.library() is not None
    assert isinstance(engine._rule_tensors(batch), _host.NativeRun) is c_twin
    engine._numpy.native = False
    assert isinstance(engine._rule_tensors(batch).score, np.ndarray)
    # Past NumPy's limit: the C twin still (it spreads rows over threads), else torch.
    monkeypatch.setattr("auditor.policy.engine.HOST_MAX_ELEMENTS", batch.features.numel() - 1)
    r = engine._rule_tensors(batch)
    assert not isinstance(r, _host.NativeRun) and isinstance(r.score, torch.Tensor)
    engine._numpy.native = True
    assert isinstance(engine._rule_tensors(batch), _host.NativeRun) is c_twin
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


@pytest.mark.parametrize("native", [True, False], ids=["c-twin", "numpy"])
@pytest.mark.parametrize("only_any", [False, True], ids=["three-scopes", "any-scope"])
def test_explanations_read_the_batch_as_it_was_evaluated(probe_dir: Path, only_any: bool, native: bool) -> None:
    # Explanations are built on first read, maybe long after the evaluation; a caller may have
    # written its next batch into the same tensors by then. The torch program's per-token values
    # are its own copy; the host program's must be too: the features, and the content mask, which
    # is the scope mask itself when every rule reads the "any" scope. (No for_tokens rule: its runs
    # would compute the holds during the evaluation.)
    rules = without_for_tokens(POLICY)["rules"]
    engine = make_engine({**POLICY, "rules": rules[:1] if only_any else rules}, probe_dir)
    assert (engine._numpy.scopes == (0,)) is only_any
    engine._numpy.native = native
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
    assert isinstance(engine._numpy._native, _host._NativeProgram) is (native and skinny.library() is not None)


@pytest.mark.parametrize("for_tokens", [True, False], ids=["for-tokens", "no-for-tokens"])
@pytest.mark.parametrize("t", [0, 5])
def test_a_batch_of_no_rows(probe_dir: Path, t: int, for_tokens: bool) -> None:
    # Every kind of leaf, groups, an exception (and a for_tokens rule): no verdict, no decision, no error.
    engine = make_engine(POLICY if for_tokens else without_for_tokens(POLICY), probe_dir)
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


@pytest.mark.parametrize("program", ["c-twin", "numpy", "torch"])
def test_a_batch_without_roles(probe_dir: Path, program: str) -> None:
    # A policy that reads only the "any" scope decides the same without roles (the pipeline then
    # skips computing them); one that reads a prompt or completion scope says it needs them.
    any_only = make_engine({**POLICY, "rules": POLICY["rules"][:1]}, probe_dir)
    any_only.host_program = program != "torch"
    any_only._numpy.native = program == "c-twin"
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


def test_the_default_policy_runs_in_the_c_twin() -> None:
    # The shipped policy (probes, an anomaly leaf, groups, no for_tokens rule) on activations of
    # every size the pipeline sends it: its C twin's verdicts, explanations included, are the
    # NumPy and the torch programs' verdicts.
    from auditor.policy import load_policy

    if skinny.library() is None:
        pytest.skip(f"the kernel library does not run here: {skinny.status()['detail']}")
    engine = load_policy(Path(__file__).resolve().parents[3] / "policies" / "default.yaml")
    g = torch.Generator().manual_seed(0)
    n_matched = 0
    for bsz, t in [(1, 21), (8, 30), (32, 54)]:
        # Sparse, as an SAE's codes are, large enough here and there to fire the probes.
        feats = torch.rand(bsz, t, engine.watched.numel(), generator=g) * (torch.rand(bsz, t, engine.watched.numel(), generator=g) < 0.08) * 40
        mask = torch.rand(bsz, t, generator=g) > 0.1
        batch = AuditBatch(feats, mask, None, recon_error=torch.rand(bsz, t, generator=g) * 30)
        assert isinstance(engine._rule_tensors(batch), _host.NativeRun)
        got = engine.evaluate(batch)
        engine._numpy.native = False
        numpy_program = engine.evaluate(batch)
        engine._numpy.native, engine.host_program = True, False
        torch_program = engine.evaluate(batch)
        engine.host_program = True
        # Decisions, spans and fired leaves equal; scores to float rounding (a probe's far-off
        # probability, ~1e-7, differs in its last bits between any two of the programs).
        same_verdicts(torch_program, got)
        same_verdicts(numpy_program, got)
        n_matched += sum(len(v.matches) for v in got)
    assert n_matched > 0  # the comparison saw rules match, explanations built


def test_inputs_the_c_twin_cannot_read_go_to_numpy(probe_dir: Path) -> None:
    # A strided view (a caller's transposed tensor, say) is read by NumPy, with the same result.
    engine = make_engine(without_for_tokens(POLICY), probe_dir)
    full, mask, comp, recon = continuous_inputs(4, 3, 10, nan=False)
    feats = full[..., engine.watched].transpose(1, 2).contiguous().transpose(1, 2)
    assert not feats.is_contiguous()
    batch = AuditBatch(feats, mask, comp, recon_error=recon)
    assert isinstance(engine._rule_tensors(batch).score, np.ndarray)
    assert isinstance(engine._rule_tensors(AuditBatch(feats.contiguous(), mask, comp, recon_error=recon)), _host.NativeRun)
    got = engine.evaluate(batch)
    assert any(v.matches for v in got)
    engine.host_program = False
    same_verdicts(engine.evaluate(batch), got)


@pytest.mark.parametrize("for_tokens", [True, False], ids=["for-tokens", "no-for-tokens"])
def test_a_large_batch_split_over_threads(probe_dir: Path, for_tokens: bool) -> None:
    # Past 2^16 feature values the C twin's rows are split over OpenMP threads (every core
    # torch uses), past NumPy's limit too: the same numbers as the torch program's.
    engine = make_engine(POLICY if for_tokens else without_for_tokens(POLICY), probe_dir)
    full, mask, comp, recon = continuous_inputs(9, 9, 3000, nan=True)
    batch = full_batch(full, mask, comp, engine, recon)
    assert batch.features.numel() > max(1 << 16, _host.MAX_ELEMENTS)
    assert_same(engine, batch)
    got = engine.evaluate(batch)
    assert any(v.matches for v in got)
    engine.host_program = False
    same_verdicts(engine.evaluate(batch), got)


def test_a_reconstruction_error_the_policy_does_not_read(probe_dir: Path) -> None:
    # Without an anomaly leaf the engine neither checks nor reads recon_error: a tensor of any
    # shape passed along changes nothing (the C twin is not handed it).
    engine = make_engine(without_for_tokens(POLICY), probe_dir)
    assert not engine.needs_recon_error
    full, mask, comp, _ = continuous_inputs(6, 2, 2000, nan=False)
    feats = full[..., engine.watched]
    got = engine.evaluate(AuditBatch(feats, mask, comp, recon_error=torch.zeros(1)))
    assert isinstance(engine._rule_tensors(AuditBatch(feats, mask, comp, recon_error=torch.zeros(1))), _host.NativeRun) is (
        skinny.library() is not None
    )
    engine.host_program = False
    same_verdicts(engine.evaluate(AuditBatch(feats, mask, comp)), got)


def test_torch_defaults_do_not_reach_the_c_twins_buffer(probe_dir: Path) -> None:
    # A caller's torch.set_default_dtype(float64) must not make the C twin write float32 numbers
    # into a float64 buffer (verdicts read garbage).
    engine = make_engine(POLICY, probe_dir)
    full, mask, comp, recon = continuous_inputs(8, 3, 12, nan=False)
    batch = full_batch(full, mask, comp, engine, recon)
    want = engine.evaluate(batch)
    assert any(v.matches for v in want)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = engine.evaluate(batch)
    finally:
        torch.set_default_dtype(previous)
    same_verdicts(want, got)
