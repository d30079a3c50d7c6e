"""Settings of one SAE training run: a pydantic model that is also the CLI flags and the report's record.

Example::

    cfg = TrainConfig(hookpoint="blocks.15.hook_resid_post", tokens=2_000_000, expansion=8, k=32)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["LrDecay", "BDecInit", "TrainConfig"]

LrDecay = Literal["linear", "cosine", "constant"]
BDecInit = Literal["geometric_median", "mean", "zeros"]


class TrainConfig(BaseModel):
    """How to collect activations and train one TopK SAE on them."""

    # Field docstrings become descriptions: the CLI help of each flag is read from them.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    hookpoint: str
    """Where the SAE reads, in TransformerLens form (``blocks.15.hook_resid_post``)."""

    tokens: int = Field(default=2_000_000, gt=0)
    """Training tokens (activations) seen by the optimizer; the corpus is reread if it is shorter."""

    expansion: int = Field(default=8, gt=0)
    """Dictionary width as a multiple of ``d_in`` (``d_sae = expansion * d_in``)."""

    k: int = Field(default=32, gt=0)
    """Active latents per token."""

    batch_size: int = Field(default=4096, gt=0)
    """Activations per optimizer step."""

    lr: float = Field(default=1e-3, gt=0)
    """Peak Adam learning rate (1e-3 trained SmolLM2 layer 15 well on CPU; see FIELD_NOTES)."""

    lr_warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    """Share of the steps over which the learning rate rises linearly from 0."""

    lr_decay: LrDecay = "linear"
    """Schedule after warmup, down to 0 at the last step (``constant`` keeps the peak)."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's beta1, beta2."""

    aux_k: int | None = Field(default=None, gt=0)
    """Dead latents used by the AuxK loss; None means ``d_in // 2`` (Gao et al. use 512 for GPT-2)."""

    aux_coef: float = Field(default=1 / 32, ge=0)
    """Weight of the AuxK loss (Gao et al. 2024: 1/32); 0 turns it off."""

    dead_tokens: int = Field(default=250_000, gt=0)
    """A latent that has not fired for this many training tokens is dead."""

    b_dec_init: BDecInit = "geometric_median"
    """Initial decoder bias: geometric median or mean of a sample of normalized activations, or zeros."""

    normalize: bool = True
    """Scale inputs so that E||x|| = sqrt(d_in) (``expected_average_only_in``, stored in cfg.json)."""

    init_sample_tokens: int = Field(default=16_384, gt=0)
    """Activations used to estimate the normalization factor and the initial ``b_dec``."""

    context_size: int = Field(default=128, ge=2)
    """Tokens per packed context (BOS included)."""

    model_batch_size: int = Field(default=16, gt=0)
    """Contexts per model forward while collecting activations."""

    buffer_tokens: int = Field(default=65_536, gt=0)
    """Size of the in-memory shuffling buffer (activations)."""

    outlier_factor: float | None = Field(default=3.0, gt=1)
    """Drop tokens whose norm exceeds this multiple of the running median norm; None keeps all."""

    eval_documents: int = Field(default=400, ge=0)
    """The first documents of the corpus are held out (evaluation only, never trained on)."""

    eval_tokens: int = Field(default=16_384, gt=0)
    """Held-out activations for the FVE, L0 and dead-latent figures."""

    ce_contexts: int = Field(default=32, ge=0)
    """Held-out contexts for the cross-entropy splice test; 0 skips it."""

    log_every: int = Field(default=25, gt=0)
    """Record a history point (training FVE, AuxK loss, dead fraction) every this many steps."""

    seed: int = 0
    """Seeds the initialization, the buffer shuffle and the document order of a reread corpus."""

    autocast_bf16: bool = False
    """Run the SAE forward under bfloat16 autocast (CUDA only; ignored on CPU)."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size > self.buffer_tokens:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be <= buffer_tokens ({self.buffer_tokens})"
            )
        return self
