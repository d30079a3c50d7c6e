"""``auditor library ...``: validate, show and import feature libraries.

Example::

    $ auditor library validate feature_libraries/examples/tiny/library.yaml
    feature_libraries/examples/tiny/library.yaml: ok (13 features)
    $ auditor library show feature_libraries/examples/tiny/library.yaml --category deception
    $ auditor library import-neuronpedia export.jsonl --sae-id gpt2-res-6 \\
          --model openai-community/gpt2 --hookpoint blocks.6.hook_resid_pre -o library.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``library`` command group to the top-level parser."""
    parser = subparsers.add_parser("library", help="validate, show and import feature libraries")
    sub = parser.add_subparsers(dest="library_command", metavar="SUBCOMMAND")
    sub.required = True

    validate = sub.add_parser(
        "validate",
        help="check library files; print FILE:LINE:COLUMN: message per problem",
        description="Exit 0 when every library is valid, 1 when any problem was found.",
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="library.yaml files (or their folders)")
    validate.set_defaults(func=_validate)

    show = sub.add_parser("show", help="list a library's features")
    show.add_argument("library", metavar="ID|FILE", help="library id or path to a library.yaml")
    show.add_argument("--search", metavar="TEXT", help="only features whose name or description contains TEXT")
    show.add_argument("--category", metavar="C", help="only features of category C")
    show.set_defaults(func=_show)

    imp = sub.add_parser(
        "import-neuronpedia",
        help="convert a Neuronpedia explanation export (JSONL) into a library",
        description="Each explained latent becomes a feature named <category>.<slug of its description>. "
        "Categories come from --category rules (first match wins), else 'uncategorized'.",
    )
    imp.add_argument("export", metavar="EXPORT.jsonl", help="Neuronpedia explanations (JSON lines or a JSON array)")
    imp.add_argument("--sae-id", required=True, help="SAE id written into the library")
    imp.add_argument("--model", required=True, help="model the SAE reads (Hugging Face id)")
    imp.add_argument("--hookpoint", required=True, help="e.g. blocks.6.hook_resid_pre")
    imp.add_argument("--id", dest="library_id", help="library id (default: the SAE id)")
    imp.add_argument("--sae-path", help="SAE weights: path relative to the output file, hf://..., or release:...")
    imp.add_argument("--d-sae", type=int, help="number of SAE latents (checks indices)")
    imp.add_argument("--layer", help="Neuronpedia source id to keep when the export holds several (e.g. 6-res-jb)")
    imp.add_argument(
        "--category",
        action="append",
        default=[],
        metavar="CATEGORY=KW[,KW...]",
        help="category rule: descriptions containing any keyword get CATEGORY (repeatable, first match wins)",
    )
    imp.add_argument("-o", "--output", required=True, type=Path, help="library.yaml to write")
    imp.set_defaults(func=_import)


def _validate(args: argparse.Namespace) -> int:
    from auditor.errors import LibraryError
    from auditor.features.library import load_library

    failed = False
    for f in args.files:
        try:
            lib = load_library(Path(f))
        except LibraryError as exc:
            failed = True
            print(exc.message, file=sys.stderr)
            continue
        n = len(lib.features)
        print(f"{f}: ok ({n} feature{'s' if n != 1 else ''})")
    return 1 if failed else 0


def _show(args: argparse.Namespace) -> int:
    from auditor.features.library import load_library

    lib = load_library(args.library)
    sae = lib.sae
    print(f"library {lib.id}: SAE {sae.id} on {sae.model} at {sae.hookpoint}, {len(lib.features)} features ({lib.path})")
    found = lib.search(args.search, args.category)
    if not found:
        print("no matching features")
        return 0
    width = max(len(f.name) for f in found)
    cat_width = max(len(f.category) for f in found)
    for f in found:
        print(f"{f.index:>7}  {f.name:<{width}}  {f.category:<{cat_width}}  {f.description}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from auditor._output import check_output_file, write_text
    from auditor.features.library import library_to_yaml
    from auditor.features.neuronpedia import import_neuronpedia, parse_category_rule

    rules = [parse_category_rule(spec) for spec in args.category]
    check_output_file(args.output)
    report = import_neuronpedia(
        args.export,
        sae_id=args.sae_id,
        model=args.model,
        hookpoint=args.hookpoint,
        library_id=args.library_id,
        sae_path=args.sae_path,
        d_sae=args.d_sae,
        layer=args.layer,
        categories=rules,
    )
    header = f"Imported from Neuronpedia explanations: {Path(args.export).name}"
    write_text(args.output, library_to_yaml(report.library, header=header))
    skipped = []
    if report.duplicates:
        skipped.append(f"{report.duplicates} extra explanation(s) of an already-named latent")
    if report.empty:
        skipped.append(f"{report.empty} empty description(s)")
    note = f"; skipped {', '.join(skipped)}" if skipped else ""
    print(f"{args.output}: wrote {len(report.library.features)} features from {report.rows} rows{note}")
    return 0
