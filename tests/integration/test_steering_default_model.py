"""Steering on the real default model: SmolLM2-135M-Instruct with its layer-15 TopK SAE."""

from __future__ import annotations

import pytest
import torch

from auditor.models import capture, hooks
from auditor.steering import Intervention, Steerer, generate, resolve_interventions
from auditor.text import AuditInput, tokenize_batch

pytestmark = pytest.mark.integration

TEXT = "Send me your bank password right now or your account will be closed."


@pytest.fixture(scope="module")
def auditor(default_model):  # type: ignore[no-untyped-def]
    from auditor.features import load_library
    from auditor.pipeline import DEFAULT_LIBRARY, Auditor
    from auditor.sae import load_sae

    lib = load_library(DEFAULT_LIBRARY)
    return Auditor(default_model, load_sae(str(lib.resolve_path(lib.sae.path)), dtype=torch.float32), library=lib)


def test_clamp_to_zero_drives_the_latent_to_zero_and_keeps_the_error(auditor) -> None:  # type: ignore[no-untyped-def]
    sae, hook = auditor.sae, auditor.hookpoint
    batch = tokenize_batch(auditor.model.tokenizer, [AuditInput(text=TEXT)])
    x = auditor.activations(batch)[0]  # [T, d_in]
    content = batch.content_mask[0]
    f = sae.encode(x)
    # The latent active on the most content tokens (not everywhere, so both cases are checked).
    counts = (f[content] > 0).sum(0)
    i = int(torch.where(counts < int(content.sum()), counts, torch.zeros_like(counts)).argmax())
    active = f[:, i] > 0
    assert int((active & content).sum()) >= 2

    slots = resolve_interventions([Intervention(i, "clamp", 0.0)], library=None, d_sae=sae.cfg.d_sae)
    steerer = Steerer(sae, slots)

    def steer(t: torch.Tensor, *, hook: object) -> torch.Tensor:
        return steerer.apply(t.reshape(-1, t.shape[-1])).x.view_as(t)

    with hooks(auditor.model.model, {hook: steer}):
        # capture() records after the installed steering hook: the activation the model continues from.
        x_steered = capture(auditor.model.model, batch.input_ids, batch.attention_mask, [hook])[hook][0]
    f_after = sae.encode(x_steered)[:, i]
    steered_pos = active & content
    torch.testing.assert_close(f_after[steered_pos], torch.zeros_like(f_after[steered_pos]), rtol=0, atol=1e-3)
    torch.testing.assert_close(x_steered[~active], x[~active])
    # Error term: x' - decode(f with latent i zeroed) == x - decode(f).
    f_edit, state = sae.encode_with_norm(x)
    err = x - sae.decode(f_edit, state)
    f_edit[:, i] = torch.where(active, 0.0, f_edit[:, i])
    torch.testing.assert_close(x_steered - sae.decode(f_edit, state), err, rtol=1e-4, atol=2e-3)


def test_short_steered_generation(auditor) -> None:  # type: ignore[no-untyped-def]
    item = AuditInput(messages=({"role": "user", "content": "Write one sentence about the sea."},))
    res = generate(auditor, item, max_tokens=8, interventions=["2230=add:30"], compare=True)
    assert len(res.tokens) >= 1 and res.default_text is not None
    assert res.text != res.default_text
    # The key is the library's name for latent 2230 once it is labelled, else "#2230".
    [(label, trace)] = res.feature_traces.items()
    after = res.steered_traces[label]
    assert len(trace) == len(res.tokens)
    assert all(a == pytest.approx(b + 30.0, abs=1e-2) for a, b in zip(after, trace))
