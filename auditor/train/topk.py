"""The trainable TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Encode ``pre = (x - b_dec) W_enc + b_enc``, keep the ``k`` largest per row, ReLU them;
decode ``x_hat = sum_i f_i W_dec[i] + b_dec``. The parameters are the canonical SAELens
ones, so :meth:`TopKSAE.to_sae` exports an :class:`~auditor.sae.SAE` whose ``topk`` rule
(with ``apply_b_dec_to_input``) gives the same outputs.

Training helpers kept here because they are facts about these parameters:
decoder rows at unit norm (:meth:`normalize_decoder`) with the gradient component
along each row removed before the step (:meth:`remove_parallel_grads`), so Adam's
update does not fight the renormalization; the AuxK loss on dead latents; the
geometric median used to initialize ``b_dec``.

Example::

    sae = TopKSAE(d_in=576, d_sae=4608, k=32, generator=torch.Generator().manual_seed(0))
    out = sae(x, dead_mask=None)          # ForwardOutput(x_hat, top_acts, top_indices, fvu, auxk_loss)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auditor.sae import SAE, SAEConfig, SAEMetadata

__all__ = ["EncoderOutput", "ForwardOutput", "TopKSAE", "geometric_median"]


class EncoderOutput(NamedTuple):
    """The sparse code of a batch."""

    top_acts: Tensor
    """``[N, k]`` ReLU'd activations of the selected latents."""
    top_indices: Tensor
    """``[N, k]`` indices of the selected latents."""
    pre_acts: Tensor
    """``[N, d_sae]`` pre-activations (needed by AuxK)."""


class ForwardOutput(NamedTuple):
    """What one training forward computes."""

    x_hat: Tensor
    """``[N, d_in]`` reconstruction."""
    top_acts: Tensor
    """``[N, k]``."""
    top_indices: Tensor
    """``[N, k]``."""
    fvu: Tensor
    """Scalar: sum of squared errors over the total variance of the batch (1 - FVE)."""
    auxk_loss: Tensor
    """Scalar: AuxK reconstruction of the residual by dead latents, over the total variance (0 without dead latents)."""


def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-6) -> Tensor:
    """The point minimising the sum of Euclidean distances to ``points [N, d]`` (Weiszfeld's iteration).

    Starts from the mean; each step is a weighted mean with weights ``1 / distance``.
    """
    points = points.float()
    guess = points.mean(dim=0)  # [d]
    for _ in range(max_iter):
        dist = (points - guess).norm(dim=-1).clamp_min(1e-8)  # [N]
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = float((new - guess).norm())
        guess = new
        if moved <= tol * max(float(guess.norm()), 1.0):
            break
    return guess


class TopKSAE(nn.Module):
    """A TopK sparse autoencoder with trainable SAELens-named parameters."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        *,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if not 0 < k <= d_sae:
            raise ValueError(f"k ({k}) must be in 1..d_sae ({d_sae})")
        self.d_in = d_in
        self.d_sae = d_sae
        self.k = k
        # Random unit decoder rows, encoder initialized as the transpose (Gao et al. §2.3):
        # every latent starts out reading the direction it writes.
        w_dec = torch.randn(d_sae, d_in, generator=generator)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec.to(device))
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous().to(device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))

    def encode(self, x: Tensor) -> EncoderOutput:
        """Sparse code of ``x [N, d_in]``."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc  # [N, d_sae]
        top = pre.topk(self.k, dim=-1, sorted=False)
        return EncoderOutput(torch.relu(top.values), top.indices, pre)

    def decode(self, top_acts: Tensor, top_indices: Tensor, *, bias: bool = True) -> Tensor:
        """``sum_j top_acts[:, j] * W_dec[top_indices[:, j]]`` (+ ``b_dec``), ``[N, d_in]``."""
        # A gather-and-sum over the k chosen rows instead of a dense [N, d_sae] @ [d_sae, d_in].
        out = F.embedding_bag(
            top_indices, self.W_dec, per_sample_weights=top_acts.to(self.W_dec.dtype), mode="sum"
        )  # [N, d_in]
        return out + self.b_dec if bias else out

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, aux_k: int | None = None) -> ForwardOutput:
        """Reconstruct ``x [N, d_in]``; with ``dead_mask [d_sae]`` also compute the AuxK loss.

        AuxK: the residual ``e = x - x_hat`` is reconstructed (without bias) by the
        ``aux_k`` dead latents with the largest pre-activations; the loss is
        ``||e - e_hat||^2`` over the batch's total variance. Its gradient reaches only
        dead latents, so they drift towards directions the live ones miss.
        """
        x = x.to(self.W_enc.dtype)
        code = self.encode(x)
        x_hat = self.decode(code.top_acts, code.top_indices)
        x32 = x.float()
        total_variance = (x32 - x32.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        residual = x32 - x_hat.float()  # [N, d_in]
        fvu = residual.pow(2).sum() / total_variance
        auxk = x_hat.new_zeros((), dtype=torch.float32)
        if dead_mask is not None:
            n_dead = int(dead_mask.sum())
            if n_dead:
                k_aux = min(aux_k if aux_k is not None else self.d_in // 2, n_dead)
                candidates = code.pre_acts.masked_fill(~dead_mask, float("-inf"))  # [N, d_sae]
                aux = candidates.topk(k_aux, dim=-1, sorted=False)
                e_hat = self.decode(torch.relu(aux.values), aux.indices, bias=False)
                auxk = (e_hat.float() - residual.detach()).pow(2).sum() / total_variance
        return ForwardOutput(x_hat, code.top_acts, code.top_indices, fvu, auxk)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every decoder row to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Remove from ``W_dec.grad`` the component along each (unit) row, which renormalizing would undo."""
        if self.W_dec.grad is None:
            return
        along = (self.W_dec.grad * self.W_dec).sum(dim=-1, keepdim=True)  # [d_sae, 1]
        self.W_dec.grad -= along * self.W_dec

    def to_sae(
        self,
        *,
        scale: float | None,
        model_name: str | None = None,
        hook_name: str | None = None,
        context_size: int | None = None,
        **metadata: object,
    ) -> SAE:
        """Export as a canonical ``topk`` :class:`SAE` (float32, CPU).

        ``scale`` is the ``expected_average_only_in`` factor the inputs were multiplied by
        during training (None: no normalization); it goes into ``cfg.json`` so the SAE
        applies it to raw activations and undoes it on decode.
        """
        cfg = SAEConfig(
            architecture="topk",
            d_in=self.d_in,
            d_sae=self.d_sae,
            k=self.k,
            apply_b_dec_to_input=True,
            normalize_activations="expected_average_only_in" if scale is not None else "none",
            activation_norm_scaling_factor=scale,
            metadata=SAEMetadata(
                model_name=model_name, hook_name=hook_name, prepend_bos=True, context_size=context_size, **metadata
            ),
        )
        tensors = {
            name: getattr(self, name).detach().float().cpu() for name in ("W_enc", "b_enc", "W_dec", "b_dec")
        }
        return SAE.from_tensors(cfg, tensors, source="trainer")
