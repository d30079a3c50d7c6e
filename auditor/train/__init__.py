"""Train TopK sparse autoencoders on a model's activations.

Example::

    from auditor.train import TrainConfig, read_corpus, train_sae
    result = train_sae(TrainConfig(hookpoint="blocks.3.hook_resid_post", tokens=200_000),
                       model=model, tokenizer=tokenizer, documents=read_corpus("corpus.jsonl"), out="sae")
    result.report.fve, result.report.ce_increase
"""

from __future__ import annotations

from auditor._lazy import lazy_exports

# Names are imported on first use: `auditor train-sae --help` builds its parser from
# auditor.train.cli without paying for torch and transformers.
_LAZY: dict[str, str] = {
    "ActivationShard": "auditor.train.activations",
    "ActivationSource": "auditor.train.activations",
    "CrossEntropyResult": "auditor.train.evaluate",
    "NormFilter": "auditor.train.activations",
    "ReconstructionStats": "auditor.train.evaluate",
    "SAETrainer": "auditor.train.trainer",
    "StepStats": "auditor.train.trainer",
    "TopKSAE": "auditor.train.topk",
    "TrainConfig": "auditor.train.config",
    "TrainResult": "auditor.train.trainer",
    "TrainingReport": "auditor.train.report",
    "collect_activations": "auditor.train.trainer",
    "evaluate_reconstruction": "auditor.train.evaluate",
    "fraction_of_variance_explained": "auditor.train.evaluate",
    "geometric_median": "auditor.train.topk",
    "load_activations": "auditor.train.activations",
    "read_corpus": "auditor.train.activations",
    "save_activations": "auditor.train.activations",
    "splice_cross_entropy": "auditor.train.evaluate",
    "train_sae": "auditor.train.trainer",
}

__all__ = [
    "ActivationShard",
    "ActivationSource",
    "CrossEntropyResult",
    "NormFilter",
    "ReconstructionStats",
    "SAETrainer",
    "StepStats",
    "TopKSAE",
    "TrainConfig",
    "TrainResult",
    "TrainingReport",
    "collect_activations",
    "evaluate_reconstruction",
    "fraction_of_variance_explained",
    "geometric_median",
    "load_activations",
    "read_corpus",
    "save_activations",
    "splice_cross_entropy",
    "train_sae",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
