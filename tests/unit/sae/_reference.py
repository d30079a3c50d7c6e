"""Plain reference formulas and random weights for the SAE tests (independent of auditor.sae)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

D_IN = 16
D_SAE = 64
N = 10
K = 8
LN_EPS = 1e-5


def random_params(arch: str, gen: torch.Generator) -> dict[str, Tensor]:
    """Canonical random tensors for ``arch`` (tiny dims)."""

    def r(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).float() * scale

    p = {
        "W_enc": r(D_IN, D_SAE, scale=0.5),
        "b_enc": r(D_SAE, scale=0.3),
        "W_dec": r(D_SAE, D_IN, scale=0.3),
        "b_dec": r(D_IN, scale=0.2),
    }
    if arch == "jumprelu":
        p["threshold"] = torch.rand(D_SAE, generator=gen) * 0.8
    if arch == "batchtopk":
        p["threshold"] = torch.full((D_SAE,), 0.35)
    if arch == "gated":
        del p["b_enc"]
        p["b_gate"] = r(D_SAE, scale=0.3)
        p["r_mag"] = r(D_SAE, scale=0.2)
        p["b_mag"] = r(D_SAE, scale=0.3)
    return p


def ref_norm_in(x: Tensor, mode: str, factor: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """(normalized x, out_scale, out_shift) so that x_hat = y * out_scale + out_shift."""
    if mode == "none":
        return x, torch.ones(()), torch.zeros(())
    if mode == "expected_average_only_in":
        assert factor is not None
        return x * factor, torch.tensor(1.0 / factor), torch.zeros(())
    if mode == "constant_norm_rescale":
        norms = torch.sqrt((x * x).sum(-1, keepdim=True))
        return x / norms * math.sqrt(x.shape[-1]), norms / math.sqrt(x.shape[-1]), torch.zeros(())
    mu = x.sum(-1, keepdim=True) / x.shape[-1]
    c = x - mu
    std = torch.sqrt((c * c).sum(-1, keepdim=True) / (x.shape[-1] - 1))
    return c / (std + LN_EPS), std, mu


def ref_encode(
    p: dict[str, Tensor], arch: str, x: Tensor, *, apply_b_dec: bool, k: int | None = None
) -> Tensor:
    """The DESIGN.md encode formulas, written out plainly on normalized input ``x``."""
    if apply_b_dec:
        x = x - p["b_dec"]
    if arch == "gated":
        w_mag = p["W_enc"] * torch.exp(p["r_mag"])[None, :]
        gate = (x @ p["W_enc"] + p["b_gate"] > 0).float()
        return gate * torch.clamp(x @ w_mag + p["b_mag"], min=0)
    pre = x @ p["W_enc"] + p["b_enc"]
    if arch == "standard":
        return torch.clamp(pre, min=0)
    if arch in ("jumprelu", "batchtopk"):
        return torch.where(pre > p["threshold"], torch.clamp(pre, min=0), torch.zeros_like(pre))
    assert k is not None
    kth = pre.sort(dim=-1, descending=True).values[:, k - 1 : k]
    return torch.where(pre >= kth, torch.clamp(pre, min=0), torch.zeros_like(pre))


def topk_relu(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest entries per row (relu'd), zero the rest."""
    kth = pre.sort(dim=-1, descending=True).values[:, k - 1 : k]
    return torch.where(pre >= kth, torch.clamp(pre, min=0), torch.zeros_like(pre))
