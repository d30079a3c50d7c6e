"""The SAE config: one pydantic model that *is* the on-disk ``cfg.json``.

The layout follows SAELens v6 (``architecture``, ``d_in``, ``d_sae``, ...,
with provenance under ``metadata``) so a folder written by :meth:`SAE.save`
opens in SAELens and the other way round. One field is ours:
``activation_norm_scaling_factor``, the stored scalar of the
``expected_average_only_in`` normalization, so save/load round-trips it.

Example::

    cfg = SAEConfig(architecture="topk", d_in=768, d_sae=24576, k=32)
    cfg.model_dump_json()
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Architecture", "NormalizeActivations", "SAEConfig", "SAEMetadata"]

Architecture = Literal["standard", "topk", "batchtopk", "jumprelu", "gated"]
NormalizeActivations = Literal[
    "none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"
]


class SAEMetadata(BaseModel):
    """Where the SAE reads from; unknown keys (dataset, training run, ...) are kept."""

    model_config = ConfigDict(extra="allow")

    model_name: str | None = None
    """Model the SAE was trained on (Hugging Face id or TransformerLens name)."""

    hook_name: str | None = None
    """Hookpoint in TransformerLens form, e.g. ``blocks.15.hook_resid_post``; None if unknown."""

    hook_head_index: int | None = None
    """Attention head the SAE reads when the hookpoint has a head axis; None otherwise."""

    prepend_bos: bool = True
    """Whether training contexts started with a BOS token."""

    context_size: int | None = None
    """Training context length in tokens, if known."""


class SAEConfig(BaseModel):
    """Architecture, sizes and input handling of one SAE (the ``cfg.json`` file)."""

    model_config = ConfigDict(extra="forbid")

    architecture: Architecture = "standard"
    """Activation rule; see ``auditor.sae.sae`` for the formula of each."""

    d_in: int = Field(gt=0)
    """Width of the activations the SAE reads (model hidden size at the hookpoint)."""

    d_sae: int = Field(gt=0)
    """Number of latents (dictionary size)."""

    k: int | None = Field(default=None, gt=0)
    """Latents kept per token; required for ``topk``, informational for ``batchtopk``."""

    dtype: str = "float32"
    """Torch dtype name of the stored weights (``float32``, ``bfloat16``, ``float16``)."""

    apply_b_dec_to_input: bool = False
    """Subtract ``b_dec`` from the (normalized) input before encoding."""

    normalize_activations: NormalizeActivations = "none"
    """Input normalization, undone on decode (see ``SAE.norm_in``)."""

    activation_norm_scaling_factor: float | None = Field(default=None, gt=0)
    """Scalar ``sqrt(d_in) / E||x||`` for ``expected_average_only_in``; None for other modes."""

    metadata: SAEMetadata = Field(default_factory=SAEMetadata)
    """Provenance: model, hookpoint, training context."""

    @model_validator(mode="after")
    def _check_cross_fields(self) -> SAEConfig:
        if self.architecture == "topk" and self.k is None:
            raise ValueError("k is required when architecture is 'topk'")
        if self.k is not None and self.k > self.d_sae:
            raise ValueError(f"k ({self.k}) must be <= d_sae ({self.d_sae})")
        wants_factor = self.normalize_activations == "expected_average_only_in"
        if wants_factor and self.activation_norm_scaling_factor is None:
            raise ValueError(
                "activation_norm_scaling_factor is required when normalize_activations is "
                "'expected_average_only_in' (fold it into the weights to drop it)"
            )
        if not wants_factor and self.activation_norm_scaling_factor is not None:
            raise ValueError(
                "activation_norm_scaling_factor is only used when normalize_activations is "
                f"'expected_average_only_in', not {self.normalize_activations!r}"
            )
        return self
