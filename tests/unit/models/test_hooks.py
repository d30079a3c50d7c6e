from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from auditor.errors import HookpointError
from auditor.models.adapters import ArchitectureAdapter, get_adapter
from auditor.models.hookpoints import Hookpoint
from auditor.models.hooks import hooks

from .conftest import LAYERS, build_model


def _hook_counts(model: nn.Module) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def _run(model: nn.Module, input_ids: torch.Tensor) -> Any:
    with torch.inference_mode():
        return model(input_ids=input_ids, use_cache=False, output_hidden_states=True)


def _all_names() -> list[str]:
    kinds = ("resid_pre", "attn_out", "mlp_out", "resid_post")
    return [f"blocks.{layer}.hook_{kind}" for layer in range(LAYERS) for kind in kinds]


def _observe(model: nn.Module, input_ids: torch.Tensor, names: list[str]) -> tuple[dict[str, torch.Tensor], Any]:
    seen: dict[str, torch.Tensor] = {}

    def keep(tensor: torch.Tensor, *, hook: Hookpoint) -> None:
        seen[hook.name] = tensor.clone()

    with hooks(model, {name: keep for name in names}):
        out = _run(model, input_ids)
    return seen, out


def test_resid_matches_output_hidden_states(model: nn.Module, input_ids: torch.Tensor) -> None:
    seen, out = _observe(model, input_ids, _all_names())
    hidden = out.hidden_states  # LAYERS + 1 tensors [B, T, d]
    assert len(hidden) == LAYERS + 1
    for layer in range(LAYERS):
        torch.testing.assert_close(seen[f"blocks.{layer}.hook_resid_pre"], hidden[layer])
    for layer in range(LAYERS - 1):
        torch.testing.assert_close(seen[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1])
    # Hugging Face replaces the last hidden state by last_hidden_state, taken after the
    # final norm; resid_post of the last layer is the residual stream before that norm.
    last = seen[f"blocks.{LAYERS - 1}.hook_resid_post"]
    with torch.inference_mode():
        torch.testing.assert_close(get_adapter(model).final_norm(model)(last), hidden[-1])
    assert not torch.allclose(last, hidden[-1])


def test_resid_post_is_resid_pre_plus_attn_out_plus_mlp_out(model: nn.Module, input_ids: torch.Tensor) -> None:
    # Holds for every supported family: Gemma2/3 hook the post-attention / post-feedforward
    # norms (the tensors actually added), GPT-NeoX adds both outputs to resid_pre in the
    # parallel form and chains them in the sequential one.
    seen, _ = _observe(model, input_ids, _all_names())
    for layer in range(LAYERS):
        pre, post = seen[f"blocks.{layer}.hook_resid_pre"], seen[f"blocks.{layer}.hook_resid_post"]
        attn, mlp = seen[f"blocks.{layer}.hook_attn_out"], seen[f"blocks.{layer}.hook_mlp_out"]
        torch.testing.assert_close(post, pre + attn + mlp, rtol=1e-5, atol=1e-5)
        assert attn.abs().max() > 1e-3 and mlp.abs().max() > 1e-3


def test_gemma_resid_pre_includes_embedding_scale(input_ids: torch.Tensor) -> None:
    from .conftest import build_model

    model = build_model("gemma2")
    seen, _ = _observe(model, input_ids, ["blocks.0.hook_resid_pre"])
    raw = model.model.embed_tokens.weight[input_ids]  # [B, T, d]
    scale = torch.tensor(model.config.hidden_size**0.5)
    torch.testing.assert_close(seen["blocks.0.hook_resid_pre"], raw * scale)


def test_zeroing_resid_post_changes_logits_and_equals_zeroing_next_resid_pre(
    model: nn.Module, input_ids: torch.Tensor
) -> None:
    def zero(tensor: torch.Tensor, *, hook: Hookpoint) -> torch.Tensor:
        return torch.zeros_like(tensor)

    clean = _run(model, input_ids).logits
    with hooks(model, {"blocks.0.hook_resid_post": zero}):
        after_post = _run(model, input_ids).logits
    with hooks(model, {"blocks.1.hook_resid_pre": zero}):
        after_pre = _run(model, input_ids).logits
    assert not torch.allclose(clean, after_post)
    torch.testing.assert_close(after_post, after_pre)


def test_replacing_attn_and_mlp_out_propagates(model: nn.Module, input_ids: torch.Tensor) -> None:
    seen: dict[str, torch.Tensor] = {}

    def zero(tensor: torch.Tensor, *, hook: Hookpoint) -> torch.Tensor:
        return torch.zeros_like(tensor)

    def keep(tensor: torch.Tensor, *, hook: Hookpoint) -> None:
        seen[hook.name] = tensor.clone()

    spec = [
        ("blocks.1.hook_resid_pre", keep),
        ("blocks.1.hook_attn_out", zero),
        ("blocks.1.hook_mlp_out", zero),
        ("blocks.1.hook_resid_post", keep),
    ]
    with hooks(model, spec):
        _run(model, input_ids)
    # With both sub-blocks zeroed the layer passes its input through unchanged.
    torch.testing.assert_close(seen["blocks.1.hook_resid_post"], seen["blocks.1.hook_resid_pre"])


def test_hooks_on_one_point_chain_in_order(model: nn.Module, input_ids: torch.Tensor) -> None:
    seen: list[torch.Tensor] = []

    def double(tensor: torch.Tensor, *, hook: Hookpoint) -> torch.Tensor:
        return tensor * 2

    def keep(tensor: torch.Tensor, *, hook: Hookpoint) -> None:
        seen.append(tensor.clone())

    name = "blocks.1.hook_resid_pre"
    with hooks(model, [(name, keep), (name, double), (name, keep)]):
        _run(model, input_ids)
    torch.testing.assert_close(seen[1], seen[0] * 2)


def test_hooks_removed_after_block_and_on_exception(model: nn.Module, input_ids: torch.Tensor) -> None:
    _run(model, input_ids)  # transformers installs its own output-recording hooks once
    before = _hook_counts(model)
    calls: list[str] = []

    def count(tensor: torch.Tensor, *, hook: Hookpoint) -> None:
        calls.append(hook.name)

    names = _all_names()
    with hooks(model, {name: count for name in names}):
        assert _hook_counts(model) != before
        _run(model, input_ids)
    assert _hook_counts(model) == before
    assert sorted(calls) == sorted(names)

    with pytest.raises(RuntimeError, match="boom"):
        with hooks(model, {name: count for name in names}):
            raise RuntimeError("boom")
    assert _hook_counts(model) == before

    def fail(tensor: torch.Tensor, *, hook: Hookpoint) -> None:
        raise ValueError("inside the forward")

    with pytest.raises(ValueError, match="inside the forward"):
        with hooks(model, {"blocks.1.hook_mlp_out": fail}):
            _run(model, input_ids)
    assert _hook_counts(model) == before
    calls.clear()
    _run(model, input_ids)
    assert calls == []


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("blocks.1.resid_post", "accepted forms: blocks.<layer>.hook_resid_pre"),
        (f"blocks.{LAYERS}.hook_resid_post", rf"which has {LAYERS} layers \(valid layers: 0\.\.{LAYERS - 1}\)"),
    ],
)
def test_bad_hookpoint_installs_nothing(model: nn.Module, name: str, match: str) -> None:
    before = _hook_counts(model)

    def noop(tensor: torch.Tensor, *, hook: Hookpoint) -> None:
        return None

    with pytest.raises(HookpointError, match=match):
        with hooks(model, {"blocks.0.hook_resid_post": noop, name: noop}):
            pass
    assert _hook_counts(model) == before


def test_wrong_shape_replacement_is_an_error(model: nn.Module, input_ids: torch.Tensor) -> None:
    def truncate(tensor: torch.Tensor, *, hook: Hookpoint) -> torch.Tensor:
        return tensor[..., :-1]

    with pytest.raises(HookpointError, match=r"blocks\.0\.hook_mlp_out must return None or a tensor of shape"):
        with hooks(model, {"blocks.0.hook_mlp_out": truncate}):
            _run(model, input_ids)


class _KeywordLayer(nn.Module):
    """A layer called with ``hidden_states=`` by keyword, as some callers do."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Linear(4, 4)

    def forward(self, *, hidden_states: torch.Tensor, scale: float) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(hidden_states)
        return hidden_states + self.mlp(hidden_states) * scale


class _KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", hidden_size=4)
        self.layers = nn.ModuleList([_KeywordLayer(), _KeywordLayer()])
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(hidden_states=x, scale=0.5)
        return x


def test_resid_pre_replacement_with_keyword_hidden_states() -> None:
    torch.manual_seed(0)
    model = _KeywordModel().eval()
    adapter = ArchitectureAdapter("Toy", ("toy",), ("layers",), "attn", "mlp", ("norm",))
    x = torch.randn(2, 3, 4)  # [B, T, d]

    def zero(tensor: torch.Tensor, *, hook: Hookpoint) -> torch.Tensor:
        return torch.zeros_like(tensor)

    with torch.inference_mode():
        with hooks(model, {"blocks.1.hook_resid_pre": zero}, adapter=adapter):
            out = model(x)
        expected = model.layers[1](hidden_states=torch.zeros_like(x), scale=0.5)
    torch.testing.assert_close(out, expected)


def _in_thread(fn: Any, *, isolated: bool) -> Any:
    """``fn()`` on a fresh thread (isolated for hooks or not); its result or exception."""
    import threading

    from auditor.models.hooks import isolate_this_thread

    out: dict[str, Any] = {}

    def run() -> None:
        if isolated:
            isolate_this_thread()
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.parametrize("kind", ["resid_pre", "resid_post", "mlp_out"])
def test_isolated_threads_see_only_their_own_hooks(kind: str, input_ids: torch.Tensor) -> None:
    import threading

    from auditor.models.hooks import isolate_this_thread

    model = build_model("llama")
    plain = _run(model, input_ids).logits
    name = f"blocks.1.hook_{kind}"
    installed, release = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def steering_worker() -> None:
        # An isolated worker holds a zeroing hook while another isolated worker runs forwards.
        isolate_this_thread()
        with hooks(model, {name: lambda t, *, hook: torch.zeros_like(t)}):
            installed.set()
            release.wait(30)
            seen["own"] = _run(model, input_ids).logits

    t = threading.Thread(target=steering_worker)
    t.start()
    assert installed.wait(30)
    try:
        # Another isolated worker, and this (ordinary) thread, run past the isolated hook.
        torch.testing.assert_close(_in_thread(lambda: _run(model, input_ids).logits, isolated=True), plain)
        torch.testing.assert_close(_run(model, input_ids).logits, plain)
    finally:
        release.set()
        t.join()
    assert not torch.allclose(seen["own"], plain)  # the worker's own forward is steered

    # An ordinary thread's hooks keep module semantics for ordinary threads (a generation on a
    # helper thread is still steered) but not for isolated workers.
    with hooks(model, {name: lambda t, *, hook: torch.zeros_like(t)}):
        torch.testing.assert_close(_in_thread(lambda: _run(model, input_ids).logits, isolated=False), seen["own"])
        torch.testing.assert_close(_in_thread(lambda: _run(model, input_ids).logits, isolated=True), plain)
    assert _hook_counts(model) == _hook_counts(build_model("llama"))


def test_hook_fires_here_follows_the_thread_rule() -> None:
    from auditor.models.hooks import hook_fires_here, isolate_this_thread, scoped

    def raw(*args: object) -> None:
        return None

    mine = scoped(raw, this_thread=True)
    shared = scoped(raw)
    assert hook_fires_here(raw) and hook_fires_here(mine) and hook_fires_here(shared)
    seen: dict[str, bool] = {}

    def elsewhere() -> None:
        seen["mine"], seen["shared"], seen["raw"] = hook_fires_here(mine), hook_fires_here(shared), hook_fires_here(raw)
        isolate_this_thread()  # an isolated thread skips hooks installed for every thread
        seen["shared_isolated"] = hook_fires_here(shared)

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert seen == {"mine": False, "shared": True, "raw": True, "shared_isolated": False}
