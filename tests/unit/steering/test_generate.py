"""Generation with steering: KV cache equals recomputation, policy-triggered steering, compare mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from auditor.errors import ConfigError
from auditor.models import hooks
from auditor.pipeline import Auditor
from auditor.steering import Intervention, Steerer, generate, resolve_interventions
from auditor.steering.generate import prompt_for_generation
from auditor.text import AuditInput, tokenize_batch
from tests.unit.steering.conftest import HOOKPOINT

PROMPT = "The cat sat on the mat and"


def _recompute_greedy(auditor: Auditor, item: AuditInput, specs: list[object], n: int) -> list[int]:
    """Reference: no KV cache; the whole sequence is run again, steered at every position, for each token."""
    tok = auditor.model.tokenizer
    slots = resolve_interventions(specs, library=auditor.library, d_sae=auditor.sae.cfg.d_sae)  # type: ignore[arg-type]
    steerer = Steerer(auditor.sae, slots)

    def hook(t: torch.Tensor, *, hook: object) -> torch.Tensor:
        return steerer.apply(t.reshape(-1, t.shape[-1])).x.view_as(t)

    batch = tokenize_batch(tok, [prompt_for_generation(item)])
    ids = batch.input_ids[0].tolist()
    out: list[int] = []
    with torch.inference_mode(), hooks(auditor.model.model, {HOOKPOINT: hook}):
        for _ in range(n):
            logits = auditor.model.model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return out


@pytest.mark.parametrize(
    "specs",
    [
        [],
        ["deception.fraud=clamp:0"],
        ["topic.weather=add:6", "mood.sad=scale:3"],
        [Intervention(11, "clamp", 4.0, positions="all")],
    ],
)
def test_kv_cache_generation_equals_recomputation(auditor: Auditor, specs: list[object]) -> None:
    item = AuditInput(prompt=PROMPT)
    result = generate(auditor, item, max_tokens=12, interventions=specs)
    assert result.token_ids == _recompute_greedy(auditor, item, specs, 12)
    assert result.steered == bool(specs)


def test_steering_changes_the_completion_and_compare_returns_both(auditor: Auditor) -> None:
    item = AuditInput(prompt=PROMPT)
    plain = generate(auditor, item, max_tokens=10)
    steered = generate(auditor, item, max_tokens=10, interventions=["topic.weather=add:25"], compare=True)
    assert steered.default_text == plain.text
    assert steered.text != plain.text
    assert steered.steered and not plain.steered
    n = len(steered.tokens)
    assert set(steered.feature_traces) == {"topic.weather"}
    assert len(steered.feature_traces["topic.weather"]) == n
    assert len(steered.default_traces["topic.weather"]) == len(steered.default_tokens)  # type: ignore[index]
    # After `add`, the latent's value at the hookpoint is the measured one plus the coefficient.
    for before, after in zip(steered.feature_traces["topic.weather"], steered.steered_traces["topic.weather"]):
        assert after == pytest.approx(before + 25.0, abs=1e-3)
    assert steered.interventions == ["topic.weather=add:25@all"]
    assert steered.finish_reason in ("stop", "length")


def test_clamp_zero_trace_after_intervention_is_zero(auditor: Auditor) -> None:
    # Pick a latent that is active along the default completion, then clamp it.
    item = AuditInput(prompt=PROMPT)
    probe = generate(auditor, item, max_tokens=10, interventions=[Intervention(i, "add", 0.0) for i in range(0, 64, 8)])
    busy = max(probe.feature_traces, key=lambda k: sum(v > 0 for v in probe.feature_traces[k]))
    assert sum(v > 0 for v in probe.feature_traces[busy]) > 0
    res = generate(auditor, item, max_tokens=10, interventions=[f"{busy.lstrip('#')}=clamp:0"], compare=True)
    assert all(v == 0.0 for v in res.steered_traces[busy])


def test_chat_messages_use_the_chat_template(auditor: Auditor) -> None:
    item = AuditInput(messages=({"role": "user", "content": "Hi"},))
    res = generate(auditor, item, max_tokens=4)
    rendered = auditor.model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert res.prompt_tokens == len(auditor.model.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_stop_strings_and_length(auditor: Auditor) -> None:
    item = AuditInput(prompt=PROMPT)
    natural = generate(auditor, item, max_tokens=30)
    n = len(natural.tokens) - 1
    assert n >= 6
    full = generate(auditor, item, max_tokens=n)
    assert full.finish_reason == "length" and len(full.tokens) == n
    assert full.token_ids == natural.token_ids[:n]
    stop = full.text[4:6]
    cut = generate(auditor, item, max_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_sampling_is_repeatable_with_a_seed(auditor: Auditor) -> None:
    item = AuditInput(prompt=PROMPT)
    a = generate(auditor, item, max_tokens=8, temperature=1.0, seed=3)
    b = generate(auditor, item, max_tokens=8, temperature=1.0, seed=3)
    assert a.text == b.text


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5])
def test_temperature_must_be_finite_and_not_negative(auditor: Auditor, temperature: float) -> None:
    with pytest.raises(ConfigError, match=r"temperature must be a finite number >= 0 \(0 is greedy\)"):
        generate(auditor, AuditInput(prompt=PROMPT), max_tokens=2, temperature=temperature)


def _policy(tmp_path: Path, library_path: Path, threshold: float, scope: str = "completion") -> Path:
    path = tmp_path / "steer.yaml"
    path.write_text(
        f"""apiVersion: auditor/v1
kind: Policy
metadata: {{name: steer-test}}
library: {library_path}
rules:
  - id: weather-steer
    severity: medium
    category: topic
    scope: {scope}
    condition: {{feature: topic.weather, agg: max, threshold: {threshold}}}
    actions:
      - alert
      - steer: {{feature: mood.sad, mode: add, value: 30.0}}
"""
    )
    return path


def test_policy_steer_switches_on_after_the_rule_fires(auditor: Auditor, tmp_path: Path, library_path: Path) -> None:
    from auditor.policy import load_policy

    item = AuditInput(prompt=PROMPT)
    base = generate(auditor, item, max_tokens=12, interventions=[Intervention("topic.weather", "add", 0.0)])
    trace = base.feature_traces["topic.weather"]
    # A threshold the completion crosses at a known token (not the first one).
    firing = next(i for i, v in enumerate(trace) if i >= 2 and v > 0)
    threshold = max(trace[: firing + 1]) if max(trace[:firing]) < trace[firing] else None
    if threshold is None:
        pytest.skip("the random model's trace does not rise at a usable token")
    engine = load_policy(_policy(tmp_path, library_path, threshold))
    res = generate(auditor, item, max_tokens=12, policy=engine, compare=True)
    assert [t.rule_id for t in res.triggered] == ["weather-steer"]
    trig = res.triggered[0]
    assert trig.token == firing
    assert trig.interventions == ["mood.sad=add:30@all"]
    assert res.steered
    # Before the firing token nothing is steered, so the completions agree up to and including it.
    assert res.tokens[: firing + 1] == res.default_tokens[: firing + 1]  # type: ignore[index]
    after = res.steered_traces["mood.sad"]
    before = res.feature_traces["mood.sad"]
    assert all(a == pytest.approx(b) for a, b in zip(after[:firing], before[:firing]))
    assert all(a == pytest.approx(b + 30.0, abs=1e-3) for a, b in zip(after[firing:], before[firing:]))
    assert res.verdict is not None and [m.rule_id for m in res.verdict.matches] == ["weather-steer"]


def test_policy_that_never_fires_does_not_steer(auditor: Auditor, tmp_path: Path, library_path: Path) -> None:
    from auditor.policy import load_policy

    engine = load_policy(_policy(tmp_path, library_path, 1.0e6))
    item = AuditInput(prompt=PROMPT)
    res = generate(auditor, item, max_tokens=6, policy=engine)
    assert res.triggered == [] and not res.steered
    assert res.verdict is not None and res.verdict.action == "allow"
    assert res.text == generate(auditor, item, max_tokens=6).text


def test_generation_holds_the_model_lock_and_removes_its_hook(auditor: Auditor) -> None:
    from auditor.steering.generate import model_lock

    model = auditor.model.model
    lock = model_lock(model)
    assert model_lock(model) is lock
    seen: list[bool] = []

    def observe(t: torch.Tensor, *, hook: object) -> None:
        seen.append(lock.locked())

    with hooks(model, {"blocks.0.hook_resid_post": observe}):
        generate(auditor, AuditInput(prompt=PROMPT), max_tokens=2, interventions=["5=add:1"])
    assert seen and all(seen) and not lock.locked()
    assert not model.model.layers[1]._forward_hooks
