"""``auditor train-sae``: collect activations and train a TopK SAE on one hookpoint.

Every :class:`~auditor.train.config.TrainConfig` field is a flag (``batch_size`` ->
``--batch-size``, help text from the field's docstring), so the config, the CLI and the
report's record of the run cannot drift apart.

Example::

    auditor train-sae --hookpoint blocks.15.hook_resid_post --corpus .cache/corpus/corpus.jsonl \\
        --tokens 2000000 --expansion 8 --k 32 --out saes/smollm2-l15
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from auditor.errors import ConfigError
from auditor.models.loading import MODEL_DTYPES

__all__ = ["register", "run_train_sae"]

# Set by dedicated flags (--hookpoint is required here, the others are named as in the brief).
_SPECIAL = {"hookpoint"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _none_or(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from auditor.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training settings (TrainConfig)")
    for name, info in TrainConfig.model_fields.items():
        if name in _SPECIAL:
            continue
        hint = hints[name]
        help_text = f"{info.description or ''} (default: {info.default})"
        args = get_args(hint)
        optional = get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": name}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is Literal:
            kwargs["choices"] = list(get_args(base))
        elif get_origin(base) is tuple:
            kwargs["nargs"] = len(get_args(base))
            kwargs["type"] = get_args(base)[0]
            kwargs["metavar"] = "X"
        else:
            kwargs["type"] = _none_or(base) if optional else base
            if optional:
                kwargs["help"] = help_text + "; 'none' unsets it"
        group.add_argument(_flag(name), **kwargs)


def register(subparsers: Any) -> None:
    """Add ``train-sae`` to the ``auditor`` command."""
    parser = subparsers.add_parser(
        "train-sae",
        help="train a TopK SAE on a model's activations at one hookpoint",
        description=(
            "Stream activations of a corpus through the model (stopping after the hookpoint's layer), "
            "drop masked and outlier tokens, train a TopK SAE with AuxK, and write it in the SAELens "
            "layout with training_report.json and TRAINING_REPORT.md."
        ),
    )
    parser.add_argument("--model", metavar="NAME|PATH", help="model id, folder or .gguf (default: embedded SmolLM2-135M-Instruct; env AUDITOR_MODEL)")
    parser.add_argument("--hookpoint", required=True, metavar="NAME", help="e.g. blocks.15.hook_resid_post")
    parser.add_argument("--corpus", metavar="FILE.jsonl", help='JSONL, one {"text": ...} a line (scripts/build_corpus.py writes one)')
    parser.add_argument("--out", metavar="DIR", help="folder for cfg.json, sae_weights.safetensors and the reports")
    parser.add_argument("--device", default="cpu", help="device for the model and the SAE (cpu, cuda, cuda:0; default cpu)")
    parser.add_argument("--save-activations", metavar="FILE.safetensors", help="also store the collected activations here")
    parser.add_argument("--collect-only", action="store_true", help="with --save-activations: collect and save, do not train")
    parser.add_argument("--activations", metavar="FILE", help="train from stored activations (.safetensors shard or .npy [N, d_in])")
    parser.add_argument(
        "--model-dtype", default="float32", choices=MODEL_DTYPES,
        help="dtype of the model that produces the activations (default float32, the dtype the CPU audits with)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(parser)
    parser.set_defaults(func=run_train_sae)


def _config(args: argparse.Namespace) -> Any:
    from auditor.train.config import TrainConfig

    values = {name: getattr(args, name) for name in TrainConfig.model_fields if hasattr(args, name)}
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_flag(str(err['loc'][0])) if err['loc'] else 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid training settings: {problems}") from None


def run_train_sae(args: argparse.Namespace) -> int:
    """Handler of ``auditor train-sae``; prints the Markdown report and returns 0."""
    from auditor._output import check_output_file, check_output_folder
    from auditor.models import load_model, parse_device
    from auditor.train.activations import load_activations, read_corpus
    from auditor.train.trainer import collect_activations, train_sae

    cfg = _config(args)
    if args.collect_only and not args.save_activations:
        raise ConfigError("--collect-only needs --save-activations FILE.safetensors")
    if args.activations and args.save_activations:
        raise ConfigError("--activations and --save-activations exclude each other (the activations are stored already)")
    if not args.activations and not args.corpus:
        raise ConfigError("pass --corpus FILE.jsonl to collect activations, or --activations FILE to train from a shard")
    if not args.collect_only and not args.out:
        raise ConfigError("--out DIR is required to save the trained SAE")
    # Before the model loads and the activations stream: a bad device or path fails now, not after training.
    parse_device(args.device)
    if args.out:
        check_output_folder(args.out)
    if args.save_activations:
        check_output_file(args.save_activations)
    progress = not args.quiet

    documents = read_corpus(args.corpus) if args.corpus else None
    # From a shard the model is needed only for the cross-entropy test, which needs the corpus too.
    loaded = load_model(args.model, device=args.device, dtype=args.model_dtype) if documents is not None else None
    dataset = Path(args.corpus).name if args.corpus else None

    shard = None
    if args.activations:
        shard = load_activations(args.activations, eval_rows=cfg.eval_tokens)
        shard.metadata.setdefault("source_file", str(args.activations))
    elif args.save_activations and loaded is not None and documents is not None:
        shard = collect_activations(
            cfg, model=loaded.model, tokenizer=loaded.tokenizer, documents=documents,
            model_name=loaded.name, path=args.save_activations, adapter=loaded.adapter, progress=progress,
        )
        print(f"saved {shard.train.shape[0]:,} training and {shard.eval.shape[0]:,} held-out activations "
              f"to {args.save_activations}", file=sys.stderr)
        if args.collect_only:
            return 0

    model_name = loaded.name if loaded else None
    if model_name is None and shard is not None:
        model_name = shard.metadata.get("model_name") or None
    result = train_sae(
        cfg,
        model=loaded.model if loaded else None,
        tokenizer=loaded.tokenizer if loaded else None,
        documents=documents,
        activations=shard,
        model_name=model_name,
        dataset=dataset,
        out=args.out,
        device=args.device,
        adapter=loaded.adapter if loaded else None,
        progress=progress,
    )
    print(result.report.markdown())
    trained = result.report.tokens_trained
    if trained != cfg.tokens:
        # The trainer takes whole optimizer steps, so --tokens is rounded up to batches of --batch-size.
        print(
            f"note: trained on {trained:,} tokens, not the {cfg.tokens:,} of --tokens: training takes whole batches "
            f"of --batch-size {cfg.batch_size:,} ({result.report.steps:,} step{'s' if result.report.steps != 1 else ''}); "
            f"give --tokens as a multiple of --batch-size for an exact count",
            file=sys.stderr,
        )
    print(f"wrote {result.out}", file=sys.stderr)
    return 0
