"""Generate with the auditor's model while steering SAE features at its hookpoint.

:func:`generate` prefills the prompt once and then decodes one token per forward
pass with the KV cache on. The steering hook runs at the SAE hookpoint on every
forward, so every position (prompt and generated) is steered with the same
rule; the cached keys and values of earlier positions were computed from steered
activations, which makes the result equal to recomputing the whole sequence
with the hook at every step (``tests/unit/steering`` checks this).

With ``compare=True`` the steered and the default completion are decoded side
by side as one batch of two rows (row 0 steered, row 1 untouched), so the prompt
is read once per row and both come from the same forward passes.

With a policy, each forward's features (already computed by the steering hook)
extend the growing sequence; the policy's rules with ``steer`` actions are
evaluated on it while decoding, and when one matches, its interventions are
switched on for the rest of the generation (see :mod:`auditor.steering._hook`).
The whole policy gives the verdict once, after the last token.

Example::

    auditor = Auditor.load()
    result = generate(auditor, AuditInput(prompt="The weather today"), max_tokens=20,
                      interventions=[Intervention(1234, "add", 8.0)], compare=True)
    print(result.text, result.default_text, result.feature_traces)
"""

from __future__ import annotations

import inspect
import math
import threading
import weakref
from contextlib import nullcontext
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from auditor.errors import ConfigError
from auditor.models.hooks import thread_is_isolated
from auditor.steering._hook import SteeringHook, Trigger
from auditor.steering.interventions import Intervention, SteeringLimits, feature_label, resolve_interventions
from auditor.text import AuditInput, tokenize_batch

if TYPE_CHECKING:
    from auditor.pipeline import Auditor
    from auditor.policy import PolicyEngine, Verdict

__all__ = ["GenerationResult", "Trigger", "generate", "model_lock", "prompt_for_generation"]

_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.Lock:
    """The lock :func:`generate` holds while its steering hook is installed on ``model``.

    Hooks are installed on the shared module, so two generations on ordinary threads must not
    overlap; a caller running other forwards on that model from another ordinary thread takes
    it too. Threads that called :func:`~auditor.models.hooks.isolate_this_thread` (the
    sidecar's model workers) skip it: their hooks fire only on their own forwards.
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock


@dataclass
class GenerationResult:
    """A completion, how it was steered, and the steered features' activations."""

    text: str
    """The (steered) completion, special tokens removed, cut before a stop string."""
    tokens: list[str]
    """The completion's tokens, as text."""
    finish_reason: Literal["stop", "length"]
    """``stop``: end-of-sequence token or stop string; ``length``: ``max_tokens`` reached."""
    verdict: Verdict | None
    """The policy's verdict on prompt + completion (None without a policy)."""
    steered: bool
    """Whether any intervention was active at some point (requested or policy-triggered)."""
    default_text: str | None = None
    """The completion without steering (``compare=True`` only)."""
    feature_traces: dict[str, list[float]] = field(default_factory=dict)
    """Per completion token (aligned with ``tokens``), each steered feature's activation at the hookpoint before the
    intervention (what the model itself produced there, given the steered context)."""
    triggered: list[Trigger] = field(default_factory=list)
    """Rules that switched steering on, and at which completion token."""
    steered_traces: dict[str, list[float]] = field(default_factory=dict)
    """Per completion token, each steered feature's value after the intervention."""
    default_tokens: list[str] | None = None
    """The default completion's tokens (``compare=True`` only)."""
    default_traces: dict[str, list[float]] | None = None
    """The steered features' activations along the default completion (``compare=True`` only)."""
    default_finish_reason: Literal["stop", "length"] | None = None
    """Why the default completion ended (``compare=True`` only)."""
    prompt_tokens: int = 0
    """Tokens in the rendered prompt."""
    prompt_traces: dict[str, list[float]] = field(default_factory=dict)
    """Per prompt content token, each steered feature's activation at the hookpoint before the
    intervention (the same in both rows: steering at a hookpoint cannot change what reaches it)."""
    token_ids: list[int] = field(default_factory=list)
    """The completion's token ids (without the end-of-sequence token)."""
    interventions: list[str] = field(default_factory=list)
    """The requested interventions, ``feature=mode:value@positions``."""
    default_verdict: Verdict | None = None
    """The policy's verdict on the default completion (``compare=True`` with a policy)."""


def prompt_for_generation(item: AuditInput) -> AuditInput:
    """The prompt to continue: chats get the assistant header, plain text is the prompt.

    A ``completion`` already in ``item`` becomes part of the prompt (the model continues it).
    """
    if item.messages is not None:
        msgs = item.messages
        if item.completion:
            msgs = (*msgs, {"role": "assistant", "content": item.completion})
            return AuditInput(messages=msgs, id=item.id)
        return AuditInput(messages=msgs, completion="", id=item.id)
    text = item.prompt if item.prompt is not None else item.text
    if text is None:
        raise ConfigError("nothing to generate from: give 'prompt', 'text' or 'messages'")
    return AuditInput(prompt=text + (item.completion or ""), completion="", id=item.id)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return ids


def _next_tokens(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """``logits [B, V]`` -> ``[B]``: argmax at temperature 0, else a sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    auditor: Auditor,
    item: AuditInput,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    interventions: Sequence[Intervention | dict[str, Any] | str] = (),
    compare: bool = False,
    policy: PolicyEngine | None = None,
    stop: Sequence[str] | None = None,
    limits: SteeringLimits | None = None,
    seed: int | None = None,
    policy_every: int = 1,
    cuda_graph: bool | None = None,
) -> GenerationResult:
    """Generate a completion of ``item`` with ``interventions`` applied at the SAE hookpoint.

    ``interventions`` are :class:`Intervention` objects, ``{feature, mode, value,
    positions?}`` dicts or ``name=mode:value`` strings, checked against ``limits``
    (:class:`SteeringError` when out of bounds). ``policy`` (default: the auditor's):
    its rules with ``steer`` actions are evaluated every ``policy_every`` tokens on the
    growing completion and switch their interventions on when they match; the whole
    policy gives ``GenerationResult.verdict`` at the end. ``temperature`` 0 is greedy;
    above 0 it samples (``seed`` makes it repeatable). ``stop`` strings end the
    completion (they are not included in ``text``). ``cuda_graph`` (default
    :attr:`SteeringHook.cuda_graphs`): on a GPU, replay decode steps as a CUDA graph.
    """
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be at least 1, got {max_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        # NaN would reach torch.multinomial as NaN probabilities; inf samples uniformly, which no one means.
        raise ConfigError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    from auditor.models import capture, hooks

    loaded = auditor.model
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = auditor.engine_for(policy)
    library = auditor.library if auditor.library is not None else (engine.library if engine is not None else None)
    user = resolve_interventions(interventions, library=library, d_sae=auditor.sae.cfg.d_sae, limits=limits)
    hook = SteeringHook(
        auditor.sae, user, engine=engine, library=library, limits=limits, policy_every=policy_every, cuda_graph=cuda_graph
    )

    batch = tokenize_batch(tokenizer, [prompt_for_generation(item)], max_tokens=None)
    prompt_ids = batch.input_ids[:, : int(batch.lengths[0])]  # [1, P]
    prompt_mask = batch.content_mask[:, : prompt_ids.shape[1]]
    rows = 2 if compare else 1
    device = auditor.device
    ids = prompt_ids.expand(rows, -1).to(device)  # [R, P]
    # Row 0 is steered (requested and policy-triggered interventions); row 1 is the default.
    hook.reset(rows, torch.tensor([True] + [False] * (rows - 1)), policy_rows=torch.tensor([True] + [False] * (rows - 1)))
    hook.set_positions(prompt_mask.expand(rows, -1), torch.zeros(rows, ids.shape[1], dtype=torch.bool))

    eos = _eos_ids(model, tokenizer)
    specials = set(getattr(tokenizer, "all_special_ids", []) or []) | eos
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out_ids: list[list[int]] = [[] for _ in range(rows)]
    finish: list[Literal["stop", "length"] | None] = [None] * rows
    stop = [s for s in (stop or []) if s]
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0))

    forward = _cached_forward(model)
    # An isolated thread's hooks are its own (a sidecar model worker): no other forward sees them.
    lock = nullcontext() if thread_is_isolated() else model_lock(model)
    with lock, hooks(model, {auditor.hookpoint: hook}):
        logits, cache = forward(ids, None)  # [R, V]
        for i in range(max_tokens):
            nxt = _next_tokens(logits, temperature, generator)  # [R]
            fed: list[int] = []
            live: list[bool] = []  # the fed token is a new content token of this row
            for r in range(rows):
                if finish[r] is not None:
                    fed.append(pad)
                    live.append(False)
                    continue
                tok = int(nxt[r])
                fed.append(tok)
                if tok in eos:
                    finish[r] = "stop"
                    live.append(False)
                    continue
                out_ids[r].append(tok)
                live.append(tok not in specials)
                if stop and _hits_stop(tokenizer, out_ids[r], stop):
                    finish[r] = "stop"
            # Feeding the newest tokens measures their features; after the last token this
            # one extra step completes the traces and the verdict.
            hook.set_positions(torch.tensor(live).view(rows, 1), torch.ones(rows, 1, dtype=torch.bool))
            step = torch.tensor(fed, dtype=torch.long, device=device).view(rows, 1)
            if i == max_tokens - 1 or all(f is not None for f in finish):
                # No next token is needed: run only up to the hookpoint (no later layers, no LM head).
                capture(model, step, None, [auditor.hookpoint], stop_early=True, past_key_values=cache)
                break
            logits, cache = forward(step, cache)
        verdicts = hook.evaluate()

    for r in range(rows):
        if finish[r] is None:
            finish[r] = "length"
    history = hook.history()
    n_prompt = int(prompt_ids.shape[1])
    # Row r's completion tokens were fed in the first len(out_ids[r]) decode steps, one per step.
    comp_pos = [_span(history["mask"].shape[1], n_prompt, len(ids)) for ids in out_ids]  # [T] each
    prompt_pos = ~history["is_completion"][0] & history["mask"][0]  # [T] prompt content
    labels = _trace_labels(hook)
    texts = [_decode(tokenizer, out_ids[r], stop) for r in range(rows)]
    result = GenerationResult(
        text=texts[0],
        tokens=[tokenizer.decode([t]) for t in out_ids[0]],
        finish_reason=finish[0] or "length",
        verdict=verdicts[0] if verdicts else None,
        steered=bool(hook.enabled[0].any()),
        feature_traces=_traces(history["features"][0], comp_pos[0], labels),
        steered_traces=_traces(history["steered"][0], comp_pos[0], labels),
        prompt_traces=_traces(history["features"][0], prompt_pos, labels),
        triggered=[t for t in hook.triggers if t.row == 0],
        prompt_tokens=int(prompt_ids.shape[1]),
        token_ids=list(out_ids[0]),
        interventions=[f"{s.label}={s.mode}:{s.value:g}@{s.positions}" for s in user],
    )
    if compare:
        result.default_text = texts[1]
        result.default_tokens = [tokenizer.decode([t]) for t in out_ids[1]]
        result.default_traces = _traces(history["features"][1], comp_pos[1], labels)
        result.default_finish_reason = finish[1]
        result.default_verdict = verdicts[1] if verdicts else None
    return result


def _cached_forward(model: Any) -> Any:
    """``forward(ids [B, T], cache) -> (last logits [B, V], cache)`` for this model's cache keyword.

    transformers 5.x names the KV cache ``cache`` (``past_key_values`` is deprecated);
    older releases and some families still use ``past_key_values``.
    """
    from auditor.models.capture import _cache_keyword

    key = _cache_keyword(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def run(ids: Tensor, cache: Any) -> tuple[Tensor, Any]:
        kwargs = {key: cache} if cache is not None else {}
        out = model(input_ids=ids, use_cache=True, **kwargs, **extra)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.logits[:, -1, :], new_cache

    return run


def _hits_stop(tokenizer: Any, ids: list[int], stop: list[str]) -> bool:
    # Only the tail can complete a stop string; decode a few tokens, not the whole completion.
    tail = tokenizer.decode(ids[-8:], skip_special_tokens=True)
    return any(s in tail for s in stop)


def _decode(tokenizer: Any, ids: list[int], stop: list[str]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def _span(length: int, start: int, n: int) -> Tensor:
    """``[length]`` bool, True on ``start <= t < start + n``."""
    pos = torch.arange(length)
    return (pos >= start) & (pos < start + n)


def _trace_labels(hook: SteeringHook) -> dict[str, int]:
    """Trace key -> column: one per steered latent (requested or policy), first label wins."""
    labels: dict[str, int] = {}
    seen: set[int] = set()
    for slot in hook.steerer.slots:
        if slot.index in seen:
            continue
        seen.add(slot.index)
        labels[slot.label or feature_label(slot.index, None)] = hook.steerer.column(slot.index)
    return labels


def _traces(feats: Tensor, positions: Tensor, labels: dict[str, int]) -> dict[str, list[float]]:
    """``feats [T, U]`` at the completion ``positions [T]`` -> label -> values rounded to 4 places."""
    picked = feats[positions.to(feats.device)]  # [C, U]
    return {name: [round(v, 4) for v in picked[:, col].tolist()] for name, col in labels.items()}
