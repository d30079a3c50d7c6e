"""Labelled safety data: loading, the deterministic train / held-out split, pooled SAE features.

A labelled data set is a folder of JSONL files, one row per text::

    {"id": "bias-0001", "category": "bias", "kind": "prompt", "text": "...", "near_miss": false, "topic": "..."}

Rows whose category is ``benign`` are the negatives every other category is
measured against. The split is a pure function of the rows: within each
``(category, kind)`` group rows are ordered by a salted SHA-256 of their id and
the first ``round(fraction * n)`` are held out, so every group is held out in
the same proportion and a row keeps its side as long as its group does not change.

:func:`extract_pooled` runs the model once over every text, capturing several
hookpoints in the same forward, and keeps per text and per SAE latent the max
and the mean over content tokens (what policy ``max`` / ``mean`` aggregations
and probes see), the position of the max, the mean raw hookpoint activation and
the per-token reconstruction error. :func:`cached_pooled` stores the result
under ``.cache/`` keyed by the data, the model and the SAE weights.

Example::

    rows = load_labelled("datasets/safety-v1")
    split = assign_split(rows)
    pooled = cached_pooled(rows, [("sae-l15", "feature_libraries/smollm2-135m-instruct/sae-l15")])
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from auditor.errors import DatasetError

if TYPE_CHECKING:
    from auditor.models import LoadedModel
    from auditor.sae import SAE

__all__ = [
    "BENIGN",
    "HELDOUT",
    "TRAIN",
    "LabelledRow",
    "Pooled",
    "load_labelled",
    "assign_split",
    "split_counts",
    "check_split",
    "data_fingerprint",
    "extract_pooled",
    "cached_pooled",
    "default_cache_dir",
]

BENIGN = "benign"
"""Category of the negatives."""
TRAIN = "train"
HELDOUT = "heldout"
Side = Literal["train", "heldout"]

_REQUIRED = ("id", "category", "text")
_KINDS = ("prompt", "completion")


@dataclass(frozen=True)
class LabelledRow:
    """One labelled text."""

    id: str
    category: str
    kind: str
    """``prompt`` or ``completion`` (what the text would be in a conversation)."""
    text: str
    near_miss: bool = False
    """A benign text written to look like the category (a hard negative) or a subtle positive."""
    topic: str = ""
    source: str = ""
    """File and line the row came from."""


def load_labelled(folder: str | Path, *, files: Sequence[str] | None = None) -> list[LabelledRow]:
    """Read every ``*.jsonl`` in ``folder`` (or the named ``files`` in it), in file-name order.

    Raises :class:`DatasetError` on a missing folder, a malformed line, a missing
    field, a duplicate id, or a data set without benign rows.
    """
    root = Path(folder)
    if root.is_file():
        raise DatasetError(
            str(root),
            f"this is a file; give the data set's folder, which holds its labelled *.jsonl files (here {root.parent})",
        )
    if not root.is_dir():
        raise DatasetError(str(root), "no such folder (expected a folder of labelled *.jsonl files)")
    paths = [root / f for f in files] if files else sorted(root.glob("*.jsonl"))
    if not paths:
        raise DatasetError(str(root), "no *.jsonl files")
    rows: list[LabelledRow] = []
    seen: dict[str, str] = {}
    for path in paths:
        if not path.is_file():
            raise DatasetError(str(path), "no such file")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(where, f"not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DatasetError(where, "each line must be a JSON object")
            missing = [k for k in _REQUIRED if not isinstance(obj.get(k), str) or not obj.get(k)]
            if missing:
                raise DatasetError(where, f"missing or empty string field(s): {', '.join(missing)}")
            kind = obj.get("kind", "prompt")
            if kind not in _KINDS:
                raise DatasetError(where, f"kind must be one of {', '.join(_KINDS)} (got {kind!r})")
            rid = obj["id"]
            if rid in seen:
                raise DatasetError(where, f"duplicate id {rid!r} (first at {seen[rid]})")
            seen[rid] = where
            rows.append(
                LabelledRow(
                    id=rid,
                    category=obj["category"],
                    kind=kind,
                    text=obj["text"],
                    near_miss=bool(obj.get("near_miss", False)),
                    topic=str(obj.get("topic") or ""),
                    source=where,
                )
            )
    if not any(r.category == BENIGN for r in rows):
        raise DatasetError(str(root), f"no rows with category {BENIGN!r}; benign text is needed as negatives")
    return rows


def _hash(salt: str, text: str) -> str:
    return hashlib.sha256(f"{salt}\x00{text}".encode()).hexdigest()


def assign_split(rows: Sequence[LabelledRow], *, heldout: float = 0.3, salt: str = "safety-v1") -> dict[str, Side]:
    """Row id -> ``train`` | ``heldout``, stratified by ``(category, kind)`` (see the module docstring)."""
    if not 0.0 < heldout < 1.0:
        raise DatasetError("<split>", f"the held-out fraction must be in (0, 1), got {heldout}")
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        groups.setdefault((r.category, r.kind), []).append(r.id)
    out: dict[str, Side] = {}
    for ids in groups.values():
        ids = sorted(ids, key=lambda i: _hash(salt, i))
        n_held = int(math.floor(heldout * len(ids) + 0.5))
        for j, rid in enumerate(ids):
            out[rid] = HELDOUT if j < n_held else TRAIN
    return out


def split_counts(rows: Sequence[LabelledRow], split: dict[str, Side]) -> dict[str, dict[str, int]]:
    """``{category: {"train": n, "heldout": n, "prompt": n, "completion": n, "near_miss": n}}``."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        c = out.setdefault(r.category, {TRAIN: 0, HELDOUT: 0, "prompt": 0, "completion": 0, "near_miss": 0})
        c[split[r.id]] += 1
        c[r.kind] += 1
        c["near_miss"] += int(r.near_miss)
    return dict(sorted(out.items()))


def check_split(
    rows: Sequence[LabelledRow],
    split: dict[str, Side],
    heldout: float,
    *,
    need: Sequence[Side] = (TRAIN, HELDOUT),
    categories: Sequence[str] | None = None,
) -> list[str]:
    """Refuse a split that leaves a category with no row on a side in ``need``; warn of smaller gaps.

    Raises :class:`DatasetError` naming the categories (``categories`` and benign;
    default all) and the held-out fraction that would fix it; returns warnings for
    ``(category, kind)`` groups that get no held-out row while their category has some.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if categories is None or r.category in categories or r.category == BENIGN:
            groups.setdefault((r.category, r.kind), []).append(r.id)
    largest: dict[str, int] = {}
    total: dict[str, int] = {}
    sides: dict[str, set[str]] = {}
    for (cat, _), ids in groups.items():
        largest[cat] = max(largest.get(cat, 0), len(ids))
        total[cat] = total.get(cat, 0) + len(ids)
        sides.setdefault(cat, set()).update(split[i] for i in ids)
    if len(need) == 2:
        single = sorted(c for c, n in total.items() if n < 2)
        if single:
            raise DatasetError(
                "<split>",
                f"categories {', '.join(single)} have a single row; each needs at least 2, one to train on and one to hold out",
            )
    if HELDOUT in need:
        empty = sorted(c for c, s in sides.items() if HELDOUT not in s)
        if empty:
            # A group of n rows holds out floor(f * n + 0.5) >= 1 rows once f >= 0.5 / n.
            low = max(0.5 / largest[c] for c in empty)
            raise DatasetError(
                "<split>",
                f"a held-out fraction of {heldout:g} holds out no row of {', '.join(empty)}; "
                f"use --heldout {math.ceil(low * 1000) / 1000:g} or more",
            )
    if TRAIN in need:
        empty = sorted(c for c, s in sides.items() if TRAIN not in s)
        if empty:
            # ... and keeps a training row while floor(f * n + 0.5) <= n - 1, i.e. f < 1 - 0.5 / n.
            high = min(1 - 0.5 / largest[c] for c in empty)
            raise DatasetError(
                "<split>",
                f"a held-out fraction of {heldout:g} leaves no training row of {', '.join(empty)}; "
                f"use --heldout below {math.floor(high * 1000) / 1000:g}",
            )
    warnings = []
    if HELDOUT in need:
        for (cat, kind), ids in sorted(groups.items()):
            if all(split[i] == TRAIN for i in ids):
                warnings.append(f"no held-out {kind} of {cat} ({len(ids)} rows; --heldout {heldout:g} rounds to 0 of them)")
    return warnings


def data_fingerprint(rows: Sequence[LabelledRow]) -> str:
    """A short hash of the ids and texts (cache key: any edit to the data invalidates cached features)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(r.id.encode())
        h.update(b"\x00")
        h.update(r.text.encode())
        h.update(b"\x01")
    return h.hexdigest()[:16]


@dataclass
class Pooled:
    """Per-text pooled activations of one SAE over one data set (rows in data order)."""

    ids: list[str]
    hookpoint: str
    max: torch.Tensor
    """``[N, d_sae]`` max over content tokens (0 for a text without content tokens)."""
    mean: torch.Tensor
    """``[N, d_sae]`` mean over content tokens."""
    argmax: torch.Tensor
    """``[N, d_sae]`` int16: token position (in ``tokens[i]``) of the max; -1 when never active."""
    resid_mean: torch.Tensor
    """``[N, d_in]`` mean raw hookpoint activation over content tokens."""
    recon: torch.Tensor
    """``[total content tokens]`` relative reconstruction error, rows concatenated."""
    recon_offsets: torch.Tensor
    """``[N + 1]`` int64: row i's errors are ``recon[offsets[i]:offsets[i + 1]]``."""
    tokens: list[list[str]]
    """Token strings of each text (sink token included, as positions count them)."""

    def row_index(self) -> dict[str, int]:
        """Row id -> row number."""
        return {rid: i for i, rid in enumerate(self.ids)}

    def recon_of(self, rows: Sequence[int]) -> torch.Tensor:
        """Concatenated per-token reconstruction errors of ``rows``."""
        off = self.recon_offsets.tolist()
        parts = [self.recon[off[i] : off[i + 1]] for i in rows]
        return torch.cat(parts) if parts else self.recon.new_zeros(0)

    def to_state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("ids", "hookpoint", "max", "mean", "argmax", "resid_mean", "recon", "recon_offsets", "tokens")}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Pooled:
        return cls(**state)


def _buckets(lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Rows grouped by length so each group's padded size stays within ``budget`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    group: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        if group and w * (len(group) + 1) > budget:
            yield group
            group, w = [], lengths[i]
        group.append(i)
        width = w
    if group:
        yield group


@torch.inference_mode()
def extract_pooled(
    model: LoadedModel,
    saes: dict[str, SAE],
    texts: Sequence[str],
    ids: Sequence[str],
    *,
    batch_tokens: int = 2048,
    max_tokens: int = 2048,
    progress: bool = False,
) -> dict[str, Pooled]:
    """Pooled features of each SAE (keyed by a name of the caller's choosing) over ``texts``.

    All SAEs' hookpoints are captured in one forward that stops after the deepest
    one. Tokenization, content masks and the SAE encode are the audit pipeline's
    own (plain text, a sink token first), so pooled values equal what a policy
    sees when the same text is audited.
    """
    from auditor.models import capture
    from auditor.text import AuditInput, tokenize_batch

    if len(texts) != len(ids):
        raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
    hook_of = {name: str(sae.cfg.metadata.hook_name) for name, sae in saes.items()}
    missing = [n for n, h in hook_of.items() if not h or h == "None"]
    if missing:
        raise DatasetError(", ".join(missing), "the SAE does not name its hookpoint")
    batch = tokenize_batch(model.tokenizer, [AuditInput(text=t) for t in texts], max_tokens=max_tokens)
    n = len(texts)
    d_in = model.d_model
    out_max = {k: torch.zeros(n, s.cfg.d_sae) for k, s in saes.items()}
    out_mean = {k: torch.zeros(n, s.cfg.d_sae) for k, s in saes.items()}
    out_arg = {k: torch.full((n, s.cfg.d_sae), -1, dtype=torch.int16) for k, s in saes.items()}
    out_resid = {k: torch.zeros(n, d_in) for k in saes}
    recon_rows: dict[str, list[torch.Tensor | None]] = {k: [None] * n for k in saes}
    lengths = batch.lengths.tolist()
    groups = list(_buckets(lengths, batch_tokens))
    iterator: Any = groups
    if progress:
        from tqdm import tqdm

        iterator = tqdm(groups, desc="features", unit="batch")
    device = torch.device(model.device)
    for rows in iterator:
        idx = torch.tensor(rows, dtype=torch.long)
        width = int(batch.lengths[idx].max())
        input_ids = batch.input_ids[idx, :width]
        attn = batch.attention_mask[idx, :width]
        mask = batch.content_mask[idx, :width]  # [B, T]
        acts = capture(model.model, input_ids.to(device), attn.to(device), list(dict.fromkeys(hook_of.values())))
        counts = mask.sum(1)  # [B]
        rows_idx, pos_idx = mask.nonzero(as_tuple=True)  # [M], [M]
        for name, sae in saes.items():
            a = acts[hook_of[name]].float().cpu()  # [B, T, d_in]
            x = a[mask]  # [M, d_in]
            f, state = sae.encode_with_norm(x)  # [M, d_sae]
            # SAE.reconstruction_error's formula, reusing this encode instead of running a second one.
            err = (x - sae.decode(f, state)).norm(dim=-1)  # [M]
            norm = x.norm(dim=-1)
            err = torch.where(norm > 0, err / norm.clamp_min(torch.finfo(x.dtype).tiny), err)
            b = len(rows)
            dense = torch.zeros(b, width, sae.cfg.d_sae)  # [B, T, d_sae]
            dense[rows_idx, pos_idx] = f
            mx, arg = dense.max(dim=1)  # [B, d_sae]
            denom = counts.clamp(min=1).unsqueeze(1).float()  # [B, 1]
            out_max[name][idx] = mx
            out_mean[name][idx] = dense.sum(1) / denom
            out_arg[name][idx] = torch.where(mx > 0, arg, torch.full_like(arg, -1)).to(torch.int16)
            out_resid[name][idx] = (a * mask.unsqueeze(-1)).sum(1) / denom
            per_row = torch.split(err, counts.tolist())
            for j, r in enumerate(rows):
                recon_rows[name][r] = per_row[j]
    result: dict[str, Pooled] = {}
    for name in saes:
        parts = [t if t is not None else torch.zeros(0) for t in recon_rows[name]]
        offsets = torch.zeros(n + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(torch.tensor([p.numel() for p in parts], dtype=torch.long), 0)
        result[name] = Pooled(
            ids=list(ids),
            hookpoint=hook_of[name],
            max=out_max[name],
            mean=out_mean[name],
            argmax=out_arg[name],
            resid_mean=out_resid[name],
            recon=torch.cat(parts) if parts else torch.zeros(0),
            recon_offsets=offsets,
            tokens=[list(t) for t in batch.tokens],
        )
    return result


def default_cache_dir() -> Path:
    """``<repo>/.cache/labelled-features`` (git-ignored)."""
    return Path(__file__).resolve().parents[2] / ".cache" / "labelled-features"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if p.suffix in (".md", ".json") and p.name != "cfg.json":
            continue  # reports beside the weights do not change the features
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cached_pooled(
    rows: Sequence[LabelledRow],
    saes: Sequence[tuple[str, str | Path]],
    *,
    model: LoadedModel | None = None,
    model_name: str | None = None,
    cache_dir: str | Path | None = None,
    batch_tokens: int = 2048,
    progress: bool = False,
    dtype: str | None = None,
) -> dict[str, Pooled]:
    """:func:`extract_pooled` over ``rows`` for ``saes`` (``(name, path)`` pairs), through a disk cache.

    Only the SAEs missing from the cache are computed (in one shared forward);
    the model is loaded (``model_name`` or the default, in ``dtype`` when given) only when
    something is missing. Features of another model dtype are another cache entry.
    """
    from auditor.sae import load_sae

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fp = data_fingerprint(rows)
    # The key names the model as the caller did; ``model``, when given, must be that model.
    label = (model_name or "default") + (f"@{dtype}" if dtype else "")
    keys = {name: hashlib.sha256(f"{fp}|{label}|{_file_digest(Path(p))}".encode()).hexdigest()[:20] for name, p in saes}
    out: dict[str, Pooled] = {}
    todo: dict[str, Any] = {}
    for name, path in saes:
        file = root / f"{keys[name]}.pt"
        if file.is_file():
            out[name] = Pooled.from_state(torch.load(file, weights_only=False))
        else:
            todo[name] = load_sae(str(path), dtype=torch.float32)
    if todo:
        if model is None:
            from auditor.models import load_model

            model = load_model(model_name, dtype=dtype)
        fresh = extract_pooled(
            model, todo, [r.text for r in rows], [r.id for r in rows], batch_tokens=batch_tokens, progress=progress
        )
        root.mkdir(parents=True, exist_ok=True)
        for name, pooled in fresh.items():
            tmp = root / f"{keys[name]}.pt.tmp"
            torch.save(pooled.to_state(), tmp)
            tmp.replace(root / f"{keys[name]}.pt")
            out[name] = pooled
    return {name: out[name] for name, _ in saes}
