"""Streamed forwards of Llama-family models on a few tokens, without ``transformers``' layer code.

A streamed audit runs the model on each chunk of about 16 new tokens. On a CPU the products of
such a forward take the few-row kernel about half of its time (:mod:`auditor.models.skinny`);
most of the other half went to ``transformers``' decoder layers: some thirty small torch
operations a layer (norms, the rotary embedding, the cache writes, attention, SiLU), each a few
microseconds of dispatch on a [16, 576] tensor, and modules' calls around them. Here each layer is
the same arithmetic in about fourteen calls of that kernel library: two RMS norms, the seven
products (the residual additions done by the output products in place), the rotary embedding,
one attention call per stream over its :class:`~auditor.models.streams.StreamCache`, and
``silu(gate) * up``.

Used by :func:`~auditor.models.streams.capture_streams` for forwards of at most
:data:`~auditor.models.skinny.MAX_ROWS` new tokens, when all of these hold (else the
``transformers`` forward runs, as before):

* the model is a float32 CPU model of a family whose decoder layer is exactly this one
  (``llama``, ``mistral``, ``qwen2``: pre-norm RMSNorm, rotary embedding by halves, grouped-query
  causal attention, a SiLU-gated MLP) with plain causal attention, in eval mode;
* the few-row kernel is built and loaded here;
* no hook would fire in this thread's forward (a user's hook, or a steering hook installed
  by this thread, runs only in the ``transformers`` forward);
* :func:`supported` found this path's activations equal to :func:`~auditor.models.capture.capture`'s
  (checked once per model and hookpoint on short random sequences). ``AUDITOR_LEAN_LAYERS=0``
  turns it off.

Results equal ``transformers``' to float rounding (another summation order in the attention
and the products, as the kernel's own).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from auditor.models import skinny
from auditor.models.adapters import ArchitectureAdapter
from auditor.models.hookpoints import Hookpoint

__all__ = ["available", "capture_lean", "plan", "supported"]

_ENV = "AUDITOR_LEAN_LAYERS"
_FAMILIES = {"llama", "mistral", "qwen2"}
_lock = threading.Lock()
_verified: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


class _Layer(NamedTuple):
    norm1: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    norm2: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    scaling: float


class Plan(NamedTuple):
    """The modules a lean forward reads (their weights are read at each call, never copied)."""

    embed: nn.Module
    rotary: nn.Module
    layers: list[_Layer]
    heads: int
    kv_heads: int
    head_dim: int


def _off() -> bool:
    return os.environ.get(_ENV, "1").strip().lower() in {"0", "false", "no", "off"}


def plan(model: nn.Module, adapter: ArchitectureAdapter) -> Plan | None:
    """The modules of ``model``'s layers for a lean forward, or None where its architecture is not one this path computes."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in _FAMILIES:
        return None
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "attention_dropout", 0.0):
        return None
    from auditor.models.streams import _plain_causal

    if not _plain_causal(config):
        return None
    inner = getattr(model, "model", None)
    embed, rotary = getattr(inner, "embed_tokens", None), getattr(inner, "rotary_emb", None)
    if not isinstance(embed, nn.Embedding) or rotary is None:
        return None
    layers = []
    try:
        modules = adapter.layers(model)
    except Exception:
        return None
    for layer in modules:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        if attn is None or mlp is None or any(type(n).__name__ not in {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"} for n in norms):
            return None
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return None
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(p) is not nn.Linear for p in projections):
            return None
        scaling = getattr(attn, "scaling", None)
        if not isinstance(scaling, float):
            return None
        layers.append(_Layer(norms[0], *projections[:4], norms[1], *projections[4:], scaling))  # type: ignore[arg-type]
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or (config.hidden_size // max(heads, 1)))
    if not layers or heads <= 0 or kv_heads <= 0 or heads % kv_heads or head_dim % 8:
        return None
    first = layers[0]
    if first.q.out_features != heads * head_dim or first.k.out_features != kv_heads * head_dim:
        return None
    return Plan(embed, rotary, layers, heads, kv_heads, head_dim)


def _hooks_fire(modules: Sequence[nn.Module]) -> bool:
    """Whether a forward hook on any of ``modules`` (or a global one) would run in this thread's forward."""
    from auditor.models.hooks import hook_fires_here

    g = nn.modules.module
    for table in (g._global_forward_hooks, g._global_forward_pre_hooks, g._global_backward_hooks):
        if table:
            return True
    for module in modules:
        for table in (module._forward_hooks, module._forward_pre_hooks):
            if any(hook_fires_here(h) for h in table.values()):
                return True
    return False


def _tensors_ok(p: Plan, layers: int) -> bool:
    """Float32, contiguous CPU weights in every module the forward reads (the kernels take raw pointers)."""
    tensors: list[torch.Tensor | None] = [p.embed.weight]
    for layer in p.layers[:layers]:
        tensors += [layer.norm1.weight, layer.norm2.weight]
        for lin in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down):
            tensors += [lin.weight, lin.bias]
    return all(
        t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())
        for t in tensors
    )


def available(model: nn.Module, adapter: ArchitectureAdapter, points: Sequence[Hookpoint], rows: int) -> Plan | None:
    """The plan when a lean forward of ``rows`` tokens may run now (see the module's docstring), else None."""
    if _off() or skinny.is_suspended() or not 0 < rows <= skinny.MAX_ROWS or model.training:
        return None
    if skinny.library() is None:
        return None
    found = getattr(model, "_auditor_lean_plan", False)
    if found is False:
        found = plan(model, adapter)
        try:
            model._auditor_lean_plan = found  # type: ignore[assignment]
        except Exception:
            return None
    if found is None:
        return None
    depth = max(p.layer for p in points) + 1
    if depth > len(found.layers) or not _tensors_ok(found, depth):
        return None
    modules: list[nn.Module] = [model, getattr(model, "model"), found.embed, found.rotary]
    for layer in adapter.layers(model)[:depth]:
        modules.extend(layer.modules())
    if _hooks_fire(modules):
        return None
    return found


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@torch.inference_mode()
def capture_lean(
    model: nn.Module,
    p: Plan,
    points: Sequence[Hookpoint],
    caches: Sequence[Any],
    spans: Sequence[tuple[int, int]],
    ids: torch.Tensor,
    positions: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The streams' forward (see :func:`~auditor.models.streams.capture_streams`); each hookpoint's ``[1, N, d]``.

    ``ids`` and ``positions`` are ``[N]`` (all streams' new tokens, end to end); ``spans[i]`` is
    stream ``i``'s slice of them and ``caches[i]`` its cache, which gets the new keys and values
    (its ``length`` is left to the caller). Stops after the deepest hookpoint.
    """
    fns = skinny.library()
    assert fns is not None
    threads = torch.get_num_threads()
    n = int(ids.shape[0])
    wanted = {(pt.layer, pt.kind): pt.name for pt in points}
    deepest = max(pt.depth for pt in points)
    out: dict[str, torch.Tensor] = {}

    def record(layer: int, kind: str, t: torch.Tensor) -> bool:
        name = wanted.get((layer, kind))
        if name is not None:
            out[name] = t.clone()[None]
        return name is not None and Hookpoint(layer, kind).depth == deepest  # type: ignore[arg-type]

    x = p.embed(ids).contiguous()  # [N, d]
    cos, sin = p.rotary(x[None], positions[None])
    cos, sin = cos[0].float().contiguous(), sin[0].float().contiguous()  # [N, head_dim]
    d = x.shape[1]
    hq, kv, hd = p.heads, p.kv_heads, p.head_dim
    h = torch.empty_like(x)
    attn = x.new_empty((n, hq * hd))
    total = max(c.length + (b - a) for c, (a, b) in zip(caches, spans))
    scratch = x.new_empty((threads, total))
    like = x.new_empty((1, kv, 0, hd))

    def linear(lin: nn.Linear, src: torch.Tensor, dst: torch.Tensor | None = None) -> torch.Tensor:
        """``src @ lin.weight.T + lin.bias``, or added into ``dst`` in place."""
        w = lin.weight
        target = dst if dst is not None else src.new_empty((src.shape[0], w.shape[0]))
        fn = fns.linear_add if dst is not None else fns.linear
        fn(src.data_ptr(), w.data_ptr(), _ptr(lin.bias), target.data_ptr(), src.shape[0], w.shape[0], w.shape[1], threads)
        return target

    for index, layer in enumerate(p.layers):
        if record(index, "resid_pre", x):
            break
        fns.rmsnorm(x.data_ptr(), layer.norm1.weight.data_ptr(), h.data_ptr(), n, d, float(layer.norm1.variance_epsilon))
        q, k, v = linear(layer.q, h), linear(layer.k, h), linear(layer.v, h)
        fns.rope(q.data_ptr(), cos.data_ptr(), sin.data_ptr(), n, hq, hd)
        fns.rope(k.data_ptr(), cos.data_ptr(), sin.data_ptr(), n, kv, hd)
        for cache, (a, b) in zip(caches, spans):
            buf_k, buf_v = cache._room(index, b - a, like)
            fns.attend(
                q[a:b].data_ptr(), k[a:b].data_ptr(), v[a:b].data_ptr(), buf_k.data_ptr(), buf_v.data_ptr(),
                buf_k.shape[2], cache.length, b - a, hq, kv, hd, layer.scaling, attn[a:b].data_ptr(), scratch.data_ptr(), threads,
            )
        if (index, "attn_out") in wanted:
            o = linear(layer.o, attn)
            x.add_(o)
            if record(index, "attn_out", o):
                break
        else:
            linear(layer.o, attn, x)
        fns.rmsnorm(x.data_ptr(), layer.norm2.weight.data_ptr(), h.data_ptr(), n, d, float(layer.norm2.variance_epsilon))
        gate, up = linear(layer.gate, h), linear(layer.up, h)
        fns.silu_mul(gate.data_ptr(), up.data_ptr(), gate.data_ptr(), gate.numel())
        if (index, "mlp_out") in wanted:
            m = linear(layer.down, gate)
            x.add_(m)
            if record(index, "mlp_out", m):
                break
        else:
            linear(layer.down, gate, x)
        if record(index, "resid_post", x):
            break
    return out


def supported(model: nn.Module, adapter: ArchitectureAdapter, point: Hookpoint) -> bool:
    """Whether lean forwards give ``model``'s :func:`~auditor.models.capture.capture` activations at ``point``.

    Checked once per model and hookpoint (then remembered): two streams of 9 and 6 random tokens
    fed in three rounds, against a plain forward of each whole sequence.
    """
    with _lock:
        known = _verified.setdefault(model, {})
        if point.name in known:
            return known[point.name]
    ok = _check(model, adapter, point)
    with _lock:
        _verified.setdefault(model, {})[point.name] = ok
    return ok


def _check(model: nn.Module, adapter: ArchitectureAdapter, point: Hookpoint) -> bool:
    from auditor.models.capture import agrees, capture
    from auditor.models.streams import StreamCache

    with torch.inference_mode():
        found = available(model, adapter, [point], 9)
        if found is None:
            return False
        vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        if vocab < 8:
            return False
        gen = torch.Generator().manual_seed(0)
        seqs = [torch.randint(3, min(vocab, 1000), (n,), generator=gen).tolist() for n in (9, 6)]
        caches = [StreamCache(), StreamCache()]
        got: list[list[torch.Tensor]] = [[], []]
        try:
            for cuts in ([(0, 4), (0, 5)], [(4, 5), (5, 6)], [(5, 9), None]):
                live = [i for i, cut in enumerate(cuts) if cut is not None]
                spans, flat, positions, start = [], [], [], 0
                for i in live:
                    a, b = cuts[i]  # type: ignore[misc]
                    spans.append((start, start + b - a))
                    flat.extend(seqs[i][a:b])
                    positions.extend(range(caches[i].length, caches[i].length + b - a))
                    start += b - a
                row = capture_lean(
                    model, found, [point], [caches[i] for i in live], spans, torch.tensor(flat), torch.tensor(positions)
                )[point.name][0]
                for i, (a, b) in zip(live, spans):
                    caches[i].length += b - a
                    got[i].append(row[a:b])
            for seq, parts in zip(seqs, got):
                [want] = capture(model, torch.tensor([seq]), None, [point], adapter=adapter).values()
                if not agrees(want[0], torch.cat(parts)):
                    return False
        except Exception:
            return False
    return True
