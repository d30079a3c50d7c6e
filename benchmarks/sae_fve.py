"""Fraction of variance explained by an SAE on activations produced by the audit pipeline.

Tokens go through the same tokenization, masking and truncated forward as
`auditor audit`; tokens above 3x the median norm (massive activations) are left
out, as in training.

    python benchmarks/sae_fve.py --corpus .cache/corpus/corpus.jsonl --docs 300 [--sae PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="JSONL with a 'text' field per line")
    ap.add_argument("--docs", type=int, default=300, help="documents, taken every --stride lines")
    ap.add_argument("--stride", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--sae", default=None, help="SAE (default: the default library's)")
    args = ap.parse_args()

    from auditor.pipeline import Auditor
    from auditor.text import AuditInput, tokenize_batch

    auditor = Auditor.load(sae=args.sae, max_tokens=args.max_tokens)
    with open(args.corpus, encoding="utf-8") as fh:
        lines = itertools.islice(fh, 0, args.docs * args.stride, args.stride)
        items = [AuditInput(text=json.loads(line)["text"]) for line in lines]
    xs = []
    for start in range(0, len(items), 16):
        batch = tokenize_batch(auditor.model.tokenizer, items[start : start + 16], max_tokens=args.max_tokens)
        acts = auditor.activations(batch)  # [B, T, d_in]
        xs.append(acts[batch.content_mask])
    x = torch.cat(xs)  # [N, d_in]
    norms = x.norm(dim=1)
    x = x[norms < 3 * norms.median()]
    with torch.inference_mode():
        x_hat = auditor.sae(x)
    fve = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    print(json.dumps({"sae": args.sae or "default", "hookpoint": auditor.hookpoint, "tokens": int(x.shape[0]),
                      "dropped_outliers": int((norms >= 3 * norms.median()).sum()), "fve": round(float(fve), 4)}))


if __name__ == "__main__":
    main()
