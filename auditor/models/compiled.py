"""Optional ``torch.compile`` of a loaded model's decoder layers, hooks left in place.

Each layer's attention and MLP modules get a compiled ``forward`` (``dynamic=True``, so
batch and sequence lengths do not recompile); the modules themselves, and so every
hookpoint (``resid_pre`` / ``resid_post`` on the layer, ``attn_out`` / ``mlp_out`` on these
modules), keep running their hooks eagerly around the compiled code. Capturing, stopping
early, steering and the KV cache work as without it.

Meant for accelerators, where fused kernels and fewer launches pay off; it also works on the
CPU (``inductor`` needs a C++ compiler there). The first forward of each new shape class
compiles (tens of seconds), so enable it for long-running servers, not one-off audits.
Measured on one H100 with a Llama-3.1-8B-shaped model (``benchmarks/gpu_llama8b.py
--compile``): audit forwards 10% faster, greedy decoding at batch 16 a third slower (64
compiled calls a step, each with its guards and wrapper, at one token a step): worth it for a
sidecar that audits, not for one that generates.

Example::

    loaded = load_model(device="cuda")
    compile_layers(loaded)            # or load_model(..., compile=True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from auditor.errors import ModelError

if TYPE_CHECKING:
    from auditor.models.loading import LoadedModel

__all__ = ["compile_layers", "has_compiled_layers"]

_MARK = "_auditor_compiled"


def has_compiled_layers(model: nn.Module) -> bool:
    """Whether :func:`compile_layers` compiled any of ``model``'s modules."""
    return any(getattr(module, _MARK, False) for module in model.modules())


def compile_layers(loaded: LoadedModel, backend: str | bool = "inductor") -> int:
    """Compile the attention and MLP ``forward`` of every decoder layer of ``loaded``, in place.

    Returns how many modules were compiled now (0 when already done). ``backend`` is a
    ``torch.compile`` backend (``inductor``, also meant by True, as the loaders' ``compile=True``
    passes it; ``eager`` / ``aot_eager`` trace without code generation). Raises
    :class:`ModelError` for an unknown backend.
    """
    backend = "inductor" if backend is True else str(backend)
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        known = ", ".join(sorted(torch._dynamo.list_backends(exclude_tags=())))
        raise ModelError(f"unknown torch.compile backend {backend!r}; known: {known}")
    adapter, model = loaded.adapter, loaded.model
    done = 0
    for layer in range(loaded.n_layers):
        for module in (adapter.attn_module(model, layer), adapter.mlp_module(model, layer)):
            if getattr(module, _MARK, False):
                continue
            module.forward = torch.compile(module.forward, dynamic=True, backend=backend)  # type: ignore[method-assign]
            setattr(module, _MARK, True)
            done += 1
    return done
