"""compile_layers: torch.compile'd decoder layers give the same captures, steering and cached generation."""

from __future__ import annotations

import pytest
import torch

from auditor.errors import ModelError
from auditor.models import LoadedModel, capture, compile_layers, skinny
from auditor.pipeline import Auditor
from auditor.steering import generate
from auditor.text import AuditInput
from tests.unit.steering.conftest import HOOKPOINT, make_loaded, random_sae

POINTS = [HOOKPOINT, "blocks.0.hook_mlp_out", "blocks.2.hook_attn_out", "blocks.1.hook_resid_pre"]


def _loaded(tokenizer) -> LoadedModel:  # type: ignore[no-untyped-def]
    return make_loaded(tokenizer)  # a fresh copy: compiling changes the modules in place


def _run(loaded: LoadedModel, library) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[int]]:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row
    first = capture(loaded.model, ids, mask, POINTS)
    other = capture(loaded.model, ids[:2, :6], mask[:2, :6], POINTS, stop_early=True)  # another shape, stopped early
    auditor = Auditor(loaded, random_sae(), hookpoint=HOOKPOINT, library=library)
    res = generate(auditor, AuditInput(prompt="The cat sat"), max_tokens=6, interventions=["mood.sad=add:20"])
    return first, other, res.token_ids


def test_compiled_layers_capture_steer_and_generate_like_eager(tokenizer, library) -> None:  # type: ignore[no-untyped-def]
    loaded = _loaded(tokenizer)
    # Compiled modules trace torch's products, so the eager reference runs them too (the few-row
    # kernel, auditor.models.skinny, would differ from them by float rounding).
    with skinny.suspended():
        want = _run(loaded, library)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_layers(loaded, backend="aot_eager") == 2 * loaded.n_layers
    assert compile_layers(loaded, backend="aot_eager") == 0  # already compiled
    mlp = loaded.adapter.mlp_module(loaded.model, 0)
    assert getattr(mlp, "_auditor_compiled") is True
    got = _run(loaded, library)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # compiled code ran
    for w, g in zip(want[:2], got[:2]):
        assert w.keys() == g.keys()
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=1e-5, atol=1e-5)
    assert got[2] == want[2]


def test_unknown_backend_is_refused(tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelError, match="unknown torch.compile backend 'fast'.*inductor"):
        compile_layers(_loaded(tokenizer), backend="fast")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own import
def test_inductor_compiles_on_the_cpu(tokenizer) -> None:  # type: ignore[no-untyped-def]
    loaded = _loaded(tokenizer)
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    want = capture(loaded.model, ids, torch.ones_like(ids), POINTS[:2])
    compile_layers(loaded)
    got = capture(loaded.model, ids, torch.ones_like(ids), POINTS[:2])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)
