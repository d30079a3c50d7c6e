"""The training report: ``training_report.json`` (this model) and ``TRAINING_REPORT.md`` (its rendering)."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from auditor.train.config import TrainConfig

__all__ = ["HistoryPoint", "TrainingReport", "REPORT_JSON", "REPORT_MD"]

REPORT_JSON = "training_report.json"
REPORT_MD = "TRAINING_REPORT.md"


class HistoryPoint(BaseModel):
    """Training-batch figures at one step."""

    step: int
    """Optimizer steps done."""
    tokens: int
    """Training tokens seen."""
    fve: float
    """FVE of the SAE on this step's batch (before the update)."""
    auxk_loss: float
    """AuxK loss of this step's batch (0 when no latent is dead)."""
    dead_fraction: float
    """Latents that have not fired for ``dead_tokens`` tokens."""
    lr: float
    """Learning rate of this step."""


class TrainingReport(BaseModel):
    """What a training run produced and how good it is."""

    model_config = ConfigDict(extra="forbid")

    model_name: str | None
    """Model the activations came from."""
    hookpoint: str
    """Where the SAE reads."""
    d_in: int
    """Activation width."""
    d_sae: int
    """Number of latents."""
    k: int
    """Active latents per token."""
    device: str
    """Device the SAE trained on."""
    tokens_trained: int
    """Activations the optimizer saw."""
    steps: int
    """Optimizer steps."""
    wall_time_s: float
    """Seconds for the whole run (collection, training, evaluation)."""
    train_time_s: float
    """Seconds spent in the training loop (collection included when streaming)."""
    eval_tokens: int
    """Held-out activations the reconstruction figures were measured on."""
    fve: float
    """Fraction of variance explained on the held-out activations."""
    fve_initial: float
    """The same before training (initialized SAE)."""
    l0: float
    """Mean non-zero latents per held-out token."""
    mse: float
    """Mean squared error per element on the held-out activations (raw scale)."""
    dead_fraction: float
    """Latents that did not fire during the last ``dead_window_tokens`` training tokens."""
    dead_window_tokens: int
    """Window of the dead-latent count: ``min(dead_tokens, tokens_trained)``."""
    eval_fired_fraction: float
    """Latents that fired at least once on the held-out activations."""
    ce_clean: float | None
    """Next-token cross-entropy of the clean model on held-out contexts (nats/token)."""
    ce_spliced: float | None
    """The same with the SAE reconstruction spliced in at the hookpoint."""
    ce_zero_ablation: float | None
    """The same with the activation zeroed."""
    ce_increase: float | None
    """``ce_spliced - ce_clean``."""
    ce_increase_zero_ablation: float | None
    """``ce_zero_ablation - ce_clean``."""
    ce_loss_recovered: float | None
    """``(ce_zero_ablation - ce_spliced) / (ce_zero_ablation - ce_clean)``."""
    ce_tokens: int
    """Predicted tokens in the cross-entropy test."""
    ce_skipped: str | None
    """Why the cross-entropy test did not run (None when it ran)."""
    normalization_factor: float | None
    """``sqrt(d_in) / E||x||`` applied to inputs (stored in cfg.json), None without normalization."""
    median_norm: float | None
    """Median activation norm of the collected tokens."""
    outlier_threshold: float | None
    """Norm above which tokens were dropped (``outlier_factor x median_norm``)."""
    tokens_collected: int
    """Clean activations produced by the model (or read from the shard)."""
    tokens_masked: int
    """Positions masked out (position 0, special tokens, padding excluded)."""
    tokens_dropped_outliers: int
    """Tokens dropped as norm outliers."""
    corpus_epochs: int
    """Complete passes over the training documents (0: the run ended inside the first pass)."""
    activations_source: str
    """``model`` (streamed) or the shard file trained from."""
    history: list[HistoryPoint]
    """Training curve."""
    config: TrainConfig
    """The settings of the run."""

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``training_report.json`` and ``TRAINING_REPORT.md`` into ``folder``."""
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        json_path = target / REPORT_JSON
        json_path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        md_path = target / REPORT_MD
        md_path.write_text(self.markdown(), encoding="utf-8")
        return json_path, md_path

    def markdown(self) -> str:
        """The report as a short Markdown page."""

        def num(value: float | None, digits: int = 4) -> str:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return "n/a"
            return f"{value:.{digits}f}"

        rows = [
            ("model", self.model_name or "n/a"),
            ("hookpoint", f"`{self.hookpoint}`"),
            ("d_in x d_sae, k", f"{self.d_in} x {self.d_sae}, k={self.k}"),
            ("tokens trained", f"{self.tokens_trained:,} ({self.steps:,} steps, {self.corpus_epochs} complete corpus pass(es))"),
            ("device, wall time", f"{self.device}, {self.wall_time_s:.1f} s (training loop {self.train_time_s:.1f} s)"),
            ("held-out FVE", f"{num(self.fve)} (at init {num(self.fve_initial)}; {self.eval_tokens:,} tokens)"),
            ("L0", num(self.l0, 2)),
            ("dead latents", f"{num(self.dead_fraction * 100, 2)}% (no activation in the last {self.dead_window_tokens:,} tokens)"),
            ("latents fired on held-out", f"{num(self.eval_fired_fraction * 100, 2)}%"),
        ]
        if self.ce_skipped is None:
            rows += [
                ("CE clean / spliced / zero-abl.", f"{num(self.ce_clean)} / {num(self.ce_spliced)} / {num(self.ce_zero_ablation)} nats"),
                ("CE increase (SAE, zero-abl.)", f"{num(self.ce_increase)} / {num(self.ce_increase_zero_ablation)} nats"),
                ("CE loss recovered", f"{num(self.ce_loss_recovered)} ({self.ce_tokens:,} tokens)"),
            ]
        else:
            rows.append(("CE splice test", f"skipped: {self.ce_skipped}"))
        rows += [
            ("input normalization", "none" if self.normalization_factor is None else f"x {self.normalization_factor:.6g}"),
            ("median norm, outlier limit", f"{num(self.median_norm, 2)}, {num(self.outlier_threshold, 2)}"),
            ("tokens collected / masked / outliers dropped",
             f"{self.tokens_collected:,} / {self.tokens_masked:,} / {self.tokens_dropped_outliers:,}"),
            ("activations from", self.activations_source),
        ]
        lines = ["# SAE training report", "", "| | |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in rows]
        if self.history:
            lines += ["", "## Training curve", "", "| step | tokens | batch FVE | AuxK loss | dead | lr |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: |"]
            stride = max(1, len(self.history) // 20)
            shown = self.history[::stride]
            if shown[-1] is not self.history[-1]:
                shown.append(self.history[-1])
            lines += [
                f"| {p.step} | {p.tokens:,} | {p.fve:.4f} | {p.auxk_loss:.4f} | {p.dead_fraction * 100:.2f}% | {p.lr:.2e} |"
                for p in shown
            ]
        lines += ["", "## Settings", "", "```json", self.config.model_dump_json(indent=2), "```", ""]
        return "\n".join(lines)
