"""attach(): hooks on a user's own model, verdicts during model.generate, steering, clean removal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import auditor
from auditor.errors import ConfigError, SteeringError
from auditor.pipeline import Auditor
from auditor.steering import attach, generate
from auditor.steering.generate import prompt_for_generation
from auditor.text import AuditInput, tokenize_batch
from tests.unit.steering.conftest import HOOKPOINT, random_sae

PROMPT = "The cat sat on the mat and"


def _prompt_ids(tokenizer) -> torch.Tensor:  # type: ignore[no-untyped-def]
    batch = tokenize_batch(tokenizer, [prompt_for_generation(AuditInput(prompt=PROMPT))])
    return batch.input_ids  # [1, P]


def _hf_generate(model, tokenizer, ids: torch.Tensor, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def _policy(tmp_path: Path, library_path: Path, threshold: float) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(
        f"""apiVersion: auditor/v1
kind: Policy
metadata: {{name: attach-test}}
library: {library_path}
rules:
  - id: weather
    severity: low
    category: topic
    scope: completion
    condition: {{feature: topic.weather, agg: max, threshold: {threshold}}}
    actions:
      - alert
      - steer: {{feature: mood.sad, mode: add, value: 30.0}}
"""
    )
    return path


def test_attach_is_exported_lazily() -> None:
    assert auditor.attach is attach


def test_verdicts_during_generate_match_the_generate_function(auditor: Auditor, tmp_path: Path, library_path: Path) -> None:
    from auditor.policy import load_policy

    engine = load_policy(_policy(tmp_path, library_path, 0.05))
    model, tok = auditor.model.model, auditor.model.tokenizer
    ids = _prompt_ids(tok)
    ref = generate(auditor, AuditInput(prompt=PROMPT), max_tokens=8, policy=engine)
    with attach(model, tok, sae=auditor.sae, policy=engine) as session:
        got = _hf_generate(model, tok, ids, 8)
        verdict = session.last_verdict
        triggered = session.triggered
    assert got == ref.token_ids
    assert verdict is not None and ref.verdict is not None
    assert [m.rule_id for m in verdict.matches] == [m.rule_id for m in ref.verdict.matches]
    assert [(t.rule_id, t.token) for t in triggered] == [(t.rule_id, t.token) for t in ref.triggered]
    assert verdict.scores["weather"] == pytest.approx(ref.verdict.scores["weather"], rel=1e-4)


def test_session_steering_equals_generate_and_hooks_are_removed(auditor: Auditor) -> None:
    model, tok = auditor.model.model, auditor.model.tokenizer
    ids = _prompt_ids(tok)
    plain = _hf_generate(model, tok, ids, 8)
    ref = generate(auditor, AuditInput(prompt=PROMPT), max_tokens=8, interventions=["topic.weather=add:25"])
    with attach(model, tok, sae=auditor.sae, library=auditor.library) as session:
        session.steer("topic.weather=add:25")
        steered = _hf_generate(model, tok, ids, 8)
        assert session.last_verdict is None  # no policy
        feats = session.features()
        assert feats is not None and session.latents == [20]
        session.clear_steering()
        assert _hf_generate(model, tok, ids, 8) == plain
    assert steered == ref.token_ids != plain
    layer = model.model.layers[1]
    assert not layer._forward_hooks and not layer._forward_pre_hooks and not model._forward_pre_hooks
    assert _hf_generate(model, tok, ids, 8) == plain


def test_hooks_are_removed_when_the_block_raises(auditor: Auditor) -> None:
    model = auditor.model.model
    with pytest.raises(RuntimeError, match="boom"):
        with attach(model, auditor.model.tokenizer, sae=auditor.sae):
            raise RuntimeError("boom")
    assert not model.model.layers[1]._forward_hooks and not model._forward_pre_hooks


def test_attach_refuses_bad_setups(auditor: Auditor, tmp_path: Path) -> None:
    model, tok = auditor.model.model, auditor.model.tokenizer
    from auditor.policy import load_policy
    from tests.unit.pipeline.test_fit import _library, _policy as _fit_policy

    _library(tmp_path, d_sae=auditor.sae.cfg.d_sae + 1, hookpoint=HOOKPOINT)
    other = load_policy(_fit_policy(tmp_path, "{feature: deception.fraud, threshold: 1.0}"))
    with pytest.raises(ConfigError, match="which describes an SAE with"):  # a policy for another SAE
        attach(model, tok, sae=auditor.sae, policy=other)
    with pytest.raises(ConfigError, match="needs an SAE"):
        attach(model, tok)
    with pytest.raises(ConfigError, match="hidden size"):
        attach(model, tok, sae=random_sae(d_in=16))
    with attach(model, tok, sae=auditor.sae) as session:
        with pytest.raises(SteeringError, match="no feature library"):
            session.steer("topic.weather=add:1")
        with pytest.raises(SteeringError, match="exceeds the limit"):
            session.steer("3=add:1000")


def test_hookpoint_override(auditor: Auditor) -> None:
    model, tok = auditor.model.model, auditor.model.tokenizer
    with attach(model, tok, sae=auditor.sae, hookpoint="blocks.0.hook_resid_post") as session:
        assert session.hookpoint == "blocks.0.hook_resid_post"
        assert model.model.layers[0]._forward_hooks
    assert HOOKPOINT != session.hookpoint
