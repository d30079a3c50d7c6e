"""Streamed forwards of Llama-family models on a few tokens, without ``transformers``' layer code.

A streamed audit runs the model on each chunk of about 16 new tokens. On a CPU the products of
such a forward took the few-row kernel (:mod:`auditor.models.skinny`) about half of its time; most
of the other half went to ``transformers``' decoder layers: some thirty small torch operations a
layer (norms, the rotary embedding, the cache writes, attention, SiLU), each a few microseconds
of dispatch on a [16, 576] tensor, and the modules' calls around them. Here a layer is the same
arithmetic in that kernel's library: two RMS norms, the seven products (the residual additions
done by the output products in place), the rotary embedding, one attention call per stream over
its :class:`~auditor.models.streams.StreamCache`, and ``silu(gate) * up``; the layers before the
audited one run in one call (``auditor_layers``), the audited one in those calls from Python
where the hookpoint sits inside it.

Used by :func:`~auditor.models.streams.capture_streams` for forwards of at most
:data:`~auditor.models.skinny.MAX_ROWS` new tokens, when all of these hold (else the
``transformers`` forward runs, as before):

* the model is a float32 CPU model of a family whose decoder layer is exactly this one
  (``llama``, ``mistral``, ``qwen2``: pre-norm RMSNorm, rotary embedding by halves, grouped-query
  causal attention, a SiLU-gated MLP) with plain causal attention, in eval mode;
* the few-row kernel is built and loaded here;
* the model's classes are ``transformers``' own, and nothing would run in this thread's forward
  that is not theirs: a forward hook (a user's, or a steering hook this thread installed) or a
  ``forward`` set on a module instance sends the forward to ``transformers``, where it runs;
* :func:`supported` found this path's activations equal to :func:`~auditor.models.capture.capture`'s
  (checked once per model and hookpoint on short random sequences). ``AUDITOR_LEAN_LAYERS=0``
  turns it off.

Results equal ``transformers``' to float rounding (another summation order in the attention
and the products, as the kernel's own).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from auditor.models import skinny
from auditor.models.adapters import ArchitectureAdapter
from auditor.models.hookpoints import Hookpoint

__all__ = ["Plan", "Unsuitable", "available", "capture_lean", "plan", "supported"]

_ENV = "AUDITOR_LEAN_LAYERS"
_FAMILIES = {"llama", "mistral", "qwen2"}
_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}
# model -> its plan. Outside the model, so that copies and pickles of it carry none.
_plans: weakref.WeakKeyDictionary[nn.Module, Plan] = weakref.WeakKeyDictionary()


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

    @property
    def products(self) -> tuple[nn.Linear, ...]:
        """The layer's linear modules in ``auditor_layers``' order."""
        return (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)


class Unsuitable(Exception):
    """A weight the kernels cannot read as it is (another dtype or device, not contiguous): the caller runs ``transformers``' forward."""


class Plan:
    """The modules a lean forward reads (their weights are read at each call, never copied)."""

    def __init__(
        self, embed: nn.Module, rotary: nn.Module, layers: list[_Layer], heads: int, kv_heads: int, head_dim: int,
        owners: list[list[tuple[nn.Module, str, nn.Module, type]]],
    ) -> None:
        self.embed, self.rotary, self.layers = embed, rotary, layers
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        # (parent, name, child, its class) for the embedding (first list) and every module of each
        # layer (then one list a layer): the plan holds while each parent still has that child, of
        # that class (a parametrization changes a module's class in place).
        self.owners = owners
        self.verified: dict[str, bool] = {}  # hookpoint -> what supported() found
        self.scopes: dict[int, list[nn.Module]] = {}  # depth -> the modules whose hooks a forward that deep would run
        self.pointers: dict[int, tuple[Any, ...]] = {}  # layer count -> what _pointers_for made, and for what
        # Calls of the layers so far, by layer count: which row of each 4-bit weight the next one
        # checks. One count a depth: two depths taking turns on one counter would give the deeper
        # call's own layers every other turn only, and half of their rows would never be checked.
        self.turns: dict[int, int] = {}

    def current(self, depth: int | None = None) -> bool:
        """Whether the model still has the modules this plan was made from (in its first ``depth`` layers; all by default)."""
        lists = self.owners if depth is None else self.owners[: depth + 1]
        return all(
            parent._modules.get(name) is child and type(child) is cls for owned in lists for parent, name, child, cls in owned
        )


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
    if not isinstance(inner, nn.Module) or type(embed) is not nn.Embedding or not isinstance(rotary, nn.Module):
        return None
    if not all(_ours(m) for m in (model, inner, rotary)):
        return None
    try:
        modules = adapter.layers(model)
    except Exception:
        return None
    owners: list[list[tuple[nn.Module, str, nn.Module, type]]] = [
        [(inner, "embed_tokens", embed, type(embed)), (inner, "rotary_emb", rotary, type(rotary))]
    ]
    if inner._modules.get("layers") is modules:
        owners[0].append((inner, "layers", modules, type(modules)))
    layers = []
    for key, layer in modules._modules.items():
        if layer is None:
            return None
        parts = {name: layer._modules.get(name) for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")}
        attn, mlp = parts["self_attn"], parts["mlp"]
        norms = (parts["input_layernorm"], parts["post_attention_layernorm"])
        if attn is None or mlp is None or any(type(n).__name__ not in _NORMS for n in norms):
            return None
        if not all(_ours(m) for m in (layer, attn, mlp, *norms)):
            return None
        if "q_norm" in attn._modules or "k_norm" in attn._modules:
            return None
        names = [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        projections = [parent._modules.get(n) for parent, n in names]
        if any(type(p) is not nn.Linear for p in projections):
            return None
        if type(mlp._modules.get("act_fn")).__name__ not in {"SiLUActivation", "SiLU"}:
            return None
        scaling = getattr(attn, "scaling", None)
        if not isinstance(scaling, float):
            return None
        owners.append(
            [(modules, key, layer, type(layer))]
            + [(parent, name, child, type(child)) for parent in layer.modules() for name, child in parent._modules.items() if child is not None]
        )
        q, k, v, o, gate, up, down = projections
        layers.append(_Layer(norms[0], q, k, v, o, norms[1], gate, up, down, scaling))  # type: ignore[arg-type]
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or (config.hidden_size // max(heads, 1)))
    if not layers or heads <= 0 or kv_heads <= 0 or heads % kv_heads or head_dim % 8:
        return None
    first = layers[0]
    if first.q.out_features != heads * head_dim or first.k.out_features != kv_heads * head_dim:
        return None
    return Plan(embed, rotary, layers, heads, kv_heads, head_dim, owners)


def _ours(module: Any) -> bool:
    """Whether ``module``'s class is ``transformers``' own (a subclass defined elsewhere may compute otherwise)."""
    return type(module).__module__.startswith("transformers.models.")


def _intercepted(modules: Sequence[nn.Module]) -> bool:
    """Whether a forward of ``modules`` would run something of someone else's: a forward hook on
    one of them (or a global one) that fires in this thread, or a ``forward`` set on the instance
    (other than the few-row kernel's own wrapper)."""
    from auditor.models.hooks import hook_fires_here

    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks:
        return True
    for module in modules:
        if "forward" in module.__dict__ and not skinny.wrapped(module):
            return True
        for table in (module._forward_hooks, module._forward_pre_hooks):
            if table and any(hook_fires_here(h) and not _inert(h) for h in table.values()):
                return True
    return False


def _inert(hook: Any) -> bool:
    """``transformers``' output-capturing hooks: installed for good by the first forward asked for
    hidden states or attentions, they record only inside such a forward of ``transformers``."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


def _current_plan(model: nn.Module, adapter: ArchitectureAdapter, depth: int | None = None) -> Plan | None:
    """The model's plan, made again when its modules (in the first ``depth`` layers) were replaced (and checked again then)."""
    found = _plans.get(model)
    if found is not None and found.current(depth):
        return found
    # Made again each time while there is none (the model's type is read first, so that is cheap for
    # other families; a Llama-family model refused for a module can be taken once it is back).
    found = plan(model, adapter)
    if found is not None:
        _plans[model] = found
    else:
        _plans.pop(model, None)
    return found


def available(model: nn.Module, adapter: ArchitectureAdapter, points: Sequence[Hookpoint], rows: int) -> Plan | None:
    """The plan when a lean forward of ``rows`` tokens may run now (see the module's docstring), else None."""
    if _off() or skinny.is_suspended() or not 0 < rows <= skinny.MAX_ROWS or model.training:
        return None
    if skinny.library() is None:
        return None
    depth = max(p.layer for p in points) + 1
    found = _current_plan(model, adapter, depth)
    if found is None or depth > len(found.layers):
        return None
    scope = found.scopes.get(depth)
    if scope is None:
        scope = [model, getattr(model, "model"), found.embed, found.rotary]
        for layer in adapter.layers(model)[:depth]:
            scope.extend(layer.modules())
        found.scopes[depth] = scope
    if _intercepted(scope):
        return None
    return found


def _ptr(t: torch.Tensor | None, shape: tuple[int, ...] | None = None) -> int | None:
    """A weight's data pointer for the kernels (None for None); :class:`Unsuitable` where they cannot
    read it: not float32, not on the CPU, not contiguous, or not of ``shape``."""
    if t is None:
        return None
    if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
        raise Unsuitable(f"a {t.dtype} weight on {t.device} ({'' if t.is_contiguous() else 'not '}contiguous)")
    if shape is not None and t.shape != shape:
        raise Unsuitable(f"a weight of shape {tuple(t.shape)} where {shape} was expected")
    if not skinny._plain(t):
        raise Unsuitable(f"a weight of class {type(t).__name__} (a tensor subclass)")
    return t.data_ptr()


def _pointers_for(p: Plan, count: int, d: int, inter: int) -> tuple[Any, Any, Any, list[Any]]:
    """``auditor_layers``' weights, 4-bit forms (:func:`~auditor.models.skinny.packed`) and params
    for layers ``0 .. count - 1``, and the tensors they point into (the caller holds them until the
    call returns: another thread may replace a weight meanwhile). Made again (with every check)
    when a weight, its memory or view, or its version counter changed since, or a weight was
    packed or forgotten anywhere, or packing was turned on or off; else reused (the checks and
    lookups cost 2 ms a call)."""
    hq, kv, hd = p.heads, p.kv_heads, p.head_dim
    modules = p.layers[:count]
    tensors: list[torch.Tensor | None] = []
    for layer in modules:
        tensors += (layer.norm1.weight, layer.norm2.weight)
        for lin in layer.products:
            tensors += (lin.weight, lin.bias)
    floats = [(float(layer.norm1.variance_epsilon), float(layer.norm2.variance_epsilon), layer.scaling) for layer in modules]
    setting = (skinny.packing(), skinny.generation(), d, inter, tuple(floats))
    known = p.pointers.get(count)
    if (
        known is not None
        and known[0] == setting
        and all(
            (t is None) == (ident is None) and (t is None or (id(t) == ident and where is not None and where.current(t)))
            for t, ident, where in zip(tensors, known[1], known[2])
        )
    ):
        return (*known[3][:3], [*tensors, *known[3][3]])
    # Each weight by identity and layout (weakly: the cache keeps no replaced weight alive), as they
    # were before their values were read, at the packing count before packing them (a packing
    # here moves it: the next call makes them once more, then they hold).
    where = [None if t is None else skinny.layout(t) for t in tensors]
    weights = (ctypes.c_void_p * (16 * count))()
    quant = (ctypes.c_void_p * (21 * count))()  # each product's 4-bit form, NULL: none
    params = (ctypes.c_float * (3 * count))()
    shapes = ((hq * hd, d), (kv * hd, d), (kv * hd, d), (d, hq * hd), (inter, d), (inter, d), (d, inter))
    forms: list[Any] = []  # the 4-bit forms pointed into, alive while the pointers are kept
    for i, layer in enumerate(modules):
        at = 16 * i
        weights[at] = _ptr(layer.norm1.weight, (d,))
        weights[at + 1] = _ptr(layer.norm2.weight, (d,))
        for j, (lin, shape) in enumerate(zip(layer.products, shapes)):
            weights[at + 2 + 2 * j] = _ptr(lin.weight, shape)
            weights[at + 3 + 2 * j] = _ptr(lin.bias, shape[:1])
            form = skinny.packed(lin.weight)
            if form is not None:
                forms.extend(form)
                quant[21 * i + 3 * j : 21 * i + 3 * j + 3] = [t.data_ptr() for t in form]
        params[3 * i : 3 * i + 3] = list(floats[i])
    made = (weights, quant, params, forms)
    if all(w is not None for t, w in zip(tensors, where) if t is not None):
        # Other layer counts' entries stay while made at the same setting (two hookpoints at two
        # depths take turns); the rest go.
        for other in [c for c, entry in p.pointers.items() if entry[0] != setting]:
            del p.pointers[other]
        p.pointers[count] = (setting, [None if t is None else id(t) for t in tensors], where, made)
    return (weights, quant, params, [*tensors, *forms])


def _layers(
    fns: Any, p: Plan, count: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: Sequence[Any],
    spans: Sequence[tuple[int, int]], like: torch.Tensor, buffers: Sequence[torch.Tensor], threads: int,
) -> None:
    """Layers ``0 .. count - 1`` on ``x`` in place, by one call of the kernel library (``auditor_layers``)."""
    n, d = x.shape
    hq, kv, hd = p.heads, p.kv_heads, p.head_dim
    inter = buffers[5].shape[1]
    streams = len(caches)
    flat_spans = (ctypes.c_int64 * (2 * streams))()
    held = (ctypes.c_int64 * streams)()
    buffers_kv = (ctypes.c_void_p * (2 * streams * count))()
    caps = (ctypes.c_int64 * (streams * count))()
    for s, (cache, (a, b)) in enumerate(zip(caches, spans)):
        flat_spans[2 * s], flat_spans[2 * s + 1], held[s] = a, b - a, cache.length
        for i in range(count):
            buf_k, buf_v = cache._room(i, b - a, like)
            at = s * count + i
            buffers_kv[2 * at], buffers_kv[2 * at + 1], caps[at] = buf_k.data_ptr(), buf_v.data_ptr(), buf_k.shape[2]
    stale = (ctypes.c_uint8 * (7 * count))()
    for attempt in range(3):
        # Each call first compares one row of every weight it reads as codes (turning over the rows,
        # as skinny.checked_row) and computes nothing where one differs: a write through .data.
        # Those forms are dropped and the next try packs the weights anew; a third (another thread
        # writing the weights meanwhile) reads the float32 weights, packing none.
        with skinny.unpacked() if attempt == 2 else contextlib.nullcontext():
            weights, quant, params, alive = _pointers_for(p, count, d, inter)  # alive: held until the call returns
        turn = p.turns[count] = p.turns.get(count, -1) + 1
        differ = fns.layers(
            x.data_ptr(), n, d, count, weights, params, hq, kv, hd, inter, cos.data_ptr(), sin.data_ptr(), streams,
            flat_spans, held, buffers_kv, caps, *(t.data_ptr() for t in buffers), quant, threads,
            turn if attempt < 2 else -1, stale,
        )
        del alive
        if not differ:
            return
        for i, bad in enumerate(stale):
            if bad:
                skinny.stale(p.layers[i // 7].products[i % 7].weight)


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
    (its ``length`` is left to the caller). Stops after the deepest hookpoint. Raises
    :class:`Unsuitable` (before any cache's held tokens change) for weights the kernels cannot read.
    """
    fns = skinny.library()
    assert fns is not None
    threads = torch.get_num_threads()
    n = int(ids.shape[0])
    wanted: dict[tuple[int, str], str] = {(pt.layer, pt.kind): pt.name for pt in points}
    deepest = max(pt.depth for pt in points)
    out: dict[str, torch.Tensor] = {}

    def record(layer: int, kind: str, t: torch.Tensor) -> bool:
        name = wanted.get((layer, kind))
        if name is not None:
            out[name] = t.clone()[None]
        return name is not None and Hookpoint(layer, kind).depth == deepest  # type: ignore[arg-type]

    _ptr(p.embed.weight)
    x = p.embed(ids).contiguous()  # [N, d]
    cos, sin = p.rotary(x[None], positions[None])
    cos, sin = cos[0].float().contiguous(), sin[0].float().contiguous()  # [N, head_dim]
    d = x.shape[1]
    hq, kv, hd = p.heads, p.kv_heads, p.head_dim
    h = torch.empty_like(x)
    q, k, v = x.new_empty((n, hq * hd)), x.new_empty((n, kv * hd)), x.new_empty((n, kv * hd))
    attn = x.new_empty((n, hq * hd))
    inter = p.layers[0].gate.out_features
    gate, up = x.new_empty((n, inter)), x.new_empty((n, inter))
    total = max(c.length + (b - a) for c, (a, b) in zip(caches, spans))
    scratch = x.new_empty((threads, total))
    like = x.new_empty((1, kv, 0, hd))

    def linear(lin: nn.Linear, src: torch.Tensor, dst: torch.Tensor, add: bool = False) -> torch.Tensor:
        """``dst = src @ lin.weight.T + lin.bias``, or that added into ``dst`` in place."""
        shape = (dst.shape[1], src.shape[1])
        weight, bias = lin.weight, lin.bias  # held while the kernel reads them
        w_ptr, b_ptr = _ptr(weight, shape), _ptr(bias, shape[:1])
        assert w_ptr is not None  # a linear module has a weight
        form = skinny.packed(weight)
        if form is not None and skinny.from_codes(fns, weight, form, src.data_ptr(), w_ptr, b_ptr, dst.data_ptr(), n, *shape, threads, add):
            return dst
        (fns.linear_add if add else fns.linear)(src.data_ptr(), w_ptr, b_ptr, dst.data_ptr(), n, shape[0], shape[1], threads)
        return dst

    def added(index: int, lin: nn.Linear, src: torch.Tensor, kind: str) -> bool:
        """The attention's or the MLP's output (``kind``) added to ``x``; whether it was the deepest hookpoint."""
        if (index, kind) not in wanted:
            linear(lin, src, x, add=True)
            return False
        out = linear(lin, src, x.new_empty((n, d)))
        x.add_(out)
        return record(index, kind, out)

    start = 0
    if len(points) == 1:
        # The layers before the audited one (and it too, for its output) in one call; the rest of
        # an audited layer below, where the hookpoint sits inside it.
        [point] = points
        start = point.layer + 1 if point.kind == "resid_post" else point.layer
        if start:
            _layers(fns, p, start, x, cos, sin, caches, spans, like, (h, q, k, v, attn, gate, up, scratch), threads)
        if point.kind == "resid_post":
            return {point.name: x.clone()[None]}
    for index in range(start, len(p.layers)):
        layer = p.layers[index]
        if record(index, "resid_pre", x):
            break
        fns.rmsnorm(x.data_ptr(), _ptr(layer.norm1.weight, (d,)), h.data_ptr(), n, d, float(layer.norm1.variance_epsilon))
        linear(layer.q, h, q), linear(layer.k, h, k), linear(layer.v, h, v)
        fns.rope(q.data_ptr(), cos.data_ptr(), sin.data_ptr(), n, hq, hd)
        fns.rope(k.data_ptr(), cos.data_ptr(), sin.data_ptr(), n, kv, hd)
        for cache, (a, b) in zip(caches, spans):
            buf_k, buf_v = cache._room(index, b - a, like)
            fns.attend(
                q[a:b].data_ptr(), k[a:b].data_ptr(), v[a:b].data_ptr(), buf_k.data_ptr(), buf_v.data_ptr(),
                buf_k.shape[2], cache.length, b - a, hq, kv, hd, layer.scaling, attn[a:b].data_ptr(), scratch.data_ptr(), threads,
            )
        if added(index, layer.o, attn, "attn_out"):
            break
        fns.rmsnorm(x.data_ptr(), _ptr(layer.norm2.weight, (d,)), h.data_ptr(), n, d, float(layer.norm2.variance_epsilon))
        linear(layer.gate, h, gate), linear(layer.up, h, up)
        fns.silu_mul(gate.data_ptr(), up.data_ptr(), gate.data_ptr(), gate.numel())
        if added(index, layer.down, gate, "mlp_out"):
            break
        if record(index, "resid_post", x):
            break
    return out


def supported(model: nn.Module, adapter: ArchitectureAdapter, point: Hookpoint, found: Plan | None = None) -> bool:
    """Whether lean forwards give ``model``'s :func:`~auditor.models.capture.capture` activations at ``point``.

    Checked once per model and hookpoint (again after its modules are replaced), then
    remembered: two streams of 9 and 6 random tokens fed in three rounds, against a plain
    forward of each whole sequence. False without remembering it while a lean forward cannot
    run at all (see :func:`available`). ``found``: the plan :func:`available` just gave.
    """
    found = found or _current_plan(model, adapter)
    if found is None:
        return False
    known = found.verified.get(point.name)
    if known is None:
        known = _check(model, adapter, point)
        if known is None:
            return False
        found.verified[point.name] = known
    return known


def _check(model: nn.Module, adapter: ArchitectureAdapter, point: Hookpoint) -> bool | None:
    """:func:`supported`'s comparison; None where a lean forward cannot run now."""
    from auditor.models.streams import _agrees_in_rounds, _packed

    with torch.inference_mode():
        found = available(model, adapter, [point], 9)
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        if found is None or vocab < 8:
            return None

        def feed(caches: list[Any], new_ids: list[list[int]]) -> list[torch.Tensor]:
            spans, positions, flat = _packed(caches, new_ids)
            row = capture_lean(model, found, [point], caches, spans, torch.tensor(flat), torch.tensor(positions))[point.name][0]
            for cache, ids in zip(caches, new_ids):
                cache.length += len(ids)
            return [row[a:b] for a, b in spans]

        try:
            return _agrees_in_rounds(model, point, adapter, feed)
        except Unsuitable:
            return None
        except Exception:  # a module that does not compute what its class name says, for one
            return False
