"""End-to-end training on a tiny random Llama, AuxK revival, the LR schedule and the splice test."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from auditor.errors import AuditorError, ConfigError
from auditor.sae import load_sae
from auditor.train import (
    SAETrainer,
    TrainConfig,
    TrainingReport,
    collect_activations,
    load_activations,
    read_corpus,
    splice_cross_entropy,
    train_sae,
)
from auditor.train.activations import ActivationShard, context_batches, special_token_ids, token_mask
from auditor.train.report import REPORT_JSON, REPORT_MD

from .conftest import HOOKPOINT, LAYERS

SMALL = {
    "hookpoint": HOOKPOINT,
    "expansion": 4,
    "k": 4,
    "batch_size": 256,
    "buffer_tokens": 2048,
    "context_size": 32,
    "model_batch_size": 8,
    "eval_documents": 40,
    "eval_tokens": 1000,
    "ce_contexts": 8,
    "init_sample_tokens": 1000,
    "dead_tokens": 2000,
    "log_every": 5,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, model: Any, tokenizer: Any, documents: list[str]) -> Any:
    out = tmp_path_factory.mktemp("sae")
    cfg = TrainConfig(tokens=16_000, **SMALL)
    return train_sae(cfg, model=model, tokenizer=tokenizer, documents=documents, model_name="tiny-llama",
                     dataset="test", out=out)


def test_training_improves_held_out_fve(trained: Any) -> None:
    report = trained.report
    assert report.fve > report.fve_initial + 0.1
    assert report.history[-1].fve > report.history[0].fve + 0.1
    assert report.tokens_trained >= 16_000 and report.steps == math.ceil(16_000 / 256)
    assert report.l0 == pytest.approx(4.0, abs=0.05)


def test_decoder_rows_have_unit_norm(trained: Any) -> None:
    norms = trained.sae.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_output_loads_and_encodes_exactly_k_latents(trained: Any, model: Any, tokenizer: Any, documents: list[str]) -> None:
    sae = load_sae(str(trained.out))
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 4 and sae.cfg.d_sae == 4 * 32
    assert sae.cfg.metadata.hook_name == HOOKPOINT and sae.cfg.metadata.model_name == "tiny-llama"
    assert sae.cfg.normalize_activations == "expected_average_only_in"
    for name, tensor in trained.sae.tensors().items():
        torch.testing.assert_close(sae.tensors()[name], tensor)
    ids, attn = next(context_batches(tokenizer, documents[:40], 32, 8))
    from auditor.models import capture

    acts = capture(model, ids, attn, [HOOKPOINT])[HOOKPOINT][token_mask(ids, attn, special_token_ids(tokenizer))]
    codes = sae.encode(acts)
    assert torch.all((codes > 0).sum(dim=-1) == 4)


def test_report_files_hold_every_field(trained: Any) -> None:
    data = json.loads((trained.out / REPORT_JSON).read_text())
    assert set(data) == set(TrainingReport.model_fields)
    for key in ("fve", "l0", "dead_fraction", "ce_increase", "ce_increase_zero_ablation", "tokens_trained", "wall_time_s"):
        assert data[key] is not None
    assert TrainingReport.model_validate(data).fve == trained.report.fve
    assert data["ce_skipped"] is None and data["ce_tokens"] > 0
    assert data["config"]["k"] == 4
    markdown = (trained.out / REPORT_MD).read_text()
    assert "held-out FVE" in markdown and "CE increase" in markdown and "## Training curve" in markdown


def test_report_figures_are_consistent(trained: Any) -> None:
    r = trained.report
    assert r.ce_increase == pytest.approx(r.ce_spliced - r.ce_clean)
    assert r.ce_increase_zero_ablation == pytest.approx(r.ce_zero_ablation - r.ce_clean)
    assert r.outlier_threshold == pytest.approx(3.0 * r.median_norm)
    assert 0.0 <= r.dead_fraction <= 1.0 and r.dead_window_tokens == 2000
    assert r.normalization_factor is not None and r.normalization_factor > 0


def _manual_ce(model: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], replace: Any) -> float:
    """Mean next-token loss with a plain torch forward hook on decoder layer 0 (no auditor hooks)."""
    layer = model.model.layers[0]
    total, count = 0.0, 0
    for ids, attn in batches:
        handle = None
        if replace is not None:
            handle = layer.register_forward_hook(lambda mod, args, out, ids=ids, attn=attn: replace(out, ids, attn))
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=attn).logits
        finally:
            if handle is not None:
                handle.remove()
        for row in range(ids.shape[0]):
            n = int(attn[row].sum())
            loss = F.cross_entropy(logits[row, : n - 1], ids[row, 1:n], reduction="sum")
            total += float(loss)
            count += n - 1
    return total / count


def test_ce_increase_equals_a_manual_splice(trained: Any, model: Any, tokenizer: Any, documents: list[str]) -> None:
    sae = trained.sae
    threshold = trained.report.outlier_threshold
    special = special_token_ids(tokenizer)
    batches = list(context_batches(tokenizer, documents[:40], 32, 8))[:2]
    # A short last row exercises the padding.
    batches.append(next(context_batches(tokenizer, documents[:1], 32, 8)))

    def spliced(out: torch.Tensor, ids: torch.Tensor, attn: torch.Tensor, zero: bool = False) -> torch.Tensor:
        keep = token_mask(ids, attn, special) & (out.norm(dim=-1) <= threshold)
        new = torch.zeros_like(out) if zero else sae(out.reshape(-1, out.shape[-1])).reshape(out.shape)
        return torch.where(keep.unsqueeze(-1), new, out)

    clean = _manual_ce(model, batches, None)
    with_sae = _manual_ce(model, batches, spliced)
    zeroed = _manual_ce(model, batches, lambda out, ids, attn: spliced(out, ids, attn, zero=True))
    result = splice_cross_entropy(model, sae, HOOKPOINT, batches, special_ids=special, outlier_threshold=threshold)
    torch.testing.assert_close(torch.tensor([result.clean, result.spliced, result.zero_ablation]),
                               torch.tensor([clean, with_sae, zeroed]), rtol=1e-5, atol=1e-5)
    assert result.increase == pytest.approx(with_sae - clean, abs=1e-5)
    assert with_sae != clean  # the splice changed something
    assert result.spliced_positions > 0


def _synthetic(n: int, gen: torch.Generator, dictionary: torch.Tensor) -> torch.Tensor:
    """Rows that are sums of 3 random dictionary directions with positive weights, plus a little noise."""
    idx = torch.randint(0, dictionary.shape[0], (n, 3), generator=gen)
    weights = torch.rand(n, 3, generator=gen) * 2 + 0.5
    code = torch.zeros(n, dictionary.shape[0]).scatter_(1, idx, weights)
    return code @ dictionary + 0.01 * torch.randn(n, dictionary.shape[1], generator=gen)


def _run_with_killed_latents(aux_coef: float, steps: int = 200) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    dictionary = torch.randn(64, 16, generator=gen)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    cfg = TrainConfig(
        hookpoint=HOOKPOINT, tokens=steps * 256, expansion=8, k=4, batch_size=256, buffer_tokens=256,
        dead_tokens=1024, aux_k=16, aux_coef=aux_coef, lr=2e-3, lr_warmup_fraction=0, lr_decay="constant",
    )
    trainer = SAETrainer(cfg, 16, total_steps=steps)
    trainer.initialize(_synthetic(2048, gen, dictionary))
    killed = torch.arange(32)
    # Shrunken encoder columns never win a top-k slot, so these latents never fire.
    with torch.no_grad():
        trainer.sae.W_enc[:, killed] *= 0.05
    for _ in range(steps):
        trainer.step(_synthetic(256, gen, dictionary))
    dead = trainer.dead_mask()
    return float(dead[killed].float().mean()), float(dead.float().mean())


def test_auxk_revives_killed_latents() -> None:
    killed_dead_aux, all_dead_aux = _run_with_killed_latents(aux_coef=1 / 32)
    killed_dead_plain, all_dead_plain = _run_with_killed_latents(aux_coef=0.0)
    assert killed_dead_plain == 1.0  # without AuxK nothing brings them back
    assert killed_dead_aux <= 0.8
    assert all_dead_aux < all_dead_plain


@pytest.mark.parametrize(
    ("decay", "expected"),
    [
        ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
        ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_lr_schedule(decay: str, expected: list[float]) -> None:
    cfg = TrainConfig(hookpoint=HOOKPOINT, lr=1.0, lr_warmup_fraction=1 / 3, lr_decay=decay, batch_size=8, buffer_tokens=8)
    trainer = SAETrainer(cfg, 4, total_steps=6)
    trainer.initialize(torch.randn(64, 4))
    lrs = []
    for _ in range(6):
        lrs.append(trainer.step(torch.randn(8, 4)).lr)
    assert lrs == pytest.approx(expected)


def test_same_seed_same_weights(model: Any, tokenizer: Any, documents: list[str]) -> None:
    cfg = TrainConfig(tokens=2048, **{**SMALL, "ce_contexts": 0})
    first = train_sae(cfg, model=model, tokenizer=tokenizer, documents=documents).sae
    second = train_sae(cfg, model=model, tokenizer=tokenizer, documents=documents).sae
    for name, tensor in first.tensors().items():
        assert torch.equal(second.tensors()[name], tensor)


def test_train_from_a_saved_shard(tmp_path: Path, model: Any, tokenizer: Any, corpus_file: Path) -> None:
    documents = read_corpus(corpus_file)
    cfg = TrainConfig(tokens=6000, **SMALL)
    path = tmp_path / "acts.safetensors"
    shard = collect_activations(cfg, model=model, tokenizer=tokenizer, documents=documents, model_name="tiny", path=path)
    assert shard.train.shape == (6000, 32) and shard.eval.shape == (1000, 32)
    loaded = load_activations(path)
    assert loaded.metadata["hook_name"] == HOOKPOINT
    result = train_sae(cfg, activations=loaded, out=tmp_path / "sae")
    report = result.report
    assert report.ce_skipped is not None and report.ce_clean is None
    assert report.fve > report.fve_initial
    assert report.median_norm == pytest.approx(float(loaded.metadata["median_norm"]))
    assert load_sae(str(tmp_path / "sae")).cfg.d_in == 32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eval_documents": 1000}, "held out for evaluation"),
        ({"eval_documents": 0}, "eval_documents must be >= 1"),
        ({"k": 1000}, "must be <= d_sae"),
        ({"hookpoint": f"blocks.{LAYERS}.hook_resid_post"}, "out of range"),
    ],
)
def test_bad_settings_are_rejected(change: dict[str, Any], message: str, model: Any, tokenizer: Any,
                                   documents: list[str]) -> None:
    cfg = TrainConfig(tokens=512, **{**SMALL, **change})
    with pytest.raises(AuditorError, match=message):
        train_sae(cfg, model=model, tokenizer=tokenizer, documents=documents)


def test_needs_a_data_source() -> None:
    with pytest.raises(ConfigError, match="either stored activations or a model"):
        train_sae(TrainConfig(hookpoint=HOOKPOINT))


def test_shard_without_held_out_rows_is_rejected() -> None:
    shard = ActivationShard(torch.randn(10, 4), torch.zeros(0, 4), {})
    with pytest.raises(ConfigError, match="held-out"):
        train_sae(TrainConfig(hookpoint=HOOKPOINT, batch_size=8, buffer_tokens=8), activations=shard)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast", [False, True])
def test_trains_on_cuda(autocast: bool, model: Any, tokenizer: Any, documents: list[str]) -> None:
    cuda_model = model.to("cuda")
    try:
        cfg = TrainConfig(tokens=8000, autocast_bf16=autocast, **SMALL)
        result = train_sae(cfg, model=cuda_model, tokenizer=tokenizer, documents=documents, device="cuda")
    finally:
        model.to("cpu")
    report = result.report
    assert report.device == "cuda" and report.fve > report.fve_initial
    assert result.sae.W_enc.device.type == "cpu"
    assert report.ce_increase is not None and math.isfinite(report.ce_increase)
    norms = result.sae.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
