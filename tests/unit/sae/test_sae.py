"""The canonical SAE against plain reference formulas, for every architecture and norm mode."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from auditor.sae import SAE, SAEConfig, WatchedEncoding, load_sae

from ._reference import D_IN, D_SAE, K, N, random_params, ref_encode, ref_norm_in

ARCHS = ["standard", "jumprelu", "batchtopk", "gated", "topk"]
NORMS = ["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"]
FACTOR = 0.37


def make_sae(arch: str, norm: str = "none", apply_b_dec: bool = True, seed: int = 0) -> tuple[SAE, dict]:
    gen = torch.Generator().manual_seed(seed)
    params = random_params(arch, gen)
    cfg = SAEConfig(
        architecture=arch,
        d_in=D_IN,
        d_sae=D_SAE,
        k=K if arch in ("topk", "batchtopk") else None,
        apply_b_dec_to_input=apply_b_dec,
        normalize_activations=norm,
        activation_norm_scaling_factor=FACTOR if norm == "expected_average_only_in" else None,
        metadata={"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post", "extra": 1},
    )
    return SAE.from_tensors(cfg, params), params


def acts(seed: int = 1, n: int = N) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5


@pytest.mark.parametrize(("arch", "norm", "apply_b_dec"), list(itertools.product(ARCHS, NORMS, [True, False])))
def test_encode_decode_match_reference(arch: str, norm: str, apply_b_dec: bool) -> None:
    sae, p = make_sae(arch, norm, apply_b_dec)
    x = acts()
    xn, out_scale, out_shift = ref_norm_in(x, norm, FACTOR)
    f_ref = ref_encode(p, arch, xn, apply_b_dec=apply_b_dec, k=K)
    f = sae.encode(x)
    assert f.shape == (N, D_SAE)
    assert_close(f, f_ref)
    assert (f_ref > 0).any()  # the check is not vacuous
    x_hat_ref = (f_ref @ p["W_dec"] + p["b_dec"]) * out_scale + out_shift
    assert_close(sae(x), x_hat_ref)
    f2, state = sae.encode_with_norm(x)
    assert_close(sae.decode(f2, state), x_hat_ref)
    err_ref = (x - x_hat_ref).norm(dim=-1) / x.norm(dim=-1)
    assert_close(sae.reconstruction_error(x), err_ref)


@pytest.mark.parametrize(("arch", "norm"), list(itertools.product(ARCHS, NORMS)))
def test_watch_list_encode_equals_full_columns(arch: str, norm: str) -> None:
    sae, _ = make_sae(arch, norm)
    x = acts()
    idx = [5, 0, 63, 17, 5]
    full = sae.encode(x)
    assert_close(sae.encode(x, idx), full[:, idx])
    assert_close(sae.encode(x, torch.tensor(idx)), full[:, idx])
    assert sae.encode(x, []).shape == (N, 0)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "topk"])
def test_watch_list_columns_are_kept_until_the_list_or_the_weights_change(arch: str) -> None:
    # A policy's watch-list tensor comes back on every call: its parameter columns are gathered
    # once and used again while neither that tensor nor the weights change.
    sae, _ = make_sae(arch, "expected_average_only_in")
    x = acts()
    watched = torch.tensor([5, 0, 63, 17, 5])
    with torch.inference_mode():
        first = sae.encode(x, watched)
    assert_close(first, sae.encode(x)[:, watched])
    kept = sae._watch_columns(watched)[1]
    assert kept is not None and sae._watch_columns(watched)[1] is kept  # the same columns, not a new gather
    assert_close(sae.encode_watched(x, watched).features, first)
    # Kept during an inference-mode call, they are ordinary tensors: later calls outside
    # inference mode (autograd included) can use them.
    assert not any(t.is_inference() for t in kept.values())
    # The weights change in place: the next encode reads the new ones.
    sae.fold_activation_norm_scaling()
    with torch.no_grad():
        sae.W_enc[:, 63] *= -1.0
    assert_close(sae.encode(x, watched), sae.encode(x)[:, watched])
    assert not torch.equal(sae.encode(x, watched), first)
    # New parameters (another dtype): their columns, not the old ones.
    sae = sae.to(torch.float64)
    assert sae.encode(x.double(), watched).dtype == torch.float64
    assert_close(sae.encode(x.double(), watched), sae.encode(x.double())[:, watched])
    # The list itself changes in place: the new latents.
    watched[2] = 9
    assert_close(sae.encode(x.double(), watched), sae.encode(x.double())[:, [5, 0, 9, 17, 5]])
    # A bad index still fails, kept list or not.
    with pytest.raises(IndexError, match="feature indices must be in"):
        sae.encode(x.double(), torch.tensor([0, D_SAE]))


def test_topk_keeps_the_checked_watch_list_until_it_changes() -> None:
    # TopK reads no columns; the checked index of a list that comes back is kept all the same.
    sae, _ = make_sae("topk")
    x = acts()
    watched = torch.tensor([5, 0, 63, 17, 5])
    idx, cols = sae._watch_columns(watched)
    assert cols is None and sae._watch_columns(watched)[0] is idx
    assert_close(sae.encode_watched(x, watched).features, sae.encode(x)[:, [5, 0, 63, 17, 5]])
    watched[2] = 9  # in place: the new latents
    assert_close(sae.encode(x, watched), sae.encode(x)[:, [5, 0, 9, 17, 5]])
    watched[2] = D_SAE  # out of range in place: checked again
    with pytest.raises(IndexError, match="feature indices must be in"):
        sae.encode(x, watched)


def test_watch_list_columns_kept_are_bounded_and_inference_lists_are_not_kept() -> None:
    sae, _ = make_sae("jumprelu")
    x = acts()
    lists = [torch.tensor([i, i + 1]) for i in range(12)]
    for w in lists:
        assert_close(sae.encode(x, w), sae.encode(x)[:, w])
    assert len(sae.__dict__["_columns_cache"]) == 8
    with torch.inference_mode():
        w = torch.tensor([3, 4])  # an inference tensor keeps no version counter: gathered per call
        assert_close(sae.encode(x, w), sae.encode(x)[:, [3, 4]])
        assert sae._watch_columns(w)[1] is not sae._watch_columns(w)[1]


@pytest.mark.parametrize(("arch", "norm", "apply_b_dec"), [(a, n, b) for a in ARCHS if a != "topk" for n in NORMS for b in (True, False)])
def test_subset_encodes_the_listed_latents(arch: str, norm: str, apply_b_dec: bool) -> None:
    sae, _ = make_sae(arch, norm, apply_b_dec)
    x = acts()
    idx = [5, 0, 63, 17, 5]
    sub = sae.subset(idx)
    assert sub.cfg.d_sae == len(idx) and sub.cfg.architecture == arch
    f, state = sub.encode_with_norm(x)
    assert_close(f, sae.encode(x)[:, idx])
    assert (f > 0).any()
    # The norm state is the full SAE's (steering undoes the input scale with it).
    _, full_state = sae.encode_with_norm(x)
    assert_close(state.scale, full_state.scale) and assert_close(state.shift, full_state.shift)
    # A copy: changing the subset leaves the SAE alone.
    with torch.no_grad():
        sub.W_enc.zero_()
    assert (sae.encode(x)[:, idx] > 0).any()


def test_fused_bias_relu_gemm_means_relu_of_addmm() -> None:
    """The op the CUDA path uses for a full ReLU encode (bias and ReLU in the GEMM epilogue) keeps
    its meaning in this torch: relu(bias + x @ w). On the CPU the encode itself uses addmm + relu_."""
    from auditor.sae import sae as sae_mod

    gen = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(7, D_IN, generator=gen), torch.randn(D_IN, D_SAE, generator=gen), torch.randn(D_SAE, generator=gen)
    want = torch.relu(x @ w + b)
    assert_close(sae_mod._addmm_relu(b, x, w), want)
    if sae_mod._FUSED_ADDMM_RELU is not None:
        assert_close(sae_mod._FUSED_ADDMM_RELU(b, x, w), want)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        assert_close(sae_mod._addmm_relu(b.to(dev), x.to(dev), w.to(dev)).cpu(), want, rtol=1e-4, atol=1e-4)


def test_subset_of_topk_is_refused() -> None:
    sae, _ = make_sae("topk")
    with pytest.raises(ValueError, match="ranks all latents"):
        sae.subset([1, 2])


@pytest.mark.parametrize(("n", "width", "k"), [(5, 16384, 32), (3, 32768, 1), (4, 16384, 255), (0, 16384, 8), (2, 20000, 16)])
@pytest.mark.parametrize("ties", [False, True])
def test_wide_row_topk_equals_torch_topk(n: int, width: int, k: int, ties: bool) -> None:
    from auditor.sae.sae import _row_topk

    gen = torch.Generator().manual_seed(width + k)
    pre = torch.randn(n, width, generator=gen)
    if ties:
        pre = pre.mul(2).round()  # a handful of distinct values: ties everywhere, also at the k-th
    values, indices = _row_topk(pre, k)
    ref = pre.topk(k, dim=-1)
    assert torch.equal(values, ref.values)
    assert torch.equal(pre.gather(1, indices), values)
    assert all(len(set(row)) == k for row in indices.tolist())  # k distinct columns per row


@pytest.mark.parametrize(
    ("n", "width", "k", "block", "sub"),
    [(5, 16384, 32, 64, 16), (3, 32768, 1, 256, 16), (4, 16384, 63, 128, 8), (0, 16384, 8, 64, 16),
     (6, 131072, 64, 256, 16), (2, 65536, 64, 128, 32), (3, 16384, 64, 64, 32), (2, 4096, 3, 1024, 1)],
)
@pytest.mark.parametrize("ties", [False, True])
def test_two_level_row_topk_equals_torch_topk(n: int, width: int, k: int, block: int, sub: int, ties: bool) -> None:
    from auditor.sae.sae import _row_topk

    gen = torch.Generator().manual_seed(width + k + sub)
    pre = torch.randn(n, width, generator=gen)
    if ties:
        pre = pre.mul(2).round()
    values, indices = _row_topk(pre, k, blocks=True, block=block, sub=sub)
    assert torch.equal(values, pre.topk(k, dim=-1).values)
    assert torch.equal(pre.gather(1, indices), values)
    assert all(len(set(row)) == k for row in indices.tolist())


def test_two_level_row_topk_finds_a_top_value_hidden_in_a_block_of_small_ones() -> None:
    from auditor.sae.sae import _row_topk

    # Row 0: every block's maximum is 1.0 except block 5, whose maximum 10.0 sits beside
    # 255 values of -100; the top 4 are 10 and three ones. Row 1: all equal.
    pre = torch.full((2, 65536), -100.0)
    pre[0, ::256] = 1.0
    pre[0, 5 * 256 + 200] = 10.0
    pre[1] = 0.5
    values, indices = _row_topk(pre, 4, blocks=True, block=256, sub=16)
    assert values[0].tolist() == [10.0, 1.0, 1.0, 1.0] and int(indices[0, 0]) == 5 * 256 + 200
    assert values[1].tolist() == [0.5] * 4 and len(set(indices[1].tolist())) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("width", [65536, 131072])
@pytest.mark.parametrize("ties", [False, True])
def test_wide_row_topk_on_cuda_equals_torch_topk(width: int, ties: bool) -> None:
    from auditor.sae.sae import _row_topk

    gen = torch.Generator(device="cuda").manual_seed(7)
    pre = torch.randn(64, width, generator=gen, device="cuda", dtype=torch.bfloat16)
    if ties:
        pre = pre.mul(2).round()
    values, indices = _row_topk(pre, 64)  # the block path on CUDA, with its default widths
    assert torch.equal(values, pre.topk(64, dim=-1).values)
    assert torch.equal(pre.gather(1, indices), values)
    assert all(len(set(row)) == 64 for row in indices.tolist())


def sized_params(d_in: int, d_sae: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """An SAE's four canonical tensors, random (biases a tenth the scale)."""
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=gen),
        "b_enc": torch.randn(d_sae, generator=gen) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=gen),
        "b_dec": torch.randn(d_in, generator=gen) * 0.1,
    }


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_topk_watch_list_encode_equals_the_dense_codes_picked(device: str) -> None:
    gen = torch.Generator().manual_seed(11)
    d_in, d_sae, k = 12, 700, 9
    params = sized_params(d_in, d_sae, gen)
    sae = SAE.from_tensors(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k), params, device=device)
    x = torch.randn(40, d_in, generator=gen).to(device)
    dense = sae.encode(x)
    assert int((dense > 0).sum()) > 100  # codes to pick: most rows have several positive ones
    # Latents that fire, latents that never do, a latent listed twice, the last and first latent.
    firing = dense.gt(0).any(0).nonzero().flatten()[:5].tolist()
    silent = dense.gt(0).any(0).logical_not().nonzero().flatten()[:3].tolist()
    for features in (firing + silent + firing[:2] + [d_sae - 1, 0], [], list(range(d_sae))):
        idx = torch.tensor(features, dtype=torch.long, device=device)
        want = dense.index_select(-1, idx)
        assert torch.equal(sae.encode(x, features=features), want)
        enc = sae.encode_watched(x, features, recon_error=True)
        assert torch.equal(enc.features, want) and enc.full is None
        full = sae.encode_watched(x, features, full=True)
        assert torch.equal(full.features, want) and torch.equal(full.full, dense)


def test_wide_topk_sae_encodes_like_the_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    d_in, d_sae, k = 8, 16384, 24
    params = sized_params(d_in, d_sae, gen)
    sae = SAE.from_tensors(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=True), params)
    x = torch.randn(6, d_in, generator=gen)
    assert_close(sae.encode(x), ref_encode(params, "topk", x, apply_b_dec=True, k=k))


def test_topk_keeps_at_most_k_per_row() -> None:
    sae, _ = make_sae("topk")
    f = sae.encode(acts(n=50))
    assert int((f != 0).sum(-1).max()) <= K


@pytest.mark.parametrize(("norm", "apply_b_dec"), list(itertools.product(NORMS, [True, False])))
def test_topk_sparse_codes_match_dense_encode_and_decode(norm: str, apply_b_dec: bool) -> None:
    sae, p = make_sae("topk", norm, apply_b_dec)
    x = acts(n=40)
    indices, values, state = sae.encode_topk(x)
    assert indices.shape == values.shape == (40, K)
    dense = torch.zeros(40, D_SAE).scatter_(-1, indices, values)
    assert_close(dense, sae.encode(x))
    xn, out_scale, out_shift = ref_norm_in(x, norm, FACTOR)
    x_hat_ref = (ref_encode(p, "topk", xn, apply_b_dec=apply_b_dec, k=K) @ p["W_dec"] + p["b_dec"]) * out_scale + out_shift
    assert_close(sae.decode_sparse(indices, values, state), x_hat_ref)


@pytest.mark.parametrize(("arch", "norm"), list(itertools.product(ARCHS, NORMS)))
@pytest.mark.parametrize(("recon", "full"), [(False, False), (True, False), (False, True), (True, True)])
def test_encode_watched_serves_features_error_and_full_codes(arch: str, norm: str, recon: bool, full: bool) -> None:
    sae, _ = make_sae(arch, norm)
    x = acts(n=30)
    x[3] = 0.0  # a zero row: error 0, as reconstruction_error defines it
    idx = [7, 0, 63, 7]
    enc = sae.encode_watched(x, idx, recon_error=recon, full=full)
    assert_watched_encoding(sae, x, idx, enc, recon)
    if full:
        assert enc.full is not None
        assert_close(enc.full, sae.encode(x))
    else:
        assert enc.full is None


def assert_watched_encoding(sae: SAE, x: torch.Tensor, idx: list[int], enc: WatchedEncoding, recon: bool) -> None:
    """``enc`` (an ``encode_watched`` result) has encode's codes at ``idx``, reconstruction_error's
    error where asked for, and the norm state that decode needs."""
    assert_close(enc.features, sae.encode(x)[:, idx])
    if recon:
        assert enc.recon_error is not None
        assert_close(enc.recon_error, sae.reconstruction_error(x))
    else:
        assert enc.recon_error is None
    assert_close(sae.decode(sae.encode(x), enc.state), sae(x))


def test_encode_topk_refuses_other_architectures() -> None:
    sae, _ = make_sae("standard")
    with pytest.raises(ValueError, match="encode_topk needs a topk SAE"):
        sae.encode_topk(acts())


@settings(max_examples=25, deadline=None)
@given(
    arch=st.sampled_from(ARCHS),
    norm=st.sampled_from(NORMS),
    seed=st.integers(0, 10_000),
    features=st.lists(st.integers(0, D_SAE - 1), max_size=12),
)
def test_property_watch_list_and_nonnegative(arch: str, norm: str, seed: int, features: list[int]) -> None:
    sae, _ = make_sae(arch, norm, seed=seed)
    x = acts(seed + 1, n=4)
    full = sae.encode(x)
    assert (full >= 0).all()
    assert_close(sae.encode(x, features), full[:, features])


@settings(max_examples=20, deadline=None)
@given(arch=st.sampled_from(ARCHS), seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0))
def test_property_constant_norm_and_layer_norm_are_scale_invariant(arch: str, seed: int, scale: float) -> None:
    # Both per-row normalizations remove the row's scale: f(c x) == f(x), x_hat(c x) == c x_hat(x).
    x = acts(seed)
    for norm in ("constant_norm_rescale", "layer_norm"):
        sae, _ = make_sae(arch, norm, seed=seed)
        assert_close(sae.encode(x * scale), sae.encode(x), atol=1e-4, rtol=1e-4)
        if norm == "constant_norm_rescale":
            assert_close(sae(x * scale), sae(x) * scale, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_activation_norm_scaling_keeps_outputs(arch: str) -> None:
    sae, _ = make_sae(arch, "expected_average_only_in")
    x = acts()
    f_before, x_hat_before = sae.encode(x), sae(x)
    sae.fold_activation_norm_scaling()
    assert sae.cfg.normalize_activations == "none"
    assert sae.cfg.activation_norm_scaling_factor is None
    assert_close(sae.encode(x), f_before)
    assert_close(sae(x), x_hat_before)


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_decode_without_row_state_is_refused(norm: str) -> None:
    sae, _ = make_sae("standard", norm)
    with pytest.raises(ValueError, match="needs the NormState"):
        sae.decode(sae.encode(acts()))


def test_decode_without_state_undoes_global_scale() -> None:
    sae, p = make_sae("standard", "expected_average_only_in")
    f = sae.encode(acts())
    assert_close(sae.decode(f), (f @ p["W_dec"] + p["b_dec"]) / FACTOR)


@pytest.mark.parametrize(("arch", "norm"), [(a, n) for a in ARCHS for n in NORMS])
def test_save_load_round_trip(tmp_path: Path, arch: str, norm: str) -> None:
    sae, _ = make_sae(arch, norm)
    sae.save(tmp_path / "sae")
    for loaded in (SAE.load(tmp_path / "sae"), load_sae(tmp_path / "sae")):
        assert loaded.cfg == sae.cfg
        assert loaded.cfg.metadata.model_extra == {"extra": 1}
        for name, tensor in sae.tensors().items():
            assert torch.equal(loaded.tensors()[name], tensor)
        x = acts()
        assert torch.equal(loaded.encode(x), sae.encode(x))


def test_dtype_and_inference_mode(tmp_path: Path) -> None:
    sae, _ = make_sae("jumprelu")
    half = sae.to(torch.bfloat16)
    assert half.W_enc.dtype == torch.bfloat16
    assert half.cfg.dtype == "bfloat16"
    with torch.inference_mode():
        f = half.encode(acts())
    assert f.dtype == torch.bfloat16
    half.save(tmp_path / "bf16")
    loaded = load_sae(tmp_path / "bf16", dtype="float32")
    assert loaded.W_enc.dtype == torch.float32
    assert load_sae(tmp_path / "bf16").W_enc.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"architecture": "topk"}, "k is required when architecture is 'topk'"),
        ({"architecture": "topk", "k": 65}, "k (65) must be <= d_sae (64)"),
        ({"normalize_activations": "expected_average_only_in"}, "activation_norm_scaling_factor is required"),
        ({"activation_norm_scaling_factor": 2.0}, "only used when normalize_activations"),
        ({"architecture": "relu"}, "Input should be 'standard'"),
        ({"normalize_activations": "batch"}, "Input should be 'none'"),
        ({"d_sae": 0}, "greater than 0"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_config_validation(fields: dict, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SAEConfig.model_validate({"d_in": D_IN, "d_sae": D_SAE, **fields})


def test_encode_rejects_wrong_width() -> None:
    sae, _ = make_sae("standard")
    with pytest.raises(ValueError, match=r"expected activations \[N, 16\]"):
        sae.encode(torch.zeros(3, 7))
    with pytest.raises(IndexError, match=r"feature indices must be in \[0, 64\)"):
        sae.encode(acts(), [64])


@pytest.mark.parametrize("norm", NORMS)
def test_zero_rows_stay_finite(norm: str) -> None:
    # Padding rows are all zeros; no mode may turn them into NaN.
    sae, _ = make_sae("standard", norm)
    x = torch.cat([acts(n=2), torch.zeros(1, D_IN)])
    assert torch.isfinite(sae.encode(x)).all()
    assert torch.isfinite(sae(x)).all()
    assert torch.isfinite(sae.reconstruction_error(x)).all()


# ---------------------------------------------------------------- bfloat16 rows, float32 weights


def test_bf16_split_of_float32_weights_is_exact() -> None:
    from auditor.sae.sae import _split_bf16

    gen = torch.Generator().manual_seed(3)
    # Magnitudes over many binades, float32's tiny normals and exact zeros included.
    w = torch.randn(32, 50, generator=gen) * torch.logspace(-30, 3, 50)
    w[0, :5] = torch.tensor([0.0, -0.0, torch.finfo(torch.float32).tiny, 1.0 + 2**-23, -(2**-20)])
    split = _split_bf16(w)
    assert split.dtype == torch.bfloat16 and split.shape == (32, 3 * 56)  # columns padded to a multiple of 8
    parts = split.float().view(32, 3, 56)
    assert not parts[:, :, 50:].any()
    parts = parts[:, :, :50]
    assert torch.equal(parts[:, 0] + parts[:, 1] + parts[:, 2], w)
    # Two terms would not do: float32 has 24 significant bits, bfloat16 8.
    assert not torch.equal(parts[:, 0] + parts[:, 1], w)


@pytest.mark.parametrize(("arch", "norm", "apply_b_dec"), [(a, n, b) for a in ARCHS if a != "topk" for n in ("none", "expected_average_only_in") for b in (True, False)])
def test_bf16_rows_encode_through_the_split_like_their_float32_cast(
    monkeypatch: pytest.MonkeyPatch, arch: str, norm: str, apply_b_dec: bool
) -> None:
    # On CUDA, bfloat16 rows meet float32 weights as one bfloat16 GEMM against the weights split
    # in three (tensor cores); here the same products run as a float32 GEMM. Either way the
    # features are those of the rows cast to float32, to float32 rounding.
    import auditor.sae.sae as sae_module

    sae, _ = make_sae(arch, norm, apply_b_dec)
    x = acts(n=40).bfloat16()
    watched = torch.tensor([5, 0, 63, 17, 5, 40])
    want = sae.encode_watched(x.float(), watched)
    assert not sae._splits(x)  # off CUDA the rows are cast, as before
    monkeypatch.setattr(sae_module, "_SPLIT_DEVICES", frozenset({"cpu"}))
    assert sae._splits(x) and not sae._splits(x.float())
    got = sae.encode_watched(x, watched)
    assert got.features.dtype == torch.float32
    assert_close(got.features, want.features, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.features > 0, want.features > 0)
    assert torch.equal(got.state.scale, want.state.scale) and torch.equal(got.state.shift, want.state.shift)
    assert_close(sae.encode(x, watched), want.features, rtol=1e-5, atol=1e-5)
    # The split columns are kept with the watch-list's columns, and follow the weights.
    kept = sae._watch_columns(watched)[1]
    assert kept is not None and sae_module._SPLIT_KEY in kept
    with torch.no_grad():
        sae.W_enc[:, 17] *= -2.0
    assert_close(sae.encode_watched(x, watched).features, sae.encode_watched(x.float(), watched).features, rtol=1e-5, atol=1e-5)
    # What needs every latent (the reconstruction error, the full codes) still casts the rows.
    both = sae.encode_watched(x, watched, recon_error=True, full=True)
    assert both.full is not None and both.recon_error is not None
    assert_close(both.features, sae.encode_watched(x.float(), watched).features)


def test_bf16_split_encodes_a_batch_of_no_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bucket whose rows hold no content token encodes zero rows; the split path must give
    # [0, L] like the cast rows (its terms' view once could not tell the width from no data).
    import auditor.sae.sae as sae_module

    monkeypatch.setattr(sae_module, "_SPLIT_DEVICES", frozenset({"cpu"}))
    sae, _ = make_sae("jumprelu", "expected_average_only_in")
    x = acts().bfloat16()[:0]
    watched = torch.tensor([5, 0, 63, 17, 5, 40])
    assert sae._splits(x)
    got = sae.encode_watched(x, watched)
    assert got.features.shape == (0, 6) and got.features.dtype == torch.float32
    assert sae.encode(x, watched).shape == (0, 6)


def test_bf16_split_columns_follow_b_dec_and_the_input_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    # The split folds -b_dec W_enc and the input scale into what it keeps with the watch-list's
    # columns: an in-place change of b_dec, or a new scale in the config, must be read again,
    # as the float32 encode reads them on every call.
    import auditor.sae.sae as sae_module

    monkeypatch.setattr(sae_module, "_SPLIT_DEVICES", frozenset({"cpu"}))
    sae, _ = make_sae("standard", "expected_average_only_in")
    x = acts(n=40).bfloat16()
    watched = torch.tensor([5, 0, 63, 17, 5, 40])
    assert_close(sae.encode(x, watched), sae.encode(x.float(), watched), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        sae.b_dec.add_(torch.linspace(-1.0, 2.0, D_IN))
    want = sae.encode(x.float(), watched)
    assert (want > 0).any()
    assert_close(sae.encode(x, watched), want, rtol=1e-5, atol=1e-5)
    sae.cfg = sae.cfg.model_copy(update={"activation_norm_scaling_factor": 2.5})
    want = sae.encode(x.float(), watched)
    assert_close(sae.encode(x, watched), want, rtol=1e-5, atol=1e-5)
    assert_close(sae.encode_watched(x, watched).state.scale, torch.tensor(1 / 2.5))
    sae.cfg = sae.cfg.model_copy(update={"apply_b_dec_to_input": False})
    assert_close(sae.encode(x, watched), sae.encode(x.float(), watched), rtol=1e-5, atol=1e-5)


def test_bf16_split_columns_read_while_another_thread_keeps_them_are_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # Threads auditing on one SAE share a watch-list's kept columns. The split and the b_dec
    # offset are added to them one key at a time: a thread that reads between the two stores
    # must not find the split without its offset. The other thread's read is run here right
    # after each store (where a thread switch may fall).
    import auditor.sae.sae as sae_module

    monkeypatch.setattr(sae_module, "_SPLIT_DEVICES", frozenset({"cpu"}))
    sae, _ = make_sae("standard")
    x = acts(n=40).bfloat16()
    watched = torch.tensor([5, 0, 63, 17, 5, 40])
    want = sae.encode(x.float(), watched)
    sae._watch_columns(watched)
    cache = sae.__dict__["_columns_cache"]
    seen: list[torch.Tensor] = []
    inside = [False]

    class Interleaved(dict):  # type: ignore[type-arg]
        def __setitem__(self, key: str, value: torch.Tensor) -> None:
            super().__setitem__(key, value)
            if not inside[0]:  # "the other thread", between this store and the next
                inside[0] = True
                try:
                    seen.append(sae.encode(x, watched))
                finally:
                    inside[0] = False

    entry = cache[id(watched)]
    cache[id(watched)] = (*entry[:3], Interleaved(entry[3]))
    assert_close(sae.encode(x, watched), want, rtol=1e-5, atol=1e-5)
    assert seen
    for got in seen:
        assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("arch", "norm"), [("topk", "none"), ("standard", "layer_norm"), ("standard", "constant_norm_rescale")])
def test_bf16_rows_are_cast_when_the_split_does_not_apply(monkeypatch: pytest.MonkeyPatch, arch: str, norm: str) -> None:
    import auditor.sae.sae as sae_module

    monkeypatch.setattr(sae_module, "_SPLIT_DEVICES", frozenset({"cpu"}))
    sae, _ = make_sae(arch, norm)
    x = acts().bfloat16()
    assert not sae._splits(x)  # TopK ranks every latent; per-row norms are not one scalar
    assert_close(sae.encode(x, [3, 9]), sae.encode(x.float())[:, [3, 9]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_bf16_rows_encode_on_cuda_tensor_cores_as_close_as_float32_cuda(arch: str) -> None:
    # The watch-list GEMM of bfloat16 rows on CUDA: no further from a float64 reference than
    # CUDA's own float32 GEMM of the cast rows (which runs without TF32 by default).
    gen = torch.Generator().manual_seed(5)
    d_in, d_sae, n = 1024, 4096, 2048
    cfg = SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=True)
    params = {
        "W_enc": torch.randn(d_in, d_sae, generator=gen) / d_in**0.5,
        "b_enc": torch.randn(d_sae, generator=gen) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=gen) / d_sae**0.5,
        "b_dec": torch.randn(d_in, generator=gen) * 0.1,
    }
    if arch == "jumprelu":
        params["threshold"] = torch.rand(d_sae, generator=gen) * 0.5
    sae = SAE.from_tensors(cfg, params, device="cuda")
    x = (torch.randn(n, d_in, generator=gen) * 4).bfloat16().cuda()
    watched = torch.randperm(d_sae, generator=gen)[:400].cuda()
    assert sae._splits(x), "torch.mm(..., out_dtype=float32) is missing on this CUDA build"
    got = sae.encode_watched(x, watched).features
    cast = sae.encode_watched(x.float(), watched).features
    ref64 = SAE.from_tensors(cfg, params, device="cuda", dtype=torch.float64).encode(x.double(), watched)
    err_split = (got.double() - ref64).abs().max().item()
    err_f32 = (cast.double() - ref64).abs().max().item()
    assert err_split <= 2 * err_f32 + 1e-6, (err_split, err_f32)
    assert (got > 0).ne(cast > 0).sum().item() <= 2  # a latent within rounding of its threshold may flip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_piece_max_kernel_on_cuda_equals_torch_amax(dtype: torch.dtype) -> None:
    from auditor.sae import piece_max

    fn = piece_max.kernel()
    if fn is None:
        pytest.skip("Triton is not installed")
    pre = torch.randn(37, 8192, device="cuda").to(dtype)  # 37 x 512 pieces: the last program is partial
    pre[1, 100] = pre[5, 3000] = pre[5, 3001] = float("nan")  # a NaN wins its piece, as in torch.amax
    pre[2, 5], pre[3, 7], pre[4] = float("inf"), float("-inf"), float("-inf")
    for piece in (16, 32):
        got, want = fn(pre, piece), pre.view(37, -1, piece).amax(-1)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    from auditor.sae.sae import _row_topk

    values, _ = _row_topk(pre, 16, blocks=True, block=256, sub=32)
    want = pre.topk(16, dim=-1).values
    assert torch.equal(values.isnan(), want.isnan()) and torch.equal(values.nan_to_num(0.0), want.nan_to_num(0.0))
    assert fn(pre[:0], 16).shape == (0, 512)
    with pytest.raises(ValueError, match="contiguous"):
        fn(pre[:, :8000], 16)


def test_piece_max_kernel_switch_gives_one_level_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from auditor.sae import piece_max
    from auditor.sae.sae import _cuda_topk_widths

    piece_max.kernel.cache_clear()
    try:
        monkeypatch.setenv("AUDITOR_TOPK_TRITON", "0")
        assert piece_max.kernel() is None
        # Without the kernel CUDA ranks in one level: 128-wide blocks at 65,536 latents, 256 from 131,072.
        assert _cuda_topk_widths(65536) == (128, 0) and _cuda_topk_widths(131072) == (256, 0)
    finally:
        piece_max.kernel.cache_clear()


def test_topk_pick_rejects_a_latent_out_of_range_like_the_dense_path() -> None:
    gen = torch.Generator().manual_seed(5)
    d_in, d_sae, k = 8, 64, 4
    sae = SAE.from_tensors(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k), sized_params(d_in, d_sae, gen))
    indices, values, _ = sae.encode_topk(torch.randn(3, d_in, generator=gen))
    for bad in ([-1, 5], [5, d_sae]):
        idx = torch.tensor(bad)
        with pytest.raises((IndexError, RuntimeError), match="out of"):
            sae._dense(indices, values).index_select(-1, idx)
        with pytest.raises((IndexError, RuntimeError), match="out of"):  # not the last latent's codes for -1
            sae._picked(indices, values, idx)


def test_piece_max_after_a_kernel_failure_gives_one_level(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A Triton kernel that fails to compile or launch (a GPU or driver it cannot serve): the call
    still returns the maxima, one warning is logged, and the SAE ranks in one level from then on.
    Triton itself cannot fail on demand here, so its module is replaced by one whose kernel raises."""
    import sys
    import types

    from auditor.sae import piece_max
    from auditor.sae.sae import _cuda_topk_widths

    failing = types.ModuleType("auditor.sae._piece_max_triton")
    calls: list[int] = []

    def broken(pre: torch.Tensor, piece: int) -> torch.Tensor:
        calls.append(piece)
        raise RuntimeError("PTX .version 8.7 does not support .target sm_61")

    failing.piece_max = broken
    import auditor.sae

    # Both where an import looks first: the package's attribute (set once the real module was
    # imported, where Triton is installed) and sys.modules.
    monkeypatch.setitem(sys.modules, "auditor.sae._piece_max_triton", failing)
    monkeypatch.setattr(auditor.sae, "_piece_max_triton", failing, raising=False)
    monkeypatch.delenv("AUDITOR_TOPK_TRITON", raising=False)
    monkeypatch.setattr(piece_max, "_failed", [])
    piece_max.kernel.cache_clear()
    try:
        assert piece_max.usable(torch.bfloat16) and _cuda_topk_widths(131072, torch.bfloat16) == (256, 32)
        assert not piece_max.usable(torch.float64)  # compared in float32, float64 values could tie
        assert _cuda_topk_widths(131072, torch.float64) == (256, 0)
        fn = piece_max.kernel()
        assert fn is not None
        pre = torch.randn(3, 256)
        with caplog.at_level("WARNING", logger="auditor.sae.piece_max"):
            got = fn(pre, 32)
            again = fn(pre, 32)
        assert torch.equal(got, pre.view(3, 8, 32).amax(-1)) and torch.equal(again, got)
        assert calls == [32]  # not tried again
        assert sum("rank in one level from now on" in r.getMessage() for r in caplog.records) == 1
        assert not piece_max.usable(torch.bfloat16) and _cuda_topk_widths(131072, torch.bfloat16) == (256, 0)
        assert _cuda_topk_widths(65536, torch.bfloat16) == (128, 0)
    finally:
        piece_max.kernel.cache_clear()


def _kernel_library() -> None:
    from auditor.models import skinny

    if skinny.library() is None:
        pytest.skip(f"the kernel library does not run here: {skinny.status()['detail']}")


@pytest.mark.parametrize("norm", ["none", "expected_average_only_in"])
def test_topk_tail_of_a_few_rows_equals_torchs_operations(norm: str) -> None:
    # The kernel library's one call after a TopK encoder's product (skinny.topk_tail) against the
    # torch operations it replaces, on the same pre-activations: the same codes at the watched
    # latents (a NaN pre-activation ranks above every number, as in torch.topk), the same
    # reconstruction error to float rounding (a zero row of x: the reconstruction's norm).
    from auditor.models import skinny
    from auditor.sae.sae import _relative_error

    _kernel_library()
    sae, _ = make_sae("topk", norm)
    x = acts(n=40)
    x[3] = 0.0
    x[9, 4] = float("nan")
    idx = torch.tensor([7, 0, 63, 7, 12])
    with torch.no_grad():
        xn, state = sae.norm_in(x)
        pre = sae._topk_pre(sae._centered(xn))
        pre[2, 5] = float("nan")  # one NaN pre-activation: ranked first
        pre[9] = float("nan")  # a NaN input row: every pre-activation NaN (the lowest indices ranked)
        indices, values = sae._topk_of(pre)
        want = sae._picked(indices, values, idx)
        want_err = _relative_error(x, sae.decode_sparse(indices, values, state))
        slot, m, place_slot = sae._slot_table(idx)
        scale = sae._global_scale()
        assert scale is not None
        got, err = skinny.topk_tail(pre, K, slot, m, place_slot, x, sae.W_dec, sae.b_dec, scale)
        rows = [r for r in range(40) if r != 9]
        assert torch.equal(got[rows], want[rows])
        assert torch.isnan(got[2, idx.tolist().index(7)]) or 5 not in idx.tolist()
        assert torch.isnan(got[9, 1])  # latent 0 is among the first K of an all-NaN row
        assert err is not None and torch.isnan(err[9]) and torch.isnan(err[2])  # NaN codes, NaN error
        assert_close(err[rows], want_err[rows], rtol=1e-5, atol=1e-6, equal_nan=True)
        got_only, none = skinny.topk_tail(pre, K, slot, m, place_slot, x, None, sae.b_dec, scale)
        assert none is None and torch.equal(got_only[rows], want[rows])
        # Equal pre-activations: the earlier latents are the codes.
        flat = torch.full((1, D_SAE), 2.0)
        ties, _ = skinny.topk_tail(flat, K, slot, m, place_slot, x[:1], None, sae.b_dec, scale)
        assert ties[0].tolist() == [2.0 if i < K else 0.0 for i in idx.tolist()]


@pytest.mark.parametrize("recon", [True, False])
@pytest.mark.parametrize("norm", NORMS)
def test_topk_encode_watched_of_a_few_rows_in_the_kernel_library(norm: str, recon: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # encode_watched of at most skinny.MAX_ROWS CPU rows of a TopK SAE without a per-row
    # normalization takes the one call (its torch operations otherwise), with encode's codes and
    # reconstruction_error's error; per-row normalizations keep torch's operations.
    from auditor.models import skinny

    _kernel_library()
    sae, _ = make_sae("topk", norm)
    x = acts(n=30)
    x[3] = 0.0
    idx = [7, 0, 63, 7]
    calls: list[bool] = []
    real = skinny.topk_tail

    def counted(*args: object, **kwargs: object) -> object:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(out is not None)
        return out

    monkeypatch.setattr(skinny, "topk_tail", counted)
    with torch.no_grad():
        assert_watched_encoding(sae, x, idx, sae.encode_watched(x, idx, recon_error=recon), recon)
        assert calls == ([True] if norm in ("none", "expected_average_only_in") else [])
        calls.clear()
        big = acts(n=skinny.MAX_ROWS + 1)
        assert_close(sae.encode_watched(big, idx).features, sae.encode(big)[:, idx])
        assert calls in ([False], [])  # past MAX_ROWS: torch's operations
    calls.clear()
    grad = sae.encode_watched(x.clone().requires_grad_(True), idx)  # a gradient wanted: torch's operations
    assert calls in ([False], []) and grad.features.requires_grad


def test_topk_tail_edges_against_torchs_operations() -> None:
    # Rows whose squares underflow or overflow float32 give the error torch's norms give; a
    # watch-list index kept from an inference-mode call serves a later call that wants a
    # gradient; torch.func's batched tensors (no storage) take torch's operations.
    from auditor.models import skinny

    _kernel_library()
    sae, _ = make_sae("topk", "none")
    x = acts(n=6)
    x[1] = 1e-30
    x[2] = 1e20
    idx = torch.tensor([3, 7, 9])
    with torch.inference_mode():
        got = sae.encode_watched(x, idx, recon_error=True)
        with skinny.suspended():
            want = sae.encode_watched(x, idx, recon_error=True)
    assert_close(got.features, want.features)
    assert got.recon_error is not None and want.recon_error is not None
    assert_close(got.recon_error, want.recon_error, equal_nan=True)
    assert torch.isnan(got.recon_error[2]) and got.recon_error[1] > 1.0  # inf / inf; ||x|| = 0: the absolute error
    xg = acts(n=4).requires_grad_(True)
    sae.encode_watched(xg, idx).features.sum().backward()
    assert xg.grad is not None
    with warnings.catch_warnings():  # functorch's fallback for scatter_ says it is slow
        warnings.simplefilter("ignore", UserWarning)
        batched = torch.func.vmap(lambda r: sae.encode_watched(r, idx, recon_error=True).features)(acts(n=15).reshape(3, 5, D_IN))
    assert_close(batched.reshape(15, -1), sae.encode(acts(n=15))[:, idx].detach())
