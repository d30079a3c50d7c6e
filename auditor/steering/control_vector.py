"""Export additive steering as a llama.cpp control-vector GGUF file.

A llama.cpp control vector is a GGUF file with architecture ``controlvector``,
the keys ``controlvector.model_hint`` (string) and ``controlvector.layer_count``
(uint32), and one F32 tensor ``direction.N`` of ``n_embd`` values per steered
layer. llama.cpp adds ``direction.N`` (times the strength given with
``--control-vector-scaled``) to the output of its 0-based block ``N``, i.e. to
``blocks.N.hook_resid_post``: its loader stores ``direction.N`` at buffer offset
``n_embd * (N - 1)`` and its graph builder reads block ``il``'s vector from
offset ``n_embd * (il - 1)``, so the two shifts cancel. ``direction.0`` is
rejected by the loader, so block 0 cannot be steered.

Only ``add`` interventions are fixed vectors: the direction is ``sum c * W_dec[i]``
mapped back to the model's activation units (divided by the
``expected_average_only_in`` factor when the SAE normalizes its input). Clamp
and scale depend on each token's activation and need the sidecar in the
forward path.

Example::

    cv = control_vector(sae, [(1234, 8.0)], hookpoint="blocks.15.hook_resid_post", model_hint="llama")
    write_control_vector(cv, "steer.gguf")   # llama-server --control-vector steer.gguf
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from auditor.errors import SteeringError

if TYPE_CHECKING:
    from auditor.models import Hookpoint
    from auditor.sae import SAE

__all__ = ["ARCH", "ControlVector", "control_vector", "llama_cpp_layer", "read_control_vector", "write_control_vector"]

ARCH = "controlvector"
"""The GGUF ``general.architecture`` of control-vector files."""


@dataclass
class ControlVector:
    """Directions per llama.cpp layer index (``direction.N`` is added to block N's output)."""

    directions: dict[int, np.ndarray]
    """Layer index -> ``[n_embd]`` float32 vector."""
    model_hint: str
    """The ``controlvector.model_hint`` string (llama.cpp ignores it; tools show it)."""


def llama_cpp_layer(hookpoint: str | Hookpoint) -> int:
    """The ``direction.N`` index that adds to the same activation as ``hookpoint``.

    ``blocks.L.hook_resid_post`` -> ``L``; ``blocks.L.hook_resid_pre`` -> ``L - 1``.
    Other hookpoints are not residual-stream positions llama.cpp can reach, and
    layer 0 is not addressable; both raise :class:`SteeringError`.
    """
    from auditor.models import parse_hookpoint

    point = parse_hookpoint(hookpoint)
    if point.kind == "resid_post":
        layer = point.layer
    elif point.kind == "resid_pre":
        layer = point.layer - 1
    else:
        raise SteeringError(
            f"{point.name}: llama.cpp control vectors add to the residual stream after a block; "
            "only hook_resid_post and hook_resid_pre SAEs can be exported"
        )
    if layer < 1:
        if layer < 0:
            what = "the embeddings (the input of block 0)"
        elif point.kind == "resid_pre":
            what = f"the output of block 0 (the input of block {point.layer})"
        else:
            what = "the output of block 0"
        raise SteeringError(
            f"{point.name} is {what}; llama.cpp's control vectors add to the output of block 1 or later "
            "(direction.0 is rejected by its loader), so an SAE here cannot be exported"
        )
    return layer


def control_vector(
    sae: SAE,
    features: Sequence[tuple[int, float]],
    *,
    hookpoint: str | Hookpoint | None = None,
    model_hint: str | None = None,
) -> ControlVector:
    """The additive direction ``sum c * W_dec[i]`` in the model's activation units, at the SAE's layer.

    ``features`` are ``(latent index, coefficient)`` pairs, coefficients in latent
    units (what ``add`` uses). The SAE's input normalization must be a fixed scale
    (``none`` or ``expected_average_only_in``).
    """
    if not features:
        raise SteeringError("a control vector needs at least one (feature, coefficient)")
    point = hookpoint or sae.cfg.metadata.hook_name
    if not point:
        raise SteeringError("the SAE does not say which hookpoint it reads; pass the hookpoint")
    mode = sae.cfg.normalize_activations
    if mode == "none":
        scale = 1.0
    elif mode == "expected_average_only_in" and sae.cfg.activation_norm_scaling_factor is not None:
        scale = 1.0 / sae.cfg.activation_norm_scaling_factor
    else:
        raise SteeringError(
            f"this SAE normalizes each token ({mode}); its decoder directions have no fixed size in the "
            "model's units, so it cannot be exported as a control vector"
        )
    d_sae = sae.cfg.d_sae
    direction = np.zeros(sae.cfg.d_in, dtype=np.float64)
    w_dec = sae.W_dec.detach().float().cpu().numpy()
    for index, coeff in features:
        if not 0 <= index < d_sae:
            raise SteeringError(f"latent index {index} is out of range: the SAE has {d_sae} latents")
        if not np.isfinite(coeff):
            raise SteeringError(f"coefficient for latent {index} must be finite, got {coeff}")
        direction += float(coeff) * w_dec[index].astype(np.float64)
    hint = model_hint or sae.cfg.metadata.model_name or "unknown"
    return ControlVector({llama_cpp_layer(point): (direction * scale).astype(np.float32)}, hint)


def write_control_vector(cv: ControlVector, path: str | os.PathLike[str]) -> Path:
    """Write ``cv`` as a llama.cpp control-vector GGUF file."""
    import gguf

    from auditor._output import output_file

    if not cv.directions:
        raise SteeringError("a control vector needs at least one direction")
    sizes = {v.shape for v in cv.directions.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise SteeringError(f"every direction must be one vector of the same length, got shapes {sorted(sizes)}")
    if min(cv.directions) < 1:
        raise SteeringError("llama.cpp control vectors start at layer 1 (direction.0 is rejected)")
    out = output_file(path)
    try:
        writer = gguf.GGUFWriter(str(out), ARCH)
        try:
            writer.add_string(f"{ARCH}.model_hint", cv.model_hint)
            writer.add_uint32(f"{ARCH}.layer_count", len(cv.directions))
            for layer in sorted(cv.directions):
                writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(cv.directions[layer], dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    except OSError as exc:
        raise SteeringError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def read_control_vector(path: str | os.PathLike[str]) -> ControlVector:
    """Read a control-vector GGUF file (ours or another tool's)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise SteeringError(f"{path}: not a readable GGUF file ({exc})") from exc
    hint_field = reader.get_field(f"{ARCH}.model_hint")
    hint = hint_field.contents() if hint_field is not None else ""
    directions: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:
        prefix, _, layer = tensor.name.partition(".")
        if prefix != "direction" or not (layer.isascii() and layer.isdigit()):
            raise SteeringError(f"{path}: unexpected tensor {tensor.name!r} (expected direction.N)")
        directions[int(layer)] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    return ControlVector(directions, str(hint))
