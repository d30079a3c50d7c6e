"""Several growing sequences in one forward, each with its own KV cache.

A streamed audit runs the model on a few new tokens at a time. On a CPU a forward of 16
tokens costs nearly what one of 256 costs per token of weights read: every forward reads
every weight of the layers it runs, so sixteen streams fed one at a time read them sixteen
times. :func:`capture_streams` runs the new tokens of many streams as one packed row: the
projections and MLPs (the weights) run once over all of them, with each stream's position
ids continuing its own sequence, and attention runs per stream against that stream's
:class:`StreamCache`.

The per-stream attention is a dispatcher registered with ``transformers``'
``AttentionInterface`` in place of the model's own attention implementation
(:func:`enable_streams`): a call that carries no streams (every ordinary forward, on any
thread) goes to the original implementation with the same arguments, so nothing else
changes; a call from :func:`capture_streams` carries its streams in a keyword argument, which
``transformers`` passes down to the attention function. Models with sliding-window or
soft-capped attention are not supported (the per-stream attention is plain causal SDPA);
:func:`streams_supported` checks a model on short sequences against :func:`capture`.

A forward of at most :data:`~auditor.models.skinny.MAX_ROWS` new tokens of a float32
Llama-family model on an x86-64 CPU skips ``transformers``' layers altogether
(:mod:`auditor.models.lean`: the same arithmetic in the few-row kernel's library; the default
model's 16 chunk forwards of a 256-token completion took 0.51-0.55 s that way against 0.87-1.02 s).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from auditor.models import lean
from auditor.models.adapters import ArchitectureAdapter, get_adapter
from auditor.models.capture import _device, _run_capturing, agrees, capture
from auditor.models.compiled import has_compiled_layers
from auditor.models.hookpoints import Hookpoint
from auditor.models.hooks import resolve_hookpoints

__all__ = ["StreamCache", "capture_streams", "enable_streams", "streams_supported"]

_PREFIX = "auditor_streams_"
_KWARG = "auditor_streams"
_lock = threading.Lock()
# A 4-D mask is taken as given: transformers builds no mask for the packed row (each
# stream's attention makes its own), so this placeholder is all the forward sees.
_NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa


class StreamCache:
    """Keys and values of one sequence, per layer, in buffers that grow in place.

    ``length`` tokens are held; :meth:`crop` forgets the tail (a chunk that re-split the last
    tokens), as ``transformers``' caches do. Only the layers a stopped forward runs get entries.
    """

    def __init__(self) -> None:
        self.length = 0
        self._keys: dict[int, torch.Tensor] = {}  # layer -> [1, kv_heads, capacity, head_dim]
        self._values: dict[int, torch.Tensor] = {}

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (a negative count, like ``transformers.Cache.crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)

    def _room(self, layer: int, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value buffers ``[1, kv_heads, capacity, d]``, grown to hold ``n`` more
        tokens after the held ones (``like``: a ``[1, kv_heads, *, d]`` tensor of the dtype and device)."""
        end = self.length + n
        buf_k, buf_v = self._keys.get(layer), self._values.get(layer)
        if buf_k is None or buf_v is None or buf_k.shape[2] < end or buf_k.dtype != like.dtype or buf_k.device != like.device:
            capacity = max(64, end, 2 * (buf_k.shape[2] if buf_k is not None else 0))
            new_k = like.new_empty((1, like.shape[1], capacity, like.shape[3]))
            new_v = like.new_empty((1, like.shape[1], capacity, like.shape[3]))
            if buf_k is not None and buf_v is not None and self.length:
                new_k[:, :, : self.length] = buf_k[:, :, : self.length]
                new_v[:, :, : self.length] = buf_v[:, :, : self.length]
            self._keys[layer], self._values[layer] = buf_k, buf_v = new_k, new_v
        return buf_k, buf_v

    def _extend(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key``/``value`` ``[1, kv_heads, n, d]`` after the held tokens; return all of them.

        ``length`` moves only when the whole forward is done (:func:`capture_streams`), so every
        layer writes at the same place and a forward that fails leaves the held tokens alone.
        """
        start, end = self.length, self.length + key.shape[2]
        buf_k, buf_v = self._room(layer, key.shape[2], key)
        buf_k[:, :, start:end] = key
        buf_v[:, :, start:end] = value
        return buf_k[:, :, :end], buf_v[:, :, :end]


class _Streams:
    """The streams of one packed forward: each one's cache and its slice of the row."""

    def __init__(self, caches: Sequence[StreamCache], spans: Sequence[tuple[int, int]]) -> None:
        self.caches = caches
        self.spans = spans
        self._masks: dict[int, torch.Tensor | None] = {}  # stream -> its causal mask, the same in every layer

    def attend(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        """``query [1, H, N, d]``, new ``key``/``value [1, KV, N, d]`` -> output ``[1, N, H, d]``."""
        layer = int(getattr(module, "layer_idx"))
        groups = query.shape[1] // key.shape[1]
        outs = []
        for s, (cache, (a, b)) in enumerate(zip(self.caches, self.spans)):
            keys, values = cache._extend(layer, key[:, :, a:b], value[:, :, a:b])
            if s not in self._masks:
                n, total = b - a, keys.shape[2]
                # Causal, offset by the held tokens: new token i sees positions <= held + i.
                self._masks[s] = (
                    torch.arange(total, device=query.device)[None, :]
                    <= torch.arange(total - n, total, device=query.device)[:, None]
                    if n > 1
                    else None
                )
            mask = self._masks[s]
            if groups > 1 and not _SDPA_GQA:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            extra = {"enable_gqa": True} if groups > 1 and _SDPA_GQA else {}
            outs.append(F.scaled_dot_product_attention(query[:, :, a:b], keys, values, attn_mask=mask, scale=scaling, **extra))
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def _dispatcher(base: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        streams: _Streams | None = kwargs.pop(_KWARG, None)
        if streams is None:
            if base == "eager":  # each modeling file has its own eager attention
                fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
            else:
                fn = ALL_ATTENTION_FUNCTIONS[base]
            return fn(module, query, key, value, attention_mask, *args, **kwargs)
        if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
            raise NotImplementedError("streamed forwards support plain causal attention only")
        return streams.attend(module, query, key, value, kwargs.get("scaling")), None

    return attention


def _plain_causal(config: Any) -> bool:
    """No sliding window or soft-capping in the model's attention (what the per-stream attention does not do)."""
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
            return False
        if any("sliding" in str(kind) for kind in getattr(cfg, "layer_types", None) or ()):
            return False
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            return False
    return True


def enable_streams(model: nn.Module) -> bool:
    """Route ``model``'s attention through the stream dispatcher (once); False where it cannot be.

    Ordinary forwards are unaffected: without streams the dispatcher calls the model's own
    implementation (``sdpa``, ``eager``, ...) with the same arguments.
    """
    config = getattr(model, "config", None)
    base = getattr(config, "_attn_implementation", None)
    if config is None or not isinstance(base, str) or not _plain_causal(config):
        return False
    if base.startswith(_PREFIX):
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # transformers before AttentionInterface (4.48)
        return False
    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
        return False
    name = _PREFIX + base
    with _lock:
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, _dispatcher(base))
            if base in ALL_MASK_ATTENTION_FUNCTIONS:
                AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
        if config._attn_implementation == base:
            config._attn_implementation = name
    return True


@torch.inference_mode()
def capture_streams(
    model: nn.Module,
    hookpoint: str | Hookpoint,
    caches: Sequence[StreamCache],
    new_ids: Sequence[Sequence[int]],
    *,
    adapter: ArchitectureAdapter | None = None,
) -> list[torch.Tensor]:
    """Continue each stream by its new token ids in one forward; each stream's activations ``[n_i, d]``.

    ``caches[i]`` holds stream ``i``'s earlier tokens (or nothing for a new stream) and is
    extended in place. The forward stops after ``hookpoint``. Needs :func:`enable_streams`
    (done here) to have succeeded; every stream needs at least one new token.
    """
    if len(caches) != len(new_ids) or not caches:
        raise ValueError("capture_streams needs one list of new token ids per cache (and at least one)")
    if any(len(ids) == 0 for ids in new_ids):
        raise ValueError("every stream in capture_streams needs at least one new token")
    if not enable_streams(model):
        raise NotImplementedError(f"{type(model).__name__} cannot run streamed forwards (see streams_supported)")
    adapter = adapter or get_adapter(model)
    [point] = resolve_hookpoints(model, [hookpoint], adapter)
    device = _device(model)
    spans, positions, flat = _packed(caches, new_ids)
    plan = lean.available(model, adapter, [point], len(flat))
    captured = None
    if plan is not None and lean.supported(model, adapter, point, plan):
        try:
            captured = lean.capture_lean(
                model, plan, [point], caches, spans, torch.tensor(flat, dtype=torch.long), torch.tensor(positions, dtype=torch.long)
            )
        except lean.Unsuitable:
            pass  # weights the kernels cannot read (a dtype or device changed): transformers' forward
    if captured is None:
        captured = _run_capturing(
            model,
            [point],
            adapter,
            True,
            input_ids=torch.tensor([flat], dtype=torch.long, device=device),
            position_ids=torch.tensor([positions], dtype=torch.long, device=device),
            attention_mask=_NO_MASK.to(device),
            use_cache=False,
            **{_KWARG: _Streams(caches, spans)},
        )
    for cache, ids in zip(caches, new_ids):
        cache.length += len(ids)
    row = captured[point.name][0]  # [N, d]
    return [row[a:b] for a, b in spans]


def _packed(caches: Sequence[StreamCache], new_ids: Sequence[Sequence[int]]) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """All streams' new tokens end to end: each stream's ``(start, end)`` in the row, the row's
    position ids (each stream's continue its cache) and its token ids."""
    spans: list[tuple[int, int]] = []
    positions: list[int] = []
    flat: list[int] = []
    for cache, ids in zip(caches, new_ids):
        spans.append((len(flat), len(flat) + len(ids)))
        positions.extend(range(cache.length, cache.length + len(ids)))
        flat.extend(ids)
    return spans, positions, flat


def _agrees_in_rounds(
    model: nn.Module,
    hookpoint: str | Hookpoint,
    adapter: ArchitectureAdapter | None,
    feed: Callable[[list[StreamCache], list[list[int]]], Sequence[torch.Tensor]],
) -> bool:
    """Whether ``feed(caches, new_ids)`` (each stream's activations, its cache extended) gives
    :func:`capture`'s activations: two streams of 9 and 6 random tokens fed in three rounds (one of
    a single token, one where only one stream grows), against a plain forward of each whole
    sequence. Errors propagate."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, min(vocab, 1000), (n,), generator=gen).tolist() for n in (9, 6)]
    caches = [StreamCache(), StreamCache()]
    got: list[list[torch.Tensor]] = [[], []]
    for cuts in ([(0, 4), (0, 5)], [(4, 5), (5, 6)], [(5, 9), None]):
        live = [i for i, cut in enumerate(cuts) if cut is not None]
        outs = feed([caches[i] for i in live], [seqs[i][cuts[i][0] : cuts[i][1]] for i in live])  # type: ignore[index]
        for i, out in zip(live, outs):
            got[i].append(out)
    for seq, parts in zip(seqs, got):
        [want] = capture(model, torch.tensor([seq]), None, [hookpoint], adapter=adapter).values()
        if not agrees(want[0], torch.cat(parts)):
            return False
    return True


def streams_supported(model: nn.Module, hookpoint: str | Hookpoint, *, adapter: ArchitectureAdapter | None = None) -> bool:
    """Whether :func:`capture_streams` gives this model's :func:`capture` activations (checked on two short sequences).

    Two streams of 9 and 6 tokens are fed in three rounds (one of a single token, one where
    only one stream grows) and compared with a plain forward of each whole sequence.
    """
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 8:
        return False
    if has_compiled_layers(model):
        return False  # compiled layers (auditor.models.compile_layers) keep their own attention path
    try:
        if not enable_streams(model):
            return False
        return _agrees_in_rounds(
            model, hookpoint, adapter, lambda caches, new_ids: capture_streams(model, hookpoint, caches, new_ids, adapter=adapter)
        )
    except Exception:  # a model whose forward does not pass the streams down, for example
        return False
