"""Train a TopK SAE on one hookpoint of a model: collection, optimization, evaluation, export.

:class:`SAETrainer` is the optimization core (Adam, warmup then decay, unit-norm decoder,
AuxK on dead latents); :func:`collect_activations` gathers a shard of activations;
:func:`train_sae` runs the whole job and returns the exported :class:`~auditor.sae.SAE`
with its :class:`~auditor.train.report.TrainingReport`.

Example::

    loaded = load_model(None)
    cfg = TrainConfig(hookpoint="blocks.15.hook_resid_post", tokens=2_000_000, expansion=8, k=32)
    result = train_sae(cfg, model=loaded.model, tokenizer=loaded.tokenizer,
                       documents=read_corpus("corpus.jsonl"), model_name=loaded.name, out="sae-out")
    result.report.fve
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm import tqdm

from auditor.errors import ConfigError
from auditor.models.adapters import ArchitectureAdapter
from auditor.models.hooks import resolve_hookpoints
from auditor.sae import SAE
from auditor.train.activations import (
    ActivationShard,
    ActivationSource,
    NormFilter,
    context_batches,
    save_activations,
    shuffled_batches,
    special_token_ids,
    tensor_batches,
)
from auditor.train.config import TrainConfig
from auditor.train.evaluate import evaluate_reconstruction, splice_cross_entropy
from auditor.train.report import HistoryPoint, TrainingReport
from auditor.train.topk import TopKSAE, geometric_median

__all__ = ["SAETrainer", "StepStats", "TrainResult", "collect_activations", "train_sae"]


class StepStats(NamedTuple):
    """Figures of one optimizer step, measured on its batch before the update."""

    fve: float
    """1 - FVU of the batch."""
    auxk_loss: float
    """AuxK loss of the batch."""
    dead_fraction: float
    """Latents not fired for ``dead_tokens`` tokens (after this batch)."""
    lr: float
    """Learning rate used for the step."""


class SAETrainer:
    """Adam on a :class:`TopKSAE`, with input normalization, an LR schedule and dead-latent tracking.

    Inputs to :meth:`step` are raw activations; :meth:`initialize` (called once, on a
    sample) fixes the normalization factor and the initial ``b_dec``.
    """

    def __init__(
        self, cfg: TrainConfig, d_in: int, *, total_steps: int, device: str | torch.device = "cpu"
    ) -> None:
        d_sae = cfg.expansion * d_in
        if cfg.k > d_sae:
            raise ConfigError(f"k ({cfg.k}) must be <= d_sae = expansion x d_in ({cfg.expansion} x {d_in} = {d_sae})")
        self.cfg = cfg
        self.device = torch.device(device)
        self.total_steps = max(1, total_steps)
        generator = torch.Generator().manual_seed(cfg.seed)
        self.sae = TopKSAE(d_in, d_sae, cfg.k, generator=generator, device=self.device)
        self.scale: float | None = None
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=self.device)
        self.steps = 0
        self.tokens = 0
        self.autocast = cfg.autocast_bf16 and self.device.type == "cuda"

    def _lr_factor(self, step: int) -> float:
        warmup = round(self.cfg.lr_warmup_fraction * self.total_steps)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        if self.cfg.lr_decay == "linear":
            return max(0.0, 1.0 - progress)
        if self.cfg.lr_decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    @torch.no_grad()
    def initialize(self, sample: Tensor) -> None:
        """Set the normalization factor and ``b_dec`` from raw activations ``sample [N, d_in]``."""
        sample = sample.to(device=self.device, dtype=torch.float32)
        if self.cfg.normalize:
            mean_norm = float(sample.norm(dim=-1).mean())
            if not mean_norm > 0:
                raise ConfigError("the activation sample has zero norm; cannot normalize (check the hookpoint)")
            self.scale = math.sqrt(self.sae.d_in) / mean_norm
        x = self.normalize(sample)
        if self.cfg.b_dec_init == "geometric_median":
            self.sae.b_dec.copy_(geometric_median(x))
        elif self.cfg.b_dec_init == "mean":
            self.sae.b_dec.copy_(x.mean(dim=0))
        else:
            self.sae.b_dec.zero_()

    def normalize(self, x: Tensor) -> Tensor:
        """``x`` times the normalization factor (unchanged without normalization)."""
        return x * self.scale if self.scale is not None else x

    def dead_mask(self, window: int | None = None) -> Tensor:
        """``[d_sae]`` bool: latents that have not fired in the last ``window`` tokens (default ``dead_tokens``)."""
        return self.tokens_since_fired >= (self.cfg.dead_tokens if window is None else window)

    def step(self, batch: Tensor) -> StepStats:
        """One optimizer step on raw activations ``batch [N, d_in]``."""
        x = self.normalize(batch.to(device=self.device, dtype=torch.float32))
        lr = self.optimizer.param_groups[0]["lr"]
        dead = self.dead_mask() if self.cfg.aux_coef > 0 else None
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.sae(x, dead_mask=dead, aux_k=self.cfg.aux_k)
        loss = out.fvu + self.cfg.aux_coef * out.auxk_loss
        loss.backward()
        self.sae.remove_parallel_grads()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.sae.normalize_decoder()
        with torch.no_grad():
            fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
            fired[out.top_indices[out.top_acts > 0]] = True
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0
        self.steps += 1
        self.tokens += x.shape[0]
        return StepStats(
            fve=1.0 - float(out.fvu.detach()),
            auxk_loss=float(out.auxk_loss.detach()),
            dead_fraction=float(self.dead_mask().float().mean()),
            lr=float(lr),
        )

    def export(self, **metadata: Any) -> SAE:
        """The current SAE in canonical form (``metadata``: model_name, hook_name, context_size, extras)."""
        return self.sae.to_sae(scale=self.scale, **metadata)


@dataclass
class TrainResult:
    """What :func:`train_sae` returns."""

    sae: SAE
    """The trained SAE (CPU, float32)."""
    report: TrainingReport
    """Its figures."""
    out: Path | None
    """Folder it was saved to, if any."""


def _split(documents: Sequence[str], cfg: TrainConfig) -> tuple[Sequence[str], Sequence[str]]:
    n_eval = cfg.eval_documents
    if n_eval < 1:
        raise ConfigError("eval_documents must be >= 1: held-out documents are needed for the evaluation")
    if len(documents) <= n_eval:
        raise ConfigError(
            f"the corpus has {len(documents)} documents but {n_eval} are held out for evaluation; "
            "use a larger corpus or lower eval_documents (--eval-documents)"
        )
    return documents[:n_eval], documents[n_eval:]


def _sources(
    cfg: TrainConfig,
    model: nn.Module,
    tokenizer: Any,
    documents: Sequence[str],
    device: torch.device,
    adapter: ArchitectureAdapter | None,
) -> tuple[ActivationSource, ActivationSource, NormFilter]:
    resolve_hookpoints(model, [cfg.hookpoint], adapter)
    eval_docs, train_docs = _split(documents, cfg)
    norm_filter = NormFilter(cfg.outlier_factor)
    common: dict[str, Any] = {
        "context_size": cfg.context_size,
        "model_batch_size": cfg.model_batch_size,
        "norm_filter": norm_filter,
        "seed": cfg.seed,
        "device": device,
        "adapter": adapter,
    }
    train = ActivationSource(model, tokenizer, cfg.hookpoint, train_docs, repeat=True, **common)
    held = ActivationSource(model, tokenizer, cfg.hookpoint, eval_docs, repeat=False, **common)
    return train, held, norm_filter


def collect_activations(
    cfg: TrainConfig,
    *,
    model: nn.Module,
    tokenizer: Any,
    documents: Sequence[str],
    model_name: str | None = None,
    path: str | Path | None = None,
    adapter: ArchitectureAdapter | None = None,
    progress: bool = False,
) -> ActivationShard:
    """Collect ``cfg.tokens`` training and ``cfg.eval_tokens`` held-out activations; save them to ``path``."""
    train, held, norm_filter = _sources(cfg, model, tokenizer, documents, torch.device("cpu"), adapter)
    train_rows: Tensor | None = None  # [tokens, d_in], allocated once the width is known
    have = 0
    with tqdm(total=cfg.tokens, desc="collecting", unit="tok", file=sys.stderr, disable=not progress) as bar:
        for chunk in train.chunks():
            if train_rows is None:
                # Filled in place: a list of chunks concatenated at the end would need twice the memory.
                train_rows = torch.empty(cfg.tokens, chunk.shape[1], dtype=torch.float32)
            take = min(chunk.shape[0], cfg.tokens - have)
            train_rows[have : have + take] = chunk[:take]
            have += take
            bar.update(take)
            if have >= cfg.tokens:
                break
    if train_rows is None:
        raise ConfigError("the documents produced no clean tokens; check the corpus and the tokenizer")
    eval_rows = held.take(cfg.eval_tokens)
    metadata = {
        "model_name": model_name or "",
        "hook_name": cfg.hookpoint,
        "context_size": str(cfg.context_size),
        "median_norm": repr(norm_filter.median),
        "outlier_factor": repr(cfg.outlier_factor),
        "tokens_masked": str(train.stats.masked + held.stats.masked),
        "tokens_dropped_outliers": str(norm_filter.dropped),
        "corpus_epochs": str(train.stats.epochs),
    }
    shard = ActivationShard(train_rows, eval_rows, metadata)
    if path is not None:
        save_activations(path, shard)
    return shard


def _meta_float(metadata: dict[str, str], key: str) -> float | None:
    try:
        value = float(metadata[key])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _meta_int(metadata: dict[str, str], key: str) -> int:
    try:
        return int(metadata[key])
    except (KeyError, ValueError):
        return 0


class _DataCounts(NamedTuple):
    median_norm: float | None
    collected: int
    masked: int
    dropped: int
    epochs: int


@dataclass
class _TrainingData:
    """Where the training batches, the initialization sample and the held-out rows come from."""

    stream: Iterator[Tensor]
    """Endless batches of raw activations."""
    sample: Tensor
    """``[n, d_in]`` rows for the normalization factor and ``b_dec``."""
    eval_acts: Tensor
    """``[m, d_in]`` held-out rows."""
    source: str
    """``model`` or the shard's file name."""
    shard: ActivationShard | None = None
    sources: tuple[ActivationSource, ActivationSource, NormFilter] | None = None

    def counts(self) -> _DataCounts:
        """Collection figures; for a streamed run, read them after training, when they are complete."""
        if self.sources is not None:
            train, held, norm_filter = self.sources
            return _DataCounts(
                median_norm=norm_filter.median,
                collected=norm_filter.seen - norm_filter.dropped,
                masked=train.stats.masked + held.stats.masked,
                dropped=norm_filter.dropped,
                epochs=train.stats.epochs,
            )
        shard = self.shard if self.shard is not None else ActivationShard(self.sample, self.eval_acts, {})
        return _DataCounts(
            median_norm=_meta_float(shard.metadata, "median_norm"),
            collected=int(shard.train.shape[0] + shard.eval.shape[0]),
            masked=_meta_int(shard.metadata, "tokens_masked"),
            dropped=_meta_int(shard.metadata, "tokens_dropped_outliers"),
            epochs=_meta_int(shard.metadata, "corpus_epochs"),
        )


def _shard_data(cfg: TrainConfig, shard: ActivationShard, device: torch.device, generator: torch.Generator) -> _TrainingData:
    if shard.eval.shape[0] == 0:
        raise ConfigError("the activation shard holds no held-out ('eval') rows")
    return _TrainingData(
        stream=tensor_batches(shard.train.to(device), cfg.batch_size, generator),
        sample=shard.train[: cfg.init_sample_tokens],
        eval_acts=shard.eval,
        source=shard.metadata.get("source_file", "activation shard"),
        shard=shard,
    )


def _streamed_data(
    cfg: TrainConfig,
    model: nn.Module,
    tokenizer: Any,
    documents: Sequence[str],
    device: torch.device,
    adapter: ArchitectureAdapter | None,
    generator: torch.Generator,
) -> _TrainingData:
    train, held, norm_filter = _sources(cfg, model, tokenizer, documents, device, adapter)
    chunks = train.chunks()
    # The sample's chunks are trained on too: they are put back in front of the stream.
    first: list[Tensor] = []
    have = 0
    while have < cfg.init_sample_tokens:
        chunk = next(chunks)
        first.append(chunk)
        have += chunk.shape[0]
    return _TrainingData(
        stream=shuffled_batches(itertools.chain(first, chunks), cfg.batch_size, cfg.buffer_tokens, generator),
        sample=torch.cat(first)[: cfg.init_sample_tokens],
        eval_acts=held.take(cfg.eval_tokens),
        source="model",
        sources=(train, held, norm_filter),
    )


def _ce_batches(
    tokenizer: Any, documents: Sequence[str], cfg: TrainConfig
) -> Iterator[tuple[Tensor, Tensor]]:
    """The first ``cfg.ce_contexts`` held-out contexts, in model batches."""
    left = cfg.ce_contexts
    for input_ids, attention_mask in context_batches(tokenizer, documents, cfg.context_size, cfg.model_batch_size):
        if left <= 0:
            return
        yield input_ids[:left], attention_mask[:left]
        left -= input_ids.shape[0]


def train_sae(
    cfg: TrainConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    documents: Sequence[str] | None = None,
    activations: ActivationShard | None = None,
    model_name: str | None = None,
    dataset: str | None = None,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    adapter: ArchitectureAdapter | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train a TopK SAE and evaluate it; save it with its report to ``out`` when given.

    Activations come from ``activations`` (a stored shard) or are streamed from ``model``
    over ``documents`` (the first ``cfg.eval_documents`` are held out). The
    cross-entropy splice test needs ``model``, ``tokenizer`` and ``documents``; without
    them the report says it was skipped.
    """
    started = time.perf_counter()
    dev = torch.device(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps = math.ceil(cfg.tokens / cfg.batch_size)

    if activations is not None:
        data = _shard_data(cfg, activations, dev, generator)
    elif model is None or tokenizer is None or documents is None:
        raise ConfigError("pass either stored activations or a model, its tokenizer and documents")
    else:
        data = _streamed_data(cfg, model, tokenizer, documents, dev, adapter, generator)

    d_in = int(data.sample.shape[1])
    trainer = SAETrainer(cfg, d_in, total_steps=steps, device=dev)
    trainer.initialize(data.sample)
    fve_initial = evaluate_reconstruction(trainer.export(), data.eval_acts).fve

    history: list[HistoryPoint] = []
    train_started = time.perf_counter()
    with tqdm(total=steps, desc="training", unit="step", file=sys.stderr, disable=not progress) as bar:
        for step in range(steps):
            stats = trainer.step(next(data.stream))
            if step % cfg.log_every == 0 or step == steps - 1:
                history.append(
                    HistoryPoint(step=trainer.steps, tokens=trainer.tokens, fve=stats.fve,
                                 auxk_loss=stats.auxk_loss, dead_fraction=stats.dead_fraction, lr=stats.lr)
                )
                bar.set_postfix(fve=f"{stats.fve:.3f}", dead=f"{stats.dead_fraction:.1%}")
            bar.update(1)
    train_time = time.perf_counter() - train_started

    counts = data.counts()
    median = counts.median_norm
    outlier_threshold = cfg.outlier_factor * median if cfg.outlier_factor is not None and median else None
    sae = trainer.export(
        model_name=model_name,
        hook_name=cfg.hookpoint,
        context_size=cfg.context_size,
        dataset=dataset,
        training_tokens=trainer.tokens,
    )
    recon = evaluate_reconstruction(sae, data.eval_acts)
    window = min(cfg.dead_tokens, trainer.tokens)

    ce = None
    ce_skipped: str | None = None
    if cfg.ce_contexts == 0:
        ce_skipped = "ce_contexts is 0"
    elif model is None or tokenizer is None or documents is None:
        ce_skipped = "no model, tokenizer and corpus given (trained from stored activations)"
    else:
        eval_docs, _ = _split(documents, cfg)
        ce = splice_cross_entropy(
            model, sae, cfg.hookpoint, _ce_batches(tokenizer, eval_docs, cfg),
            special_ids=special_token_ids(tokenizer), outlier_threshold=outlier_threshold, adapter=adapter,
        )

    report = TrainingReport(
        model_name=model_name,
        hookpoint=cfg.hookpoint,
        d_in=d_in,
        d_sae=trainer.sae.d_sae,
        k=cfg.k,
        device=str(dev),
        tokens_trained=trainer.tokens,
        steps=trainer.steps,
        wall_time_s=0.0,
        train_time_s=train_time,
        eval_tokens=recon.rows,
        fve=recon.fve,
        fve_initial=fve_initial,
        l0=recon.l0,
        mse=recon.mse,
        dead_fraction=float(trainer.dead_mask(window).float().mean()),
        dead_window_tokens=window,
        eval_fired_fraction=recon.latents_fired / trainer.sae.d_sae,
        ce_clean=ce.clean if ce else None,
        ce_spliced=ce.spliced if ce else None,
        ce_zero_ablation=ce.zero_ablation if ce else None,
        ce_increase=ce.increase if ce else None,
        ce_increase_zero_ablation=ce.increase_zero_ablation if ce else None,
        ce_loss_recovered=ce.loss_recovered if ce else None,
        ce_tokens=ce.tokens if ce else 0,
        ce_skipped=ce_skipped,
        normalization_factor=trainer.scale,
        median_norm=median,
        outlier_threshold=outlier_threshold,
        tokens_collected=counts.collected,
        tokens_masked=counts.masked,
        tokens_dropped_outliers=counts.dropped,
        corpus_epochs=counts.epochs,
        activations_source=data.source,
        history=history,
        config=cfg,
    )
    folder = Path(out) if out is not None else None
    report.wall_time_s = time.perf_counter() - started
    if folder is not None:
        sae.save(folder)
        report.write(folder)
    return TrainResult(sae=sae, report=report, out=folder)
