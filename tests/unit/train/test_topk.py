"""The trainable TopK SAE against plain reference formulas."""

from __future__ import annotations

import pytest
import torch

from auditor.train.topk import TopKSAE, geometric_median


def _sae(d_in: int = 16, d_sae: int = 64, k: int = 4, seed: int = 0) -> TopKSAE:
    sae = TopKSAE(d_in, d_sae, k, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=torch.Generator().manual_seed(seed + 1)) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=torch.Generator().manual_seed(seed + 2)))
    return sae


def _dense_code(sae: TopKSAE, x: torch.Tensor, k: int) -> torch.Tensor:
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))


def test_init_ties_encoder_to_decoder_with_unit_rows() -> None:
    sae = _sae()
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))


def test_encode_decode_match_the_dense_formula() -> None:
    sae = _sae()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        code = sae.encode(x)
        dense = _dense_code(sae, x, 4)
        recon = sae.decode(code.top_acts, code.top_indices)
    sparse = torch.zeros_like(dense).scatter(-1, code.top_indices, code.top_acts)
    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(recon, dense @ sae.W_dec + sae.b_dec)


def test_forward_losses_match_reference() -> None:
    sae = _sae()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(4))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[10:30] = True
    with torch.no_grad():
        out = sae(x, dead_mask=dead, aux_k=5)
        x_hat = _dense_code(sae, x, 4) @ sae.W_dec + sae.b_dec
        total = (x - x.mean(0)).pow(2).sum()
        fvu = (x - x_hat).pow(2).sum() / total
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        pre_dead = pre.masked_fill(~dead, float("-inf"))
        top = pre_dead.topk(5, dim=-1)
        aux_code = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        e_hat = aux_code @ sae.W_dec
        auxk = ((x - x_hat) - e_hat).pow(2).sum() / total
    torch.testing.assert_close(out.x_hat, x_hat)
    torch.testing.assert_close(out.fvu, fvu)
    torch.testing.assert_close(out.auxk_loss, auxk)


def test_auxk_is_zero_without_dead_latents_and_reaches_only_dead_ones() -> None:
    sae = _sae()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
    assert float(sae(x, dead_mask=torch.zeros(64, dtype=torch.bool)).auxk_loss) == 0.0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:8] = True
    sae(x, dead_mask=dead).auxk_loss.backward()
    assert sae.W_enc.grad is not None and sae.W_dec.grad is not None
    assert torch.all(sae.W_enc.grad[:, 8:] == 0)
    assert torch.all(sae.W_dec.grad[8:] == 0)
    assert sae.W_enc.grad[:, :8].abs().sum() > 0


def test_parallel_gradient_is_removed_and_rows_renormalized() -> None:
    sae = _sae()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(6))
    sae(x).fvu.backward()
    sae.remove_parallel_grads()
    assert sae.W_dec.grad is not None
    along = (sae.W_dec.grad * sae.W_dec).sum(dim=-1)
    torch.testing.assert_close(along, torch.zeros(64), atol=1e-6, rtol=0)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))


def test_export_reproduces_the_trained_function_on_raw_inputs() -> None:
    sae = _sae()
    scale = 0.25
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(7)) * 4
    exported = sae.to_sae(scale=scale, model_name="m", hook_name="blocks.0.hook_resid_post", context_size=32)
    with torch.no_grad():
        expected = sae(x * scale).x_hat / scale
        expected_code = _dense_code(sae, x * scale, 4)
    torch.testing.assert_close(exported(x), expected)
    torch.testing.assert_close(exported.encode(x), expected_code)
    assert exported.cfg.architecture == "topk" and exported.cfg.k == 4
    assert exported.cfg.apply_b_dec_to_input
    assert exported.cfg.normalize_activations == "expected_average_only_in"
    assert exported.cfg.activation_norm_scaling_factor == scale
    assert exported.cfg.metadata.hook_name == "blocks.0.hook_resid_post"


def test_export_without_normalization() -> None:
    sae = _sae()
    exported = sae.to_sae(scale=None)
    x = torch.randn(5, 16)
    assert exported.cfg.normalize_activations == "none"
    with torch.no_grad():
        torch.testing.assert_close(exported(x), sae(x).x_hat)


def test_geometric_median_of_collinear_points_is_their_median() -> None:
    direction = torch.tensor([1.0, 2.0, -2.0]) / 3.0
    offsets = torch.tensor([-5.0, -1.0, 0.5, 2.0, 40.0])
    points = offsets[:, None] * direction + torch.tensor([1.0, 1.0, 1.0])
    torch.testing.assert_close(geometric_median(points, max_iter=2000, tol=1e-9), points[2], atol=1e-3, rtol=0)


def test_geometric_median_minimises_the_sum_of_distances() -> None:
    gen = torch.Generator().manual_seed(8)
    points = torch.randn(300, 5, generator=gen)
    points[:20] += 50.0  # outliers drag the mean, not the median
    gm = geometric_median(points)

    def cost(p: torch.Tensor) -> float:
        return float((points - p).norm(dim=-1).sum())

    assert cost(gm) < cost(points.mean(0))
    for _ in range(20):
        assert cost(gm) <= cost(gm + 0.05 * torch.randn(5, generator=gen)) + 1e-3


def test_k_must_fit_the_dictionary() -> None:
    with pytest.raises(ValueError, match="k"):
        TopKSAE(4, 8, 9)
