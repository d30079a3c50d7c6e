"""Interventions are exact: the steered activation is decode(f') + (x - decode(f))."""

from __future__ import annotations

import math

import pytest
import torch

from auditor.errors import AuditorError, SteeringError
from auditor.sae import SAE
from auditor.steering import Intervention, Steerer, SteeringLimits, parse_intervention, resolve_interventions
from tests.unit.steering.conftest import D_SAE, HIDDEN, random_sae


def _acts(n: int = 40, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, HIDDEN, generator=gen) * 1.5  # [N, d_in]


def _busy_latent(sae: SAE, x: torch.Tensor) -> int:
    """A latent active on some but not all rows."""
    active = (sae.encode(x) > 0).float().mean(0)  # [d_sae]
    score = torch.where((active > 0.1) & (active < 0.9), active, torch.zeros_like(active))
    return int(score.argmax())


def _steer(sae: SAE, x: torch.Tensor, specs: list[object]):  # type: ignore[no-untyped-def]
    slots = resolve_interventions(specs, library=None, d_sae=sae.cfg.d_sae)  # type: ignore[arg-type]
    return Steerer(sae, slots).apply(x)


def _reference(sae: SAE, x: torch.Tensor, edit) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """decode(f') + (x - decode(f)) with the full-width encode and a plain edit of f."""
    f, state = sae.encode_with_norm(x)
    f2 = edit(f.clone())
    return sae.decode(f2, state) + (x - sae.decode(f, state))


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("normalize", ["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"])
def test_clamp_equals_decode_of_edited_latents_plus_error(architecture: str, normalize: str) -> None:
    sae = random_sae(architecture=architecture, normalize=normalize, tied=False, seed=3)
    x = _acts()
    i = _busy_latent(sae, x)
    out = _steer(sae, x, [f"{i}=clamp:2.5"])

    def edit(f: torch.Tensor) -> torch.Tensor:
        f[:, i] = torch.where(f[:, i] > 0, torch.full_like(f[:, i], 2.5), f[:, i])
        return f

    torch.testing.assert_close(out.x, _reference(sae, x, edit), rtol=1e-4, atol=1e-4)
    # The error term decode(f') - x' is the one of the unsteered activation.
    f, state = sae.encode_with_norm(x)
    f_steered = edit(f.clone())
    torch.testing.assert_close(out.x - sae.decode(f_steered, state), x - sae.decode(f, state), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("normalize", ["none", "expected_average_only_in"])
@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_clamp_to_zero_reencodes_to_zero_on_steered_positions(architecture: str, normalize: str) -> None:
    # Tied unit-norm SAE: <W_dec[i], W_enc[:, i]> = 1, so pre_i(x') = pre_i(x) - f_i = 0 where i was active.
    # For TopK another latent may move into the top k, but latent i's own value is relu(0) = 0.
    sae = random_sae(architecture=architecture, normalize=normalize, tied=True, seed=4)
    x = _acts(seed=2)
    i = _busy_latent(sae, x)
    before = sae.encode(x)[:, i]
    out = _steer(sae, x, [Intervention(i, "clamp", 0.0)])
    after = sae.encode(out.x)[:, i]
    active = before > 0
    assert active.any() and (~active).any()
    torch.testing.assert_close(after[active], torch.zeros_like(after[active]), rtol=0, atol=1e-5)
    # Inactive positions are untouched.
    torch.testing.assert_close(out.x[~active], x[~active])
    torch.testing.assert_close(out.features[:, 0], before)
    torch.testing.assert_close(out.steered[:, 0], torch.where(active, 0.0, before))


def test_standard_reencode_matches_plain_formula_for_untied_sae() -> None:
    # Untied: pre_i(x') = pre_i(x) + (v - f_i) <W_dec[i], W_enc[:, i]>, so re-encoding gives relu of that.
    sae = random_sae(architecture="standard", tied=False, seed=5)
    x = _acts(seed=3)
    i = _busy_latent(sae, x)
    f = sae.encode(x)[:, i]
    out = _steer(sae, x, [Intervention(i, "clamp", 0.0, positions="all")])
    pre = x @ sae.W_enc[:, i] + sae.b_enc[i]
    expected = torch.relu(pre + (0.0 - f) * (sae.W_dec[i] @ sae.W_enc[:, i]))
    torch.testing.assert_close(sae.encode(out.x)[:, i], expected, rtol=1e-4, atol=1e-5)


def test_plain_formulas_for_clamp_scale_add() -> None:
    sae = random_sae(tied=False, seed=6)
    x = _acts(seed=4)
    i = _busy_latent(sae, x)
    f = sae.encode(x)[:, i : i + 1]  # [N, 1]
    d = sae.W_dec[i]  # [d_in]
    active = f > 0
    clamp = _steer(sae, x, [Intervention(i, "clamp", 3.0)]).x
    torch.testing.assert_close(clamp, torch.where(active, x + (3.0 - f) * d, x))
    clamp_all = _steer(sae, x, [Intervention(i, "clamp", 3.0, positions="all")]).x
    torch.testing.assert_close(clamp_all, x + (3.0 - f) * d)
    scale = _steer(sae, x, [Intervention(i, "scale", 0.25)]).x
    torch.testing.assert_close(scale, x + (0.25 * f - f) * d)
    add = _steer(sae, x, [Intervention(i, "add", -4.0)]).x
    torch.testing.assert_close(add, x - 4.0 * d)
    add_active = _steer(sae, x, [Intervention(i, "add", 2.0, positions="active")]).x
    torch.testing.assert_close(add_active, torch.where(active, x + 2.0 * d, x))


def test_several_interventions_at_once_compose_in_order() -> None:
    sae = random_sae(tied=False, seed=7, normalize="expected_average_only_in")
    x = _acts(seed=5)
    i = _busy_latent(sae, x)
    j = (i + 1) % D_SAE
    out = _steer(sae, x, [f"{i}=clamp:1", f"{j}=add:2", f"{i}=scale:3"])

    def edit(f: torch.Tensor) -> torch.Tensor:
        f[:, i] = torch.where(f[:, i] > 0, torch.ones_like(f[:, i]), f[:, i]) * 3.0
        f[:, j] = f[:, j] + 2.0
        return f

    torch.testing.assert_close(out.x, _reference(sae, x, edit), rtol=1e-4, atol=1e-4)


def test_enabled_mask_switches_slots_per_row() -> None:
    sae = random_sae(seed=8)
    x = _acts(seed=6)
    slots = resolve_interventions([Intervention(3, "add", 5.0)], library=None, d_sae=D_SAE)
    enabled = torch.zeros(x.shape[0], 1, dtype=torch.bool)
    enabled[::2] = True
    out = Steerer(sae, slots).apply(x, enabled)
    torch.testing.assert_close(out.x[1::2], x[1::2])
    torch.testing.assert_close(out.x[::2], x[::2] + 5.0 * sae.W_dec[3])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("deception.fraud=clamp:0", Intervention("deception.fraud", "clamp", 0.0)),
        ("12=add:-3.5@active", Intervention(12, "add", -3.5, "active")),
        ("#7=scale:0.5", Intervention(7, "scale", 0.5)),
        ({"feature": "mood.sad", "mode": "add", "value": 4}, Intervention("mood.sad", "add", 4)),
        ({"feature": 9, "mode": "clamp", "positions": "all"}, Intervention(9, "clamp", 0.0, "all")),
        ({"feature": "20", "mode": "scale", "value": 2.0}, Intervention(20, "scale", 2.0)),
    ],
)
def test_parse_intervention_forms(spec: object, expected: Intervention, library) -> None:  # type: ignore[no-untyped-def]
    assert parse_intervention(spec, library) == expected  # type: ignore[arg-type]


def test_positions_default_by_mode() -> None:
    assert Intervention(1, "clamp", 0.0).effective_positions == "active"
    assert Intervention(1, "add", 1.0).effective_positions == "all"
    assert Intervention(1, "add", 1.0, "active").effective_positions == "active"


@pytest.mark.parametrize(
    ("specs", "limits", "message"),
    [
        (["1=add:500"], SteeringLimits(), "exceeds the limit 200"),
        (["1=clamp:-201"], SteeringLimits(), "exceeds the limit 200"),
        (["1=add:5"], SteeringLimits(max_abs_value=4.0), "exceeds the limit 4"),
        (["1=scale:11"], SteeringLimits(), "outside the allowed range [-10, 10]"),
        (["1=scale:-0.5"], SteeringLimits(min_scale=0.0), "outside the allowed range [0, 10]"),
        (["1=clamp:0", "2=clamp:0", "3=clamp:0"], SteeringLimits(max_interventions=2), "at most 2 are allowed"),
        (["9999=clamp:0"], SteeringLimits(), "out of range: the SAE has 64 latents"),
        (["deception.frud=clamp:0"], SteeringLimits(), "did you mean 'deception.fraud'"),
        (["1=nudge:3"], SteeringLimits(), "unknown steering mode 'nudge'"),
        (["1=nudge"], SteeringLimits(), "unknown steering mode 'nudge'"),
        (["1=add"], SteeringLimits(), "steering spec '1=add': mode 'add' needs a value, e.g. 1=add:8; expected"),
        (["deception.fraud=clamp"], SteeringLimits(), "mode 'clamp' needs a value, e.g. deception.fraud=clamp:0; "),
        (["#3=scale@all"], SteeringLimits(), "mode 'scale' needs a value, e.g. #3=scale:0.5; "),
        (["1=add:abc"], SteeringLimits(), "is not a number"),
        (["1=add:nan"], SteeringLimits(), "must be a finite number"),
        (["1=add:1@everywhere"], SteeringLimits(), "unknown steering positions"),
        (["no equals sign"], SteeringLimits(), "cannot parse steering spec"),
        ([{"feature": 1, "mode": "add"}], SteeringLimits(), "needs a 'value'"),
        ([{"feature": 1, "mode": "add", "value": 1, "strength": 2}], SteeringLimits(), "unknown steering field(s) strength"),
        ([{"mode": "add", "value": 1}], SteeringLimits(), "needs 'feature' and 'mode'"),
        ([3.5], SteeringLimits(), "must be an object"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_message(specs: list[object], limits: SteeringLimits, message: str, library) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SteeringError) as info:
        resolve_interventions(specs, library=library, d_sae=D_SAE, limits=limits)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert isinstance(info.value, AuditorError)


def test_names_need_a_library() -> None:
    with pytest.raises(SteeringError, match="no feature library"):
        parse_intervention("deception.fraud=clamp:0", None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_abs_value": math.inf}, "max_abs_value"), ({"min_scale": 2.0, "max_scale": 1.0}, "min_scale"), ({"max_interventions": -1}, "max_interventions")],
)
def test_limits_validate_themselves(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(SteeringError, match=message):
        SteeringLimits(**kwargs)  # type: ignore[arg-type]


def test_library_names_resolve_to_indices_and_labels(library) -> None:  # type: ignore[no-untyped-def]
    slots = resolve_interventions(["deception.fraud=clamp:0", "20=add:1", "33=add:1"], library=library, d_sae=D_SAE)
    assert [(s.index, s.label) for s in slots] == [(5, "deception.fraud"), (20, "topic.weather"), (33, "#33")]
