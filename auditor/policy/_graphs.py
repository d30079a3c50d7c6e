"""A policy evaluation replayed as a CUDA graph, one graph per padded batch shape.

On a GPU the evaluation is bound by launching its kernels (a hundred or more for a policy of a
hundred rules, each doing microseconds of work), not by the work itself: for one text of 512
tokens on the Llama-3.1-8B shape that is several percent of the audit forward. A captured graph
launches them all at once. Graphs need fixed shapes and fixed memory, so a batch is copied into
static buffers padded to a bucket of rows (the next power of two) and tokens (the next power of
two up to 256, then the next multiple of 256); padded positions are masked, which every
aggregation already ignores. A shape is captured the second time it is seen (a one-off shape
stays eager), and only up to ``max_tokens`` padded tokens; the graphs kept hold at most twice that
many tokens in all, as each keeps the memory of its evaluation's intermediate tensors in a private
pool: for a 100-rule policy on an H100, 26-28 KiB a token with the program run as it is (212 MiB
at 8,192 tokens), 5.6-8.5 KiB compiled (68 MiB at 8,192, 110 MiB at 16,384, 178 MiB at 32,768), so a compiled program
is allowed graphs four times as large (:data:`MAX_TOKENS`, :data:`MAX_TOKENS_COMPILED`, or the
engine's ``graph_max_tokens``; ``benchmarks/policy_graphs.py``).
Beyond them an evaluation runs directly, launching its kernels one by one. Outputs are copied out of the graph's buffers before the
next replay can overwrite them; one lock serializes loading, replay and copying, and an event
orders them on the GPU when callers use other streams, so threads sharing an engine stay correct.

What can differ from the eager evaluation: the padded shape may sum means and probe logits in
another order (the last bit of a mean; a value within float rounding of its threshold may decide
differently), as the incremental matcher's sums may.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from auditor._cuda import capture_cuda_graph

MAX_TOKENS = 8192
"""Padded tokens of the largest graph of an evaluation's program as it is."""
MAX_TOKENS_COMPILED = 32768
"""The same for a compiled program (``PolicyEngine.compile_program``), whose fused kernels keep
fewer intermediate tensors."""

Inputs = tuple[Tensor, Tensor, Tensor, Tensor, "Tensor | None"]
"""feats [B, T, F] float32, mask, comp, prompt [B, T] bool, recon [B, T] float32 or None."""


def bucket_rows(b: int) -> int:
    """Rows padded to the next power of two."""
    return 1 << max(b - 1, 0).bit_length()


def bucket_tokens(t: int) -> int:
    """Tokens padded to the next power of two (16 at least) up to 256, then to a multiple of 256."""
    if t <= 256:
        return max(16, 1 << (t - 1).bit_length())
    return -(-t // 256) * 256


class _Graph:
    """One captured evaluation: its static inputs and the output tensors its replays write."""

    def __init__(self, inputs: list[Tensor | None], replay: Callable[[], None], outputs: tuple[Tensor, ...]) -> None:
        self.inputs, self.replay, self.outputs = inputs, replay, outputs
        self.done: torch.cuda.Event | None = None
        """Recorded after the last replay's outputs were copied out, on the stream that replayed it."""

    def load(self, values: Inputs) -> None:
        """Copy a batch into the static inputs. The tokens past it in its rows become zero (masked,
        so no aggregation sees them); rows past it keep what they held, as rows never mix and
        their results are cut off."""
        for buf, x in zip(self.inputs, values):
            if buf is None or x is None:
                continue
            b, t = x.shape[:2]
            buf[:b, :t].copy_(x)
            if t < buf.shape[1]:
                buf[:b, t:].zero_()


class EvalGraphs:
    """Captured evaluations of one engine, at most ``max_graphs`` shapes (least recently used go)."""

    def __init__(
        self,
        compute: Callable[[Inputs], tuple[Tensor, ...]],
        *,
        max_graphs: int = 8,
        max_tokens: int = MAX_TOKENS,
    ) -> None:
        self._compute = compute
        self.max_graphs, self.max_tokens = max_graphs, max_tokens
        self._graphs: OrderedDict[tuple[Any, ...], _Graph] = OrderedDict()
        self._seen: set[tuple[Any, ...]] = set()
        self._lock = threading.Lock()
        self.disabled = False
        """Set when a capture failed: this engine then evaluates eagerly."""
        self.captures = 0
        self.replays = 0

    def run(self, values: Inputs) -> tuple[Tensor, ...] | None:
        """``compute(values)``'s outputs (``[B, ...]`` each, padding cut off), or None when this
        batch is evaluated eagerly (a shape not seen before, too large, or graphs disabled)."""
        feats, recon = values[0], values[4]
        b, t, f = feats.shape
        bb, tb = bucket_rows(b), bucket_tokens(t)
        if self.disabled or t == 0 or bb * tb > self.max_tokens or torch.cuda.is_current_stream_capturing():
            return None
        key = (feats.device, bb, tb, f, recon is not None)
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None:
                if key not in self._seen:
                    self._seen.add(key)  # capture when the shape comes back
                    return None
                graph = self._capture(key, values)
                if graph is None:
                    return None
                self._graphs[key] = graph
                self._evict()
            else:
                self._graphs.move_to_end(key)
            stream = torch.cuda.current_stream(feats.device)
            if graph.done is not None:
                # A caller on another stream: its loads must not overtake the last replay's copies.
                stream.wait_event(graph.done)
            graph.load(values)
            graph.replay()
            self.replays += 1
            # Copies: the next replay (another batch, another thread) overwrites the graph's outputs.
            out = tuple(o[:b, :t].clone() if o.dim() == 3 else o[:b].clone() for o in graph.outputs)
            graph.done = torch.cuda.Event()
            graph.done.record(stream)
            return out

    def _evict(self) -> None:
        """Drop the least recently used graphs beyond ``max_graphs``, or while the kept graphs'
        padded tokens add up to more than twice ``max_tokens`` (a graph keeps the memory of every
        intermediate tensor of its evaluation, which grows with its tokens); the newest stays."""
        while len(self._graphs) > 1 and (
            len(self._graphs) > self.max_graphs or sum(k[1] * k[2] for k in self._graphs) > 2 * self.max_tokens
        ):
            _, old = self._graphs.popitem(last=False)
            if old.done is not None:
                old.done.synchronize()  # its memory returns to the allocator: no replay of it may still run

    def _capture(self, key: tuple[Any, ...], values: Inputs) -> _Graph | None:
        device, bb, tb = key[0], key[1], key[2]
        inputs: list[Tensor | None] = [None if x is None else x.new_zeros((bb, tb, *x.shape[2:])) for x in values]
        _Graph(inputs, lambda: None, ()).load(values)
        static = tuple(inputs)
        outputs: list[tuple[Tensor, ...]] = []  # the last call's are the captured call's
        replay = capture_cuda_graph(lambda: outputs.append(self._compute(static)), device, "policy evaluation")  # type: ignore[arg-type]
        if replay is None:
            self.disabled = True
            return None
        self.captures += 1
        return _Graph(inputs, replay, outputs[-1])
