"""Benchmark: peak memory of the auditor, default SAE against a large (131,072-latent) random SAE.

Each case runs in a fresh child process so that peaks do not mix:

* ``baseline``: Python, torch and transformers imported, nothing loaded;
* ``default``: ``Auditor.load(policy=policies/default.yaml)`` and an audit of ``--texts`` texts;
* ``large``: the default model with a random ReLU SAE of ``--d-sae`` latents on its ``d_in``,
  audited once with a watch-list encode (64 latents) and once with a full-width encode
  (``top_k=5``, the worst case).

Reports peak RSS (``ru_maxrss``) and, on CUDA, ``torch.cuda.max_memory_allocated``.
Prints one JSON object and a summary table.

    PYTHONPATH=. python benchmarks/memory.py [--texts 32] [--d-sae 131072] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu_peak_mib(torch: Any, device: str) -> float | None:
    if device.startswith("cuda"):
        return float(torch.cuda.max_memory_allocated()) / 2**20
    return None


def run_case(case: str, texts: int, d_sae: int, device: str) -> dict[str, Any]:
    """One case, measured in this process."""
    import torch

    import transformers  # noqa: F401  (imported in every case, so the baseline counts it)

    out: dict[str, Any] = {"case": case}
    if case == "baseline":
        out["peak_rss_mib"] = _peak_rss_mib()
        return out

    from auditor.pipeline import Auditor
    from auditor.text import AuditInput
    from benchmarks.audit_throughput import load_texts, random_sae

    items = [AuditInput(text=t) for t in load_texts(texts)]
    if case == "default":
        auditor = Auditor.load(policy=str(REPO / "policies" / "default.yaml"), device=device)
        out["after_load_rss_mib"] = _peak_rss_mib()
        auditor.run(items)
        out["sae"] = {"architecture": auditor.sae.cfg.architecture, "d_sae": auditor.sae.cfg.d_sae}
    else:
        from auditor.models import load_model

        loaded = load_model(device=device)
        hook = "blocks.15.hook_resid_post"
        sae = random_sae("standard", loaded.d_model, d_sae, hook).to(device)
        auditor = Auditor(loaded, sae, hookpoint=hook)
        out["after_load_rss_mib"] = _peak_rss_mib()
        out["sae"] = {"architecture": "standard", "d_sae": d_sae}
        watched = torch.arange(64, device=device)
        with torch.inference_mode():
            for acts, mask in _batches(auditor, items):
                sae.encode(acts[mask], features=watched)
        out["after_watch_list_rss_mib"] = _peak_rss_mib()
        out["gpu_after_watch_list_mib"] = _gpu_peak_mib(torch, device)
        auditor.run(items, top_k=5)
    out["peak_rss_mib"] = _peak_rss_mib()
    out["gpu_peak_mib"] = _gpu_peak_mib(torch, device)
    return out


def _batches(auditor: Any, items: list[Any]) -> list[Any]:
    from auditor.text import tokenize_batch

    out = []
    for i in range(0, len(items), 8):
        b = tokenize_batch(auditor.model.tokenizer, items[i : i + 8], max_tokens=auditor.max_tokens)
        out.append(b)
    return [(auditor.activations(b), b.content_mask) for b in out]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--d-sae", type=int, default=131072)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--case", choices=["baseline", "default", "large"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.texts, args.d_sae, args.device)))
        return {}

    cases = []
    for case in ["baseline", "default", "large"]:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", "--case", case, "--texts", str(args.texts),
             "--d-sae", str(args.d_sae), "--device", args.device],
            cwd=REPO, capture_output=True, text=True, check=True,
        )
        cases.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    result = {"benchmark": "memory", "device": args.device, "texts": args.texts, "cases": cases}
    print(json.dumps(result, indent=2))
    print()
    print(f"{'case':<10} {'sae':<22} {'after load MiB':>14} {'peak RSS MiB':>12} {'GPU peak MiB':>12}")
    for c in cases:
        sae = f"{c['sae']['architecture']} {c['sae']['d_sae']}" if "sae" in c else "-"
        gpu = c.get("gpu_peak_mib")
        print(
            f"{c['case']:<10} {sae:<22} {c.get('after_load_rss_mib', float('nan')):>14.0f} "
            f"{c['peak_rss_mib']:>12.0f} {gpu if gpu is not None else '-':>12}"
        )
    return result


if __name__ == "__main__":
    main()
