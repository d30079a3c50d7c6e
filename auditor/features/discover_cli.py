"""``auditor split-data``, ``auditor discover``, ``auditor calibrate``, ``auditor evaluate-detection``.

The labelled-data workflow that builds a feature library and its default policy::

    $ auditor split-data datasets/safety-v1                       # counts; writes split.json
    $ auditor discover --data datasets/safety-v1 --sae sae-l10=feature_libraries/smollm2-135m-instruct/sae-l10 \\
          --markdown discovery.md                                   # candidates with contexts
    $ auditor calibrate --data datasets/safety-v1 --library feature_libraries/smollm2-135m-instruct \\
          --labels feature_libraries/smollm2-135m-instruct/labels.yaml --write-policy policies/default.yaml
    $ auditor evaluate-detection --data datasets/safety-v1 --policy policies/default.yaml \\
          -o feature_libraries/smollm2-135m-instruct/REPORT.md

Features of the labelled texts are computed once per SAE and cached under ``.cache/``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from auditor._output import check_output_file, write_text
from auditor.models.loading import MODEL_DTYPES

if TYPE_CHECKING:
    from auditor.features.labelled import Side

__all__ = ["register"]

_DEFAULT_LIBRARY = "smollm2-135m-instruct"


def _common(p: argparse.ArgumentParser, *, data_required: bool = True) -> None:
    p.add_argument("--data", required=data_required, metavar="DIR", help="folder of labelled *.jsonl files (rows: id, category, kind, text)")
    p.add_argument("--heldout", type=float, default=0.3, help="held-out fraction per (category, kind) (default 0.3)")
    p.add_argument("--salt", default="safety-v1", help="salt of the id hash that orders rows for the split")
    p.add_argument("--model", metavar="NAME|PATH", help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--dtype", choices=MODEL_DTYPES,
        help="the model's dtype (default float32 on the CPU): calibrate in the dtype the sidecar will run",
    )
    p.add_argument("--cache-dir", metavar="DIR", help="where pooled features are cached (default .cache/labelled-features)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per forward batch (default 2048)")
    p.add_argument("--category", action="append", default=[], metavar="C", help="only these categories (repeatable; default: all)")


def register(subparsers: Any) -> None:
    """Add the four commands to the top-level parser."""
    sp = subparsers.add_parser(
        "split-data",
        help="deterministic, stratified train / held-out split of a labelled data set",
        description="Within each (category, kind) the rows are ordered by a salted SHA-256 of their id and "
        "the first round(fraction * n) are held out. Prints the counts; writes DIR/split.json.",
    )
    sp.add_argument("data", metavar="DIR", help="folder of labelled *.jsonl files")
    sp.add_argument("--heldout", type=float, default=0.3, help="held-out fraction (default 0.3)")
    sp.add_argument("--salt", default="safety-v1", help="salt of the id hash")
    sp.add_argument("-o", "--output", type=Path, help="where to write the split (default DIR/split.json; '-' for none)")
    sp.set_defaults(func=_split)

    d = subparsers.add_parser(
        "discover",
        help="rank SAE latents by how well they separate each category from benign text",
        description="For each category: latents ranked by training-split AUROC (max over tokens) against benign "
        "texts, with mean difference, activity rates and top-activating contexts.",
    )
    _common(d)
    d.add_argument("--library", default=_DEFAULT_LIBRARY, metavar="ID|PATH", help="library whose SAE is used (default: the default library)")
    d.add_argument("--sae", action="append", default=[], metavar="NAME=PATH", help="SAE(s) to rank instead of the library's (repeatable)")
    d.add_argument("--top", type=int, default=15, help="latents per category (default 15)")
    d.add_argument("--contexts", type=int, default=4, help="contexts per latent (default 4)")
    d.add_argument("--json", dest="json_out", type=Path, metavar="FILE", help="write all candidates as JSON")
    d.add_argument("--markdown", type=Path, metavar="FILE", help="write the candidates as Markdown")
    d.add_argument(
        "--propose", type=int, metavar="N",
        help="also propose N latents per category (largest positive weights of an L1 probe over all latents) "
        "as a labels file for review (needs --labels-out; with several --sae, the first is used)",
    )
    d.add_argument("--labels-out", type=Path, metavar="FILE", help="where --propose writes its labels (YAML)")
    d.add_argument(
        "--exclude-latent", type=int, action="append", default=[], metavar="I",
        help="never propose latent I (repeatable), e.g. one that only reacts to an artifact of the data",
    )
    d.set_defaults(func=_discover)

    c = subparsers.add_parser(
        "calibrate",
        help="measure labelled features, fit per-category probes and set thresholds at a target FPR",
        description="Rewrites the library's features (with statistics) and probes, writes probes/<category>.json "
        "and calibration.json beside it, and optionally the default policy.",
    )
    _common(c)
    c.add_argument("--library", required=True, metavar="PATH", help="library.yaml (or its folder) to update")
    c.add_argument("--labels", type=Path, metavar="FILE", help="YAML list of {index, name, description}; default: pick latents automatically")
    c.add_argument("--per-category", type=int, default=6, help="latents per category when picking automatically (default 6)")
    c.add_argument("--target-fpr", type=float, default=0.05, help="benign false-positive rate of the alert thresholds (default 0.05)")
    c.add_argument("--strict-fpr", type=float, default=0.01, help="benign false-positive rate of the stricter rules (default 0.01)")
    c.add_argument("--pool", choices=("auto", "max", "mean"), default="auto", help="how probes pool features over tokens (default auto)")
    c.add_argument("--write-policy", type=Path, metavar="FILE", help="also write the default policy generated from the calibration")
    c.add_argument("--feature-rules", action="store_true", help="add a single-feature rule per category to the policy")
    c.add_argument("--dry-run", action="store_true", help="print the calibration, write nothing")
    c.set_defaults(func=_calibrate)

    e = subparsers.add_parser(
        "evaluate-detection",
        help="held-out detection report: best single feature vs the policy vs a raw-activation probe",
        description="Per category: AUROC and TPR at the target FPR on the held-out split of (a) the best single "
        "latent chosen on train, (b) the policy's category score through the full audit pipeline, (c) a logistic "
        "probe on the raw hookpoint activation fitted on train.",
    )
    _common(e)
    e.add_argument("--policy", default="policies/default.yaml", metavar="FILE", help="policy to evaluate (default policies/default.yaml)")
    e.add_argument("--compare-sae", action="append", default=[], metavar="NAME=PATH", help="also compare hookpoints with these SAEs (repeatable)")
    e.add_argument("--target-fpr", type=float, default=0.05, help="false-positive rate for TPR (default 0.05)")
    e.add_argument("--notes", type=Path, metavar="FILE", help="Markdown appended to the report as its Notes section")
    e.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the Markdown report here (default: print it)")
    e.add_argument("--json", dest="json_out", type=Path, metavar="FILE", help="also write the numbers as JSON")
    e.set_defaults(func=_evaluate)


# ---------------------------------------------------------------- helpers


def _warn(lines: list[str]) -> None:
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


def _load(args: argparse.Namespace, need: Sequence[Side]) -> tuple[list[Any], dict[str, Any], list[str]]:
    """The rows, their split and the categories to work on, with the split checked for the sides ``need``."""
    from auditor.features.labelled import assign_split, check_split, load_labelled

    rows = load_labelled(args.data)
    split = assign_split(rows, heldout=args.heldout, salt=args.salt)
    cats = _categories(args, rows)
    _warn(check_split(rows, split, args.heldout, need=need, categories=cats))
    return rows, split, cats


def _categories(args: argparse.Namespace, rows: list[Any]) -> list[str]:
    from auditor.errors import DatasetError
    from auditor.features.labelled import BENIGN

    present = sorted({r.category for r in rows if r.category != BENIGN})
    if not present:
        raise DatasetError(
            args.data,
            f"every row is {BENIGN!r}; features are ranked and calibrated by how they separate another category "
            f"(such as 'deception') from {BENIGN} text, so add rows of at least one other category",
        )
    if not args.category:
        return present
    unknown = [c for c in args.category if c not in present]
    if unknown:
        raise DatasetError(args.data, f"no rows of categories {unknown}; present: {', '.join(present)}")
    return list(args.category)


def _sae_specs(specs: list[str], flag: str) -> list[tuple[str, str]]:
    """``NAME=PATH`` pairs, each PATH an existing SAE file or folder."""
    from auditor.errors import ConfigError

    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{flag} expects NAME=PATH (got {spec!r})")
        if not Path(path).exists():
            raise ConfigError(f"{flag} {spec}: no such file or folder {path!r}; PATH is a local SAE file or folder")
        out.append((name, path))
    return out


def _library_sae(lib: Any) -> tuple[str, str]:
    from auditor.errors import LibraryError

    if lib.sae.path is None:
        raise LibraryError(f"library {lib.id!r} has no sae.path; pass --sae NAME=PATH")
    path = lib.resolve_path(lib.sae.path)
    if not path.exists():
        where = f" ({lib.path})" if lib.path is not None else ""
        raise LibraryError(f"library {lib.id!r}{where}: its sae.path {lib.sae.path!r} does not exist (looked for {path})")
    return path.name, str(path)


def _pooled(args: argparse.Namespace, rows: list[Any], saes: list[tuple[str, str]], model: Any = None) -> dict[str, Any]:
    from auditor.features.labelled import cached_pooled

    return cached_pooled(
        rows, saes, model=model, model_name=args.model, cache_dir=args.cache_dir, batch_tokens=args.batch_tokens,
        progress=True, dtype=args.dtype,
    )


def _library_ref(lib: Any, policy_path: Path) -> str:
    """How the policy names the library: its id when that finds this very file, else a relative path."""
    import os

    from auditor.errors import LibraryError
    from auditor.features.library import find_library

    try:
        if find_library(lib.id).resolve() == lib.path.resolve():
            return str(lib.id)
    except LibraryError:
        pass
    return os.path.relpath(lib.path.resolve(), policy_path.resolve().parent)


def _outputs(*paths: Path | None) -> None:
    """Check the files a command will write before its work (a bad path fails at once, not after it)."""
    for path in paths:
        if path is not None:
            check_output_file(path)


def _command_line() -> str:
    return "auditor " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# ---------------------------------------------------------------- commands


def _split(args: argparse.Namespace) -> int:
    from auditor.features.labelled import HELDOUT, assign_split, check_split, load_labelled, split_counts

    out = args.output if args.output is not None else Path(args.data) / "split.json"
    rows = load_labelled(args.data)
    if str(out) != "-":
        _outputs(out)
    split = assign_split(rows, heldout=args.heldout, salt=args.salt)
    _warn(check_split(rows, split, args.heldout))
    print(f"{'category':<12} {'train':>6} {'heldout':>8} {'prompt':>7} {'completion':>11} {'near_miss':>10}")
    for cat, c in split_counts(rows, split).items():
        print(f"{cat:<12} {c['train']:>6} {c['heldout']:>8} {c['prompt']:>7} {c['completion']:>11} {c['near_miss']:>10}")
    if str(out) != "-":
        doc = {
            "heldout_fraction": args.heldout,
            "salt": args.salt,
            "rule": "per (category, kind): rows ordered by sha256(salt + NUL + id); the first round(fraction * n) are held out",
            "heldout": sorted(r.id for r in rows if split[r.id] == HELDOUT),
        }
        write_text(out, json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


def _check_discover_args(args: argparse.Namespace) -> None:
    """The flag combinations ``discover`` refuses, checked before any data or model is read."""
    from auditor.errors import ConfigError

    if args.top < 1:
        raise ConfigError(f"--top is how many latents to list per category; give 1 or more (got {args.top})")
    if args.contexts < 0:
        raise ConfigError(f"--contexts is how many contexts to show per latent; give 0 or more (got {args.contexts})")
    if args.propose is None:
        if args.labels_out is not None:
            raise ConfigError("--labels-out is where --propose writes its labels; add --propose N (latents per category)")
        if args.exclude_latent:
            raise ConfigError("--exclude-latent only keeps latents out of --propose's labels; add --propose N and --labels-out FILE")
        return
    if args.propose < 1:
        raise ConfigError(f"--propose is how many latents to propose per category; give 1 or more (got {args.propose})")
    if args.labels_out is None:
        raise ConfigError("--propose needs --labels-out FILE, where the proposed labels are written")


def _discover(args: argparse.Namespace) -> int:
    from auditor.features.discover import check_latents, discover
    from auditor.features.library import load_library

    _check_discover_args(args)
    _outputs(args.json_out, args.markdown, args.labels_out)
    saes = _sae_specs(args.sae, "--sae")
    rows, split, cats = _load(args, need=("train",))
    d_sae = None
    if not saes:
        lib = load_library(args.library)
        saes = [_library_sae(lib)]
        d_sae = lib.sae.d_sae
    # The width of an SAE given by path is known once it is read; a negative index is wrong for any.
    check_latents(args.exclude_latent, d_sae, "--exclude-latent")
    pooled = _pooled(args, rows, saes)
    if args.propose is not None:
        check_latents(args.exclude_latent, pooled[saes[0][0]].max.shape[1], "--exclude-latent")
    everything: dict[str, dict[str, list[dict[str, Any]]]] = {}
    md = ["# Discovery: SAE latents ranked per category (training split, max over tokens, vs benign)", ""]
    for name, _ in saes:
        p = pooled[name]
        everything[name] = {}
        md += [f"## {name} (`{p.hookpoint}`)", ""]
        for cat in cats:
            cands = discover(p, rows, split, cat, top=args.top, n_contexts=args.contexts)
            everything[name][cat] = [c.as_dict() for c in cands]
            print(f"\n{name} {p.hookpoint}  {cat}")
            print(f"  {'latent':>6} {'AUROC':>6} {'vsOther':>7} {'meanDiff':>8} {'act%cat':>7} {'act%ben':>7}  top tokens")
            md += [f"### {cat}", "", "| latent | AUROC | AUROC vs other categories | mean diff | active in category | active in benign | top tokens | strongest contexts |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for cand in cands:
                toks = ", ".join(f"{t!r}x{n}" for t, n in cand.top_tokens[:5])
                other = f"{cand.auroc_other:.3f}" if cand.auroc_other is not None else "-"
                print(
                    f"  {cand.index:>6} {cand.auroc:>6.3f} {other:>7} {cand.mean_diff:>8.2f} "
                    f"{cand.frac_pos * 100:>6.1f}% {cand.frac_neg * 100:>6.1f}%  {toks}"
                )
                ctx = "<br>".join(c.replace("|", "\\|") for c in cand.contexts)
                md.append(
                    f"| {cand.index} | {cand.auroc:.3f} | {other} | {cand.mean_diff:.2f} | {cand.frac_pos:.2f} | "
                    f"{cand.frac_neg:.2f} | {toks.replace('|', chr(92) + '|')} | {ctx} |"
                )
            md.append("")
    if args.json_out:
        write_text(args.json_out, json.dumps(everything, indent=1) + "\n")
    if args.markdown:
        write_text(args.markdown, "\n".join(md) + "\n")
    if args.propose is not None:
        from auditor.features.calibrate import auto_labels, labels_to_yaml

        labels = auto_labels(pooled[saes[0][0]], rows, split, cats, per_category=args.propose, exclude=args.exclude_latent)
        write_text(args.labels_out, labels_to_yaml(labels))
        print(f"wrote {len(labels)} proposed labels to {args.labels_out}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from auditor.errors import ConfigError, LibraryError
    from auditor.features.calibrate import (
        auto_labels,
        calibrate,
        check_label_categories,
        labels_to_yaml,
        load_labels,
        policy_from_calibration,
    )
    from auditor.features.discover import check_fpr, check_latents
    from auditor.features.library import library_to_yaml, load_library

    check_fpr(args.target_fpr, args.strict_fpr)
    if args.per_category < 1:
        raise ConfigError(f"--per-category is how many latents to pick per category; give 1 or more (got {args.per_category})")
    lib = load_library(Path(args.library))
    if not args.dry_run:
        _outputs(args.write_policy)
    rows, split, cats = _load(args, need=("train",))
    labels = load_labels(args.labels) if args.labels is not None else None
    if labels is not None:
        check_label_categories(labels, rows, str(args.labels))
        if lib.sae.d_sae is not None:
            check_latents([lb.index for lb in labels], lib.sae.d_sae, f"{args.labels}: latent")
    name, path = _library_sae(lib)
    pooled = _pooled(args, rows, [(name, path)])[name]
    if labels is None:
        labels = auto_labels(pooled, rows, split, cats, per_category=args.per_category)
    folder = lib.path.parent if lib.path is not None else Path(".")
    dataset = Path(args.data).name
    new, cal = calibrate(
        lib,
        pooled,
        rows,
        split,
        labels,
        probe_dir=(Path(args.cache_dir or ".cache") / "dry-run-probes") if args.dry_run else folder / "probes",
        dataset=dataset,
        target_fpr=args.target_fpr,
        strict_fpr=args.strict_fpr,
        pool=args.pool,
        categories=cats,
    )
    print(f"{'probe':<20} {'pool':<5} {'C':>5} {'nonzero':>7} {'cvAUROC':>7} {'cvTPR':>6} {'thr':>7} {'strict':>7}")
    for p in cal.probes:
        print(
            f"{p.name:<20} {p.pool:<5} {p.C:>5g} {p.n_nonzero:>7} {p.cv_auroc:>7.3f} {p.cv_tpr:>6.3f} "
            f"{p.threshold:>7.4f} {p.strict_threshold:>7.4f}"
        )
    for f in cal.features:
        print(f"  {f.name:<36} latent {f.index:>5}  AUROC {f.auroc:.3f}  thr {f.threshold:.3f}  TPR {f.train_tpr:.3f}")
    _warn(cal.warnings)
    if args.dry_run:
        return 0
    header = (
        "Feature library of the default SAE for SmolLM2-135M-Instruct.\n"
        "Written by `auditor calibrate` (see REPORT.md in this folder for the commands and results);\n"
        f"feature statistics and probe thresholds come from the training split of {dataset}."
    )
    if lib.path is None:
        raise LibraryError(f"library {lib.id!r} was not read from a file; pass --library PATH")
    write_text(lib.path, library_to_yaml(new, header=header))
    write_text(folder / "calibration.json", cal.to_json())
    if args.labels is None:
        write_text(folder / "labels.auto.yaml", labels_to_yaml(labels))
    print(f"wrote {lib.path}, {folder / 'calibration.json'}, {len(cal.probes)} probes in {folder / 'probes'}")
    if args.write_policy is not None:
        ref = _library_ref(lib, args.write_policy)
        text = policy_from_calibration(cal, library_ref=ref, feature_rules=args.feature_rules)
        write_text(args.write_policy, text)
        print(f"wrote {args.write_policy}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from auditor.errors import ConfigError
    from auditor.features.discover import check_fpr
    from auditor.features.evaluate import compare_hookpoints, evaluate_detection, render_report
    from auditor.pipeline import Auditor

    check_fpr(args.target_fpr)
    if args.notes is not None and not args.notes.is_file():
        raise ConfigError(f"--notes {args.notes}: no such file; give a Markdown file to append as the report's Notes")
    extra = _sae_specs(args.compare_sae, "--compare-sae")
    _outputs(args.output, args.json_out)
    rows, split, cats = _load(args, need=("train", "heldout"))
    notes = args.notes.read_text(encoding="utf-8") if args.notes is not None else ""
    auditor = Auditor.load(policy=args.policy, model=args.model, dtype=args.dtype)
    engine = auditor.policy
    lib = auditor.library
    if engine is None or lib is None:
        raise ConfigError(f"{args.policy}: no policy or library was loaded")
    lib_sae = _library_sae(lib)
    pooled = _pooled(args, rows, [lib_sae, *[s for s in extra if s[0] != lib_sae[0]]], model=auditor.model)
    report = evaluate_detection(
        rows,
        split,
        pooled[lib_sae[0]],
        cats,
        auditor=auditor,
        engine=engine,
        dataset=args.data,
        target_fpr=args.target_fpr,
    )
    if extra:
        report.hookpoints = compare_hookpoints({n: pooled[n] for n in dict.fromkeys([lib_sae[0], *[s[0] for s in extra]])}, rows, split, cats)
    text = render_report(report, commands=[_command_line()], notes=notes)
    if args.json_out:
        write_text(args.json_out, json.dumps(report.as_dict(), indent=1) + "\n")
    if args.output:
        write_text(args.output, text)
        print(f"wrote {args.output}")
    else:
        print(text)
    for r in report.categories:
        pol = f"{r.policy.auroc:.3f}" if r.policy else "-"
        print(f"{r.category:<10} single {r.single.auroc:.3f}  policy {pol}  raw {r.raw.auroc:.3f}", file=sys.stderr)
    _warn(report.warnings)
    return 0
