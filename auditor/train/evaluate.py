"""How good an SAE is: reconstruction on held-out activations and the cost of splicing it into the model.

* FVE (fraction of variance explained) ``= 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2``.
* L0: mean number of non-zero latents per token.
* Cross-entropy splice test: next-token loss of the model when the activation at the
  hookpoint is replaced by the SAE reconstruction, against the clean model and against
  zero-ablation (the activation replaced by zeros). Tokens the SAE never saw in training
  (position 0, special tokens, padding, norm outliers) are left unchanged in both.

Example::

    stats = evaluate_reconstruction(sae, held_out)          # ReconstructionStats(fve=..., l0=..., ...)
    ce = splice_cross_entropy(model, sae, "blocks.3.hook_resid_post", batches, special_ids=[0, 1, 2])
    ce.increase                                              # spliced - clean, nats per token
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auditor.models.adapters import ArchitectureAdapter
from auditor.models.capture import position_ids_from_mask
from auditor.models.hookpoints import Hookpoint
from auditor.models.hooks import hooks
from auditor.sae import SAE
from auditor.train.activations import token_mask

__all__ = [
    "CrossEntropyResult",
    "ReconstructionStats",
    "evaluate_reconstruction",
    "fraction_of_variance_explained",
    "next_token_loss",
    "splice_cross_entropy",
]


def fraction_of_variance_explained(x: Tensor, x_hat: Tensor) -> float:
    """``1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2`` over rows of ``x [N, d]``."""
    x64, x_hat64 = x.double(), x_hat.double()
    total = (x64 - x64.mean(dim=0)).pow(2).sum()
    return float(1.0 - (x64 - x_hat64).pow(2).sum() / total)


class ReconstructionStats(NamedTuple):
    """Reconstruction quality of an SAE on a set of activations."""

    fve: float
    """Fraction of variance explained."""
    l0: float
    """Mean number of non-zero latents per row."""
    mse: float
    """Mean squared error per element."""
    latents_fired: int
    """Latents active on at least one row."""
    rows: int
    """Rows evaluated."""


@torch.no_grad()
def evaluate_reconstruction(sae: SAE, acts: Tensor, batch_size: int = 4096) -> ReconstructionStats:
    """FVE, L0 and MSE of ``sae`` on ``acts [N, d_in]``, computed in batches."""
    n, d = acts.shape
    device = sae.W_enc.device
    sse = torch.zeros((), dtype=torch.float64, device=device)
    total_sum = torch.zeros(d, dtype=torch.float64, device=device)
    total_sq = torch.zeros((), dtype=torch.float64, device=device)
    active = torch.zeros((), dtype=torch.float64, device=device)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    for start in range(0, n, batch_size):
        x = acts[start : start + batch_size].to(device=device, dtype=torch.float32)  # [b, d]
        f, state = sae.encode_with_norm(x)  # [b, d_sae]
        x_hat = sae.decode(f, state)
        sse += (x - x_hat).double().pow(2).sum()
        total_sum += x.double().sum(dim=0)
        total_sq += x.double().pow(2).sum()
        nonzero = f != 0
        active += nonzero.sum()
        fired |= nonzero.any(dim=0)
    # sum||x - mean||^2 = sum||x||^2 - N ||mean||^2
    total_var = total_sq - total_sum.pow(2).sum() / n
    return ReconstructionStats(
        fve=float(1.0 - sse / total_var),
        l0=float(active / n),
        mse=float(sse / (n * d)),
        latents_fired=int(fired.sum()),
        rows=n,
    )


def next_token_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy over positions whose input and target are real tokens, and their count."""
    valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # [B, T-1]
    pred = logits[:, :-1][valid].float()  # [n, vocab]
    target = input_ids[:, 1:][valid]  # [n]
    return F.cross_entropy(pred, target, reduction="sum"), int(valid.sum())


class CrossEntropyResult(NamedTuple):
    """Mean next-token cross-entropy (nats per token) of the three variants."""

    clean: float
    """The unmodified model."""
    spliced: float
    """Activation replaced by the SAE reconstruction."""
    zero_ablation: float
    """Activation replaced by zeros."""
    tokens: int
    """Predicted tokens averaged over."""
    spliced_positions: int
    """Positions whose activation was replaced."""

    @property
    def increase(self) -> float:
        """``spliced - clean``."""
        return self.spliced - self.clean

    @property
    def increase_zero_ablation(self) -> float:
        """``zero_ablation - clean``."""
        return self.zero_ablation - self.clean

    @property
    def loss_recovered(self) -> float:
        """``(zero - spliced) / (zero - clean)``: 1 is a perfect SAE, 0 no better than zeros (nan if undefined)."""
        gap = self.zero_ablation - self.clean
        return (self.zero_ablation - self.spliced) / gap if gap != 0 else float("nan")


@dataclass
class _SpliceState:
    """What the splice hook needs for the current batch (set before each forward)."""

    keep: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))
    mode: str = "sae"
    replaced: int = 0


def _device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


@torch.no_grad()
def splice_cross_entropy(
    model: nn.Module,
    sae: SAE,
    hookpoint: str | Hookpoint,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    special_ids: Sequence[int] = (),
    outlier_threshold: float | None = None,
    adapter: ArchitectureAdapter | None = None,
) -> CrossEntropyResult:
    """Next-token loss clean, with the SAE reconstruction spliced in at ``hookpoint``, and zero-ablated.

    ``batches`` yields ``(input_ids, attention_mask)`` ``[B, T]``. A position is replaced
    when it is a real token (see :func:`~auditor.train.activations.token_mask`) and its
    activation norm is at most ``outlier_threshold`` (when given); others keep the model's
    own activation in every variant.
    """
    device = _device(model)
    if sae.W_enc.device != device:
        # A copy on the model's device: the caller's SAE stays where it is.
        sae = copy.deepcopy(sae).to(device)
    state = _SpliceState()

    def replace(tensor: Tensor, *, hook: Hookpoint) -> Tensor:
        where = state.keep  # [B, T]
        if outlier_threshold is not None:
            where = where & (tensor.float().norm(dim=-1) <= outlier_threshold)
        state.replaced = int(where.sum())
        if state.mode == "sae":
            flat = tensor.reshape(-1, tensor.shape[-1]).float()  # [B*T, d]
            new = sae(flat).reshape(tensor.shape).to(tensor.dtype)
        else:
            new = torch.zeros_like(tensor)
        return torch.where(where.unsqueeze(-1), new, tensor)

    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_tokens = 0
    n_spliced = 0
    for input_ids, attention_mask in batches:
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        state.keep = token_mask(input_ids, attention_mask, special_ids)
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask),
            "use_cache": False,
        }
        loss, count = next_token_loss(model(**kwargs).logits, input_ids, attention_mask)
        totals["clean"] += float(loss)
        n_tokens += count
        with hooks(model, {hookpoint: replace}, adapter=adapter):
            for mode in ("sae", "zero"):
                state.mode = mode
                loss, _ = next_token_loss(model(**kwargs).logits, input_ids, attention_mask)
                totals[mode] += float(loss)
        n_spliced += state.replaced
    if n_tokens == 0:
        return CrossEntropyResult(float("nan"), float("nan"), float("nan"), 0, 0)
    return CrossEntropyResult(
        clean=totals["clean"] / n_tokens,
        spliced=totals["sae"] / n_tokens,
        zero_ablation=totals["zero"] / n_tokens,
        tokens=n_tokens,
        spliced_positions=n_spliced,
    )
