"""CUDA graph capture, shared by the steering hook's decode steps and the policy engine's evaluations."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def capture_cuda_graph(step: Callable[[], None], device: torch.device, what: str) -> Callable[[], None] | None:
    """``step`` captured as a CUDA graph on ``device``: its ``replay``, or None when capture fails
    (logged with ``what``, the work that then runs eagerly)."""
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            # Warm up first (lazy initializations, workspaces), as CUDA graphs require; what the
            # warm-up writes is overwritten by the replays. Then capture on the same side stream
            # (not `torch.cuda.graph`, whose synchronize and gc.collect would cost more than the
            # steps it saves); "thread_local": other threads' model workers may run their own
            # forwards meanwhile.
            step()
            step()
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                step()
            finally:
                graph.capture_end()
    except RuntimeError as exc:
        current.wait_stream(side)
        log.warning("%s cannot run as a CUDA graph (%s); running it eagerly", what, exc)
        return None
    current.wait_stream(side)
    return graph.replay
