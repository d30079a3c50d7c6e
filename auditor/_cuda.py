"""CUDA helpers: graph capture, shared by the steering hook's decode steps and the policy engine's
evaluations, copies to the host that wait for their own work only, and copies to the device that
do not wait at all."""

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


class HostCopy:
    """A tensor's copy to the host, queued now and read later.

    On a CUDA device the copy goes into pinned memory behind the work queued so far on the
    current stream, with an event recorded after it: :meth:`get` waits for that event only, not
    for what the stream was given since (the next batch's forward), so the host can queue more
    work before it reads. Elsewhere the tensor already is on the host.
    """

    def __init__(self, t: torch.Tensor) -> None:
        self.ready: torch.cuda.Event | None = None
        if t.is_cuda:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(t.device))
            t = host
        self._t = t

    def get(self) -> torch.Tensor:
        """The tensor on the host (waits for the copy on a CUDA device)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self._t


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``. A host tensor bound for a CUDA device goes through pinned memory and
    returns at once: a copy from pageable memory first waits for everything already queued on
    the stream (CUDA stages it through a buffer of its own), so the host would stop until the GPU
    ran dry (the previous batch's forward, say) before it could queue more. The pinned buffer
    returns to torch's host cache, which does not hand it out again until the copy is done."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
