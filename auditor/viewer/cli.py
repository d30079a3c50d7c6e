"""``auditor index-features``: build the feature index the viewer shows (top contexts, histograms, density).

Example::

    $ python scripts/build_corpus.py            # writes .cache/corpus/corpus.jsonl
    $ auditor index-features --corpus .cache/corpus/corpus.jsonl --max-docs 3000
    indexed 3000 documents (71,230 tokens) -> feature_libraries/smollm2-135m-instruct/feature_index.safetensors
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``index-features`` command."""
    p = subparsers.add_parser(
        "index-features",
        help="index a corpus: top-activating contexts, histogram, density and max activation per latent",
        description=(
            "Run the model and SAE over a JSONL corpus and store, per latent, its top-activating contexts "
            "(token windows with per-token activations), an activation histogram, density and maximum, "
            "in feature_index.safetensors (+ feature_index.json) beside the library. Resumable: run it "
            "again with a larger --max-docs to continue where it stopped."
        ),
    )
    p.add_argument("--corpus", required=True, metavar="FILE.jsonl", help='one {"text"} (or {"messages"}) object per line')
    p.add_argument("--library", metavar="ID|PATH", help="feature library whose SAE to index (default: the default library)")
    p.add_argument("--sae", metavar="PATH", help="SAE to index instead of the library's")
    p.add_argument("--model", metavar="NAME|PATH", help="model (default: the embedded SmolLM2-135M-Instruct; env AUDITOR_MODEL)")
    p.add_argument("--hookpoint", metavar="NAME", help="override the SAE's hookpoint")
    p.add_argument("--max-docs", type=int, metavar="N", help="index the first N documents in all (default: the whole corpus)")
    p.add_argument("--contexts", type=int, default=8, metavar="N", help="top contexts kept per latent (default 8)")
    p.add_argument("--before", type=int, default=12, metavar="N", help="tokens kept before the strongest token (default 12)")
    p.add_argument("--after", type=int, default=4, metavar="N", help="tokens kept after it (default 4)")
    p.add_argument("--max-tokens", type=int, default=128, metavar="N", help="tokens per document (default 128)")
    p.add_argument("--batch-docs", type=int, default=16, metavar="N", help="documents per forward (default 16)")
    p.add_argument("--out", metavar="FILE", help="index file (default: feature_index.safetensors beside the library)")
    p.add_argument("--restart", action="store_true", help="ignore an existing index file and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from auditor._output import check_output_file
    from auditor.errors import ConfigError
    from auditor.models import parse_device
    from auditor.pipeline import Auditor
    from auditor.viewer.index import SAE_FINGERPRINT, IndexConfig, build_index, index_path_for, load_index, read_corpus

    for flag in ("max_docs", "batch_docs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    config = IndexConfig(contexts=args.contexts, before=args.before, after=args.after, max_tokens=args.max_tokens)
    config.check()
    parse_device(args.device)  # before the corpus is read and anything loads
    if args.sae is not None and args.out is None:
        raise ConfigError("with --sae pass --out FILE for the index (the default place is beside a library)")
    if args.out is not None:
        check_output_file(args.out)  # before the model loads
    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise ConfigError(f"{corpus}: corpus file not found (JSONL, one document per line; scripts/build_corpus.py writes one)")
    docs = read_corpus(corpus)
    first = next(docs, None)  # an empty corpus or a bad first line fails before the model loads
    if first is None:
        raise ConfigError(
            f"{corpus}: the corpus has no documents (the file is empty or holds only blank lines); "
            'give one JSON object per line, such as {"text": "..."} (scripts/build_corpus.py writes one)'
        )
    docs = itertools.chain([first], docs)
    auditor = Auditor.load(
        model=args.model, sae=args.sae, library=args.library, hookpoint=args.hookpoint, device=args.device
    )
    lib = auditor.library
    out = check_output_file(args.out if args.out is not None else index_path_for(lib))
    meta = {
        "sae": args.sae or (lib.sae.id if lib is not None else "sae"),
        "library": lib.id if lib is not None else None,
        "corpus": corpus.name,
    }
    start = 0
    if out.is_file() and not args.restart:
        stored = load_index(out)
        start = stored.docs_done
        if SAE_FINGERPRINT not in stored.meta:
            print(
                f"note: {out} was written before indexes recorded their SAE's fingerprint, so resuming checks the SAE "
                f"by its name only ({stored.meta.get('sae')!r}); pass --restart to rebuild it with one",
                file=sys.stderr,
            )
    total = args.max_docs
    bar = tqdm(total=total, initial=start, unit="doc", disable=args.no_progress, file=sys.stderr, desc="indexing")

    def progress(done: int) -> None:
        bar.update(done - bar.n)

    try:
        index = build_index(
            auditor,
            docs,
            out=out,
            max_docs=args.max_docs,
            config=config,
            batch_docs=args.batch_docs,
            resume=not args.restart,
            meta=meta,
            progress=progress,
        )
    finally:
        bar.close()
    print(f"indexed {index.docs_done} documents ({index.tokens_seen:,} tokens) -> {out}")
    return 0
