"""Feature index: per latent, the top-activating contexts, an activation histogram, density and maximum.

``auditor index-features`` runs the model and SAE over a corpus and keeps, for
every latent, the ``contexts`` documents where it fired hardest (one context per
document: a window of token ids around the strongest token, with the latent's
activation on each token), a histogram of its non-zero activations over shared
log-spaced bins, how many tokens it fired on, their sum and its maximum.

Everything merges exactly: top contexts are a stable descending sort of the
kept contexts followed by the new documents (earlier documents win ties), and
counts add. So a run stopped after any batch and resumed gives the same file as
one pass over the same documents.

On disk, beside the library by default::

    feature_index.safetensors   # tensors, fp16 activations, int32 token ids
    feature_index.json          # metadata, progress, and the text of every token id kept

Example::

    auditor = Auditor.load(library="smollm2-135m-instruct")
    index = build_index(auditor, read_corpus(".cache/corpus/corpus.jsonl"), max_docs=3000,
                        out=Path("feature_libraries/smollm2-135m-instruct/feature_index.safetensors"))
    index.latent(12).contexts[0].tokens  # [(" wire", 3.1), (" transfer", 0.0), ...]
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from auditor.errors import FeatureIndexError

if TYPE_CHECKING:
    from auditor.pipeline import Auditor
    from auditor.text import AuditInput

__all__ = [
    "INDEX_FILE",
    "INDEX_FORMAT",
    "SAE_FINGERPRINT",
    "IndexConfig",
    "FeatureIndex",
    "LatentSummary",
    "Context",
    "build_index",
    "read_corpus",
    "index_path_for",
    "json_path_for",
    "load_index",
    "sae_fingerprint",
]

INDEX_FILE = "feature_index.safetensors"
"""Default file name, beside the library's ``library.yaml``."""
INDEX_FORMAT = "auditor-feature-index/1"
"""Format tag written into both files."""

SAE_FINGERPRINT = "sae_sha256"
"""Meta key of the SAE's fingerprint (:func:`sae_fingerprint`); indexes written before it have none."""

_EMPTY = -1  # token id / document index of an empty slot


def sae_fingerprint(sae: Any) -> str:
    """sha256 (hex) of an SAE's weights: each canonical tensor's name, shape and float32 bytes, in name order.

    It identifies the weights, not where they were read from: the same SAE given by a relative or an
    absolute path, or saved in another format, has the same fingerprint, and an SAE retrained in place
    has another. One pass over the weights (a 131k-latent SAE for a 576-wide model is 0.6 GB of float32).

    Example::

        sae_fingerprint(load_sae("my-sae/"))  # '3f0c...'
    """
    import hashlib

    h = hashlib.sha256(b"sae-auditor sae weights v1\0")
    for name, tensor in sorted(sae.tensors().items()):
        t = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        h.update(f"{name}{tuple(t.shape)}\0".encode())
        h.update(t.numpy().data)
    return h.hexdigest()


@dataclass(frozen=True)
class IndexConfig:
    """How an index is built; stored in the file so a resumed run can check it continues the same index."""

    contexts: int = 8
    """Top contexts kept per latent (one per document)."""
    before: int = 12
    """Tokens kept before the strongest token of a context."""
    after: int = 4
    """Tokens kept after it."""
    max_tokens: int = 128
    """Tokens per document (longer documents are cut)."""
    bins: int = 60
    """Histogram bins, log-spaced from ``bin_min`` to ``bin_max`` (values outside go to the end bins)."""
    bin_min: float = 1e-2
    """Lower edge of the first histogram bin."""
    bin_max: float = 1e4
    """Upper edge of the last histogram bin."""

    @property
    def window(self) -> int:
        return self.before + 1 + self.after

    def edges(self) -> torch.Tensor:
        """Histogram bin edges ``[bins + 1]``."""
        return torch.logspace(math.log10(self.bin_min), math.log10(self.bin_max), self.bins + 1, dtype=torch.float64)

    def check(self) -> None:
        """Raise :class:`FeatureIndexError` on values that cannot make an index."""
        problems = []
        if self.contexts < 1:
            problems.append(f"contexts must be at least 1 (got {self.contexts})")
        if self.before < 0 or self.after < 0:
            problems.append(f"context window sizes must be >= 0 (got before={self.before}, after={self.after})")
        if self.max_tokens < 2:
            problems.append(f"max_tokens must be at least 2 (got {self.max_tokens})")
        if self.bins < 1 or not 0 < self.bin_min < self.bin_max:
            problems.append(f"histogram needs bins >= 1 and 0 < bin_min < bin_max (got {self.bins}, {self.bin_min}, {self.bin_max})")
        if problems:
            raise FeatureIndexError("index config", "; ".join(problems))


@dataclass(frozen=True)
class Context:
    """One top context of a latent: its document, strongest activation and the token window."""

    doc: int
    """Index of the document in the corpus (0-based, counting the documents read)."""
    max_activation: float
    tokens: list[tuple[str, float]]
    """``(token text, activation)`` for each token of the window, in order."""
    peak: int
    """Position of the strongest token inside ``tokens``."""


@dataclass(frozen=True)
class LatentSummary:
    """What the index knows about one latent."""

    index: int
    density: float
    """Fraction of indexed tokens on which the latent was active (> 0)."""
    active_tokens: int
    max_activation: float
    mean_activation: float
    """Mean activation over the tokens where it was active (0 when never)."""
    histogram: list[tuple[float, float, int]]
    """``(low edge, high edge, count)`` from the first to the last non-empty bin."""
    contexts: list[Context] = field(default_factory=list)


@dataclass
class FeatureIndex:
    """The index in memory (see the module docstring); tensors on CPU."""

    config: IndexConfig
    meta: dict[str, Any]
    """``sae``, ``sae_sha256``, ``d_sae``, ``hookpoint``, ``model``, ``library``, ``corpus``: what the index was
    built from (``sae`` names the SAE as the user gave it; ``sae_sha256``, :func:`sae_fingerprint`, is what is checked)."""
    top_acts: torch.Tensor  # [d_sae, C] float32, -inf on empty slots
    top_doc: torch.Tensor  # [d_sae, C] int64, -1 on empty slots
    top_tokens: torch.Tensor  # [d_sae, C, W] int64 token ids, -1 outside the document
    top_token_acts: torch.Tensor  # [d_sae, C, W] float32
    hist: torch.Tensor  # [d_sae, bins] int64
    active: torch.Tensor  # [d_sae] int64 tokens with activation > 0
    sum_act: torch.Tensor  # [d_sae] float64
    max_act: torch.Tensor  # [d_sae] float32
    tokens_seen: int = 0
    docs_done: int = 0
    token_text: dict[int, str] = field(default_factory=dict)
    """Text of every token id in ``top_tokens`` (filled when saving with a tokenizer)."""

    @classmethod
    def empty(cls, d_sae: int, config: IndexConfig, meta: dict[str, Any]) -> FeatureIndex:
        config.check()
        c, w = config.contexts, config.window
        return cls(
            config=config,
            meta={**meta, "d_sae": d_sae},
            top_acts=torch.full((d_sae, c), -math.inf),
            top_doc=torch.full((d_sae, c), _EMPTY, dtype=torch.long),
            top_tokens=torch.full((d_sae, c, w), _EMPTY, dtype=torch.long),
            top_token_acts=torch.zeros(d_sae, c, w),
            hist=torch.zeros(d_sae, config.bins, dtype=torch.long),
            active=torch.zeros(d_sae, dtype=torch.long),
            sum_act=torch.zeros(d_sae, dtype=torch.float64),
            max_act=torch.zeros(d_sae),
        )

    @property
    def d_sae(self) -> int:
        return int(self.top_acts.shape[0])

    # ------------------------------------------------------------ updating

    @torch.inference_mode()
    def add(
        self,
        feats: torch.Tensor,
        input_ids: torch.Tensor,
        content_mask: torch.Tensor,
    ) -> None:
        """Merge one batch of documents (the next ``B`` after ``docs_done``).

        ``feats [B, T, d_sae]`` latent activations (zero off content tokens),
        ``input_ids [B, T]``, ``content_mask [B, T]`` (True on content tokens).
        """
        b, t, d = feats.shape
        if d != self.d_sae:
            raise FeatureIndexError("index", f"activations have {d} latents but the index has {self.d_sae}")
        cfg = self.config
        feats = feats.float() * content_mask.unsqueeze(-1)  # [B, T, d_sae]
        flat = feats.reshape(-1, d)  # [B*T, d_sae]
        # Token statistics over content tokens.
        self.tokens_seen += int(content_mask.sum())
        on = flat > 0  # [B*T, d_sae]
        self.active += on.sum(dim=0)
        self.sum_act += flat.sum(dim=0, dtype=torch.float64)
        self.max_act = torch.maximum(self.max_act, flat.amax(dim=0) if flat.numel() else self.max_act)
        rows, lat = on.nonzero(as_tuple=True)
        vals = flat[rows, lat].double()
        edges = cfg.edges()
        bins = (torch.bucketize(vals, edges[1:-1], right=True)).clamp_(0, cfg.bins - 1)  # [nnz]
        self.hist += torch.bincount(lat * cfg.bins + bins, minlength=d * cfg.bins).view(d, cfg.bins)

        # One candidate context per (document, latent): the strongest token.
        doc_max, doc_pos = feats.max(dim=1)  # [B, d_sae]
        cand = torch.where(doc_max > 0, doc_max, torch.full_like(doc_max, -math.inf)).T  # [d_sae, B]
        merged = torch.cat([self.top_acts, cand], dim=1)  # [d_sae, C + B]
        order = torch.sort(merged, dim=1, descending=True, stable=True).indices[:, : cfg.contexts]  # [d_sae, C]
        new_acts = merged.gather(1, order)

        c = cfg.contexts
        from_old = order < c  # [d_sae, C]
        old_slot = order.clamp(max=c - 1)
        row = (order - c).clamp(min=0)  # batch row of new contexts
        lat_idx = torch.arange(d).unsqueeze(1).expand(d, c)  # [d_sae, C]

        new_doc = torch.where(from_old, self.top_doc.gather(1, old_slot), self.docs_done + row)
        # Windows of the new contexts, gathered for every slot and kept where the slot is new.
        peak = doc_pos.T.gather(1, row)  # [d_sae, C] position of the strongest token
        offsets = torch.arange(-cfg.before, cfg.after + 1)  # [W]
        pos = peak.unsqueeze(-1) + offsets  # [d_sae, C, W]
        inside = (pos >= 0) & (pos < t)
        pos_c = pos.clamp(0, max(t - 1, 0))
        row_w = row.unsqueeze(-1).expand_as(pos_c)
        inside &= content_mask[row_w, pos_c]
        win_ids = torch.where(inside, input_ids[row_w, pos_c], torch.full_like(pos_c, _EMPTY))
        lat_w = lat_idx.unsqueeze(-1).expand_as(pos_c)
        win_acts = torch.where(inside, feats[row_w, pos_c, lat_w], torch.zeros(()))
        keep_old = from_old.unsqueeze(-1)
        self.top_tokens = torch.where(
            keep_old, self.top_tokens.gather(1, old_slot.unsqueeze(-1).expand_as(pos_c)), win_ids
        )
        self.top_token_acts = torch.where(
            keep_old, self.top_token_acts.gather(1, old_slot.unsqueeze(-1).expand_as(pos_c)), win_acts
        )
        empty = torch.isinf(new_acts)
        self.top_doc = torch.where(empty, torch.full_like(new_doc, _EMPTY), new_doc)
        self.top_tokens = torch.where(empty.unsqueeze(-1), torch.full_like(self.top_tokens, _EMPTY), self.top_tokens)
        self.top_token_acts = self.top_token_acts.masked_fill(empty.unsqueeze(-1), 0.0)
        self.top_acts = new_acts
        self.docs_done += b

    # ------------------------------------------------------------ reading

    def latent(self, index: int) -> LatentSummary:
        """Statistics, histogram and top contexts of latent ``index``."""
        if not 0 <= index < self.d_sae:
            raise FeatureIndexError("index", f"latent {index} is out of range: the index has {self.d_sae} latents (0..{self.d_sae - 1})")
        active = int(self.active[index])
        counts = self.hist[index].tolist()
        edges = self.config.edges().tolist()
        nz = [i for i, n in enumerate(counts) if n]
        histogram = [(edges[i], edges[i + 1], counts[i]) for i in range(nz[0], nz[-1] + 1)] if nz else []
        contexts = []
        for slot in range(self.config.contexts):
            doc = int(self.top_doc[index, slot])
            if doc == _EMPTY:
                break
            ids = self.top_tokens[index, slot].tolist()
            acts = self.top_token_acts[index, slot].tolist()
            kept = [(self.token_text.get(i, f"<{i}>"), round(a, 4)) for i, a in zip(ids, acts) if i != _EMPTY]
            before = sum(1 for i in ids[: self.config.before] if i != _EMPTY)
            contexts.append(Context(doc=doc, max_activation=float(self.top_acts[index, slot]), tokens=kept, peak=before))
        return LatentSummary(
            index=index,
            density=active / self.tokens_seen if self.tokens_seen else 0.0,
            active_tokens=active,
            max_activation=float(self.max_act[index]),
            mean_activation=float(self.sum_act[index]) / active if active else 0.0,
            histogram=histogram,
            contexts=contexts,
        )

    def densities(self) -> torch.Tensor:
        """``[d_sae]`` fraction of indexed tokens each latent was active on."""
        return self.active.double() / max(self.tokens_seen, 1)

    # ------------------------------------------------------------ files

    def fill_token_text(self, tokenizer: Any) -> None:
        """Keep the text of exactly the token ids the contexts hold (new ids decoded one at a time)."""
        ids = [i for i in torch.unique(self.top_tokens).tolist() if i != _EMPTY]
        known = self.token_text
        self.token_text = {i: known[i] if i in known else tokenizer.decode([i]) for i in ids}

    def save(self, path: Path) -> None:
        """Write ``path`` (tensors) and its JSON sidecar atomically (temp files, then rename)."""
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "top_acts": self.top_acts.half(),
            "top_doc": self.top_doc.int(),
            "top_tokens": self.top_tokens.int(),
            "top_token_acts": self.top_token_acts.half(),
            "hist": self.hist.int(),
            "active": self.active,
            "sum_act": self.sum_act,
            "max_act": self.max_act,
        }
        header = {"format": INDEX_FORMAT, "docs_done": str(self.docs_done), "tokens_seen": str(self.tokens_seen)}
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
        os.chmod(tmp, 0o644)  # an index is shipped and served: readable like the library beside it
        side = {
            "format": INDEX_FORMAT,
            "config": self.config.__dict__,
            "meta": self.meta,
            "docs_done": self.docs_done,
            "tokens_seen": self.tokens_seen,
            "token_text": {str(k): v for k, v in sorted(self.token_text.items())},
        }
        jpath = json_path_for(path)
        jtmp = jpath.with_name(jpath.name + ".tmp")
        jtmp.write_text(json.dumps(side, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
        # Tensors first: a crash between the renames leaves a sidecar whose docs_done
        # disagrees with the tensors, which load() detects.
        os.replace(tmp, path)
        os.replace(jtmp, jpath)


def json_path_for(path: Path) -> Path:
    """The JSON sidecar of an index file (``feature_index.json`` beside ``feature_index.safetensors``)."""
    return path.with_suffix(".json")


def index_path_for(library: Any) -> Path:
    """Default index file of a loaded library: ``feature_index.safetensors`` beside its ``library.yaml``."""
    if library.path is None:
        raise FeatureIndexError(str(library.id), "the library was built in memory; pass --out for the index file")
    return Path(library.path).parent / INDEX_FILE


def load_index(path: str | os.PathLike[str]) -> FeatureIndex:
    """Read an index written by :meth:`FeatureIndex.save` (activations come back as float32)."""
    from safetensors import safe_open

    p = Path(path)
    jpath = json_path_for(p)
    if not p.is_file() or not jpath.is_file():
        raise FeatureIndexError(str(p), f"no feature index here (expected {p.name} and {jpath.name}; build one with `auditor index-features`)")
    try:
        side = json.loads(jpath.read_text(encoding="utf-8"))
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise FeatureIndexError(str(p), f"not a readable feature index ({exc})") from None
    if side.get("format") != INDEX_FORMAT or header.get("format") != INDEX_FORMAT:
        raise FeatureIndexError(str(p), f"unknown index format (expected {INDEX_FORMAT!r}); rebuild it with `auditor index-features`")
    if str(side.get("docs_done")) != header.get("docs_done"):
        raise FeatureIndexError(str(p), "the tensors and the JSON sidecar disagree on progress (an interrupted save); rebuild or resume from scratch")
    try:
        config = IndexConfig(**side["config"])
        top_acts = t["top_acts"].float()
        index = FeatureIndex(
            config=config,
            meta=dict(side["meta"]),
            top_acts=top_acts.masked_fill(t["top_doc"] == _EMPTY, -math.inf),
            top_doc=t["top_doc"].long(),
            top_tokens=t["top_tokens"].long(),
            top_token_acts=t["top_token_acts"].float(),
            hist=t["hist"].long(),
            active=t["active"].long(),
            sum_act=t["sum_act"].double(),
            max_act=t["max_act"].float(),
            tokens_seen=int(side["tokens_seen"]),
            docs_done=int(side["docs_done"]),
            token_text={int(k): v for k, v in side.get("token_text", {}).items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FeatureIndexError(str(p), f"the index is incomplete ({type(exc).__name__}: {exc}); rebuild it") from None
    d, c = index.top_acts.shape
    if c != config.contexts or index.top_tokens.shape != (d, c, config.window) or index.hist.shape != (d, config.bins):
        raise FeatureIndexError(str(p), "tensor shapes do not match the stored config; rebuild the index")
    return index


# ---------------------------------------------------------------- building


_CORPUS_KEYS = ("text", "messages", "prompt", "completion")


def read_corpus(path: str | os.PathLike[str]) -> Iterator[AuditInput]:
    """Documents of a JSONL corpus: ``{"text"}``, ``{"messages"}`` or ``{"prompt"[, "completion"]}`` per line.

    Other keys (``source``, ``id``) are ignored; blank lines are skipped.
    """
    from auditor.errors import AuditorError
    from auditor.text import parse_input

    p = Path(path)
    if not p.is_file():
        raise FeatureIndexError(str(p), "corpus file not found (expected JSONL, one document per line; scripts/build_corpus.py writes one)")
    with p.open(encoding="utf-8") as handle:
        for n, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FeatureIndexError(f"{p}:{n}", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            ignored: list[str] = []
            if isinstance(obj, dict):
                ignored = [k for k in obj if k not in _CORPUS_KEYS]
                obj = {k: v for k, v in obj.items() if k in _CORPUS_KEYS}
            where = f"{p}:{n}"
            try:
                yield parse_input(obj, where=where)
            except AuditorError as exc:
                # parse_input's message starts with `where` already; FeatureIndexError adds it again.
                reason = exc.message.removeprefix(f"{where}: ")
                if ignored:
                    reason += f"; other keys are ignored, and this line has {', '.join(map(repr, ignored))}"
                raise FeatureIndexError(where, reason) from None


def _batches(items: Iterable[AuditInput], size: int) -> Iterator[list[AuditInput]]:
    chunk: list[AuditInput] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_index(
    auditor: Auditor,
    docs: Iterable[AuditInput],
    *,
    out: Path | None = None,
    max_docs: int | None = None,
    config: IndexConfig | None = None,
    batch_docs: int = 16,
    checkpoint_every: int = 20,
    resume: bool = True,
    meta: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> FeatureIndex:
    """Index ``docs`` with the auditor's model and SAE; save to ``out`` every ``checkpoint_every`` batches.

    With ``resume`` and an existing ``out``, the stored index is loaded, its
    first ``docs_done`` documents are skipped and indexing continues up to
    ``max_docs`` documents in all. A run resumed from a checkpoint sees the
    same batches as one pass (checkpoints fall on batch boundaries), so it
    writes the same index. The stored index must come from the same SAE
    weights (:func:`sae_fingerprint`; an index written before fingerprints is
    checked by the ``sae`` name in ``meta`` instead). ``progress(n)`` is called
    with the documents done.
    """
    from auditor.text import tokenize_batch

    config = config or IndexConfig()
    config.check()
    if batch_docs < 1:
        raise FeatureIndexError("index config", f"batch_docs must be at least 1 (got {batch_docs})")
    sae = auditor.sae
    info = {
        "hookpoint": auditor.hookpoint,
        "model": auditor.model.name,
        **(meta or {}),
        SAE_FINGERPRINT: sae_fingerprint(sae),
    }
    index: FeatureIndex | None = None
    if resume and out is not None and out.is_file():
        index = load_index(out)
        _check_resumable(index, out, config, sae.cfg.d_sae, info)
    if index is None:
        index = FeatureIndex.empty(sae.cfg.d_sae, config, info)
    limit = max_docs if max_docs is not None else math.inf
    remaining = (d for i, d in enumerate(docs) if i >= index.docs_done and i < limit)
    tokenizer = auditor.model.tokenizer
    since_save = 0
    for chunk in _batches(remaining, batch_docs):
        batch = tokenize_batch(tokenizer, chunk, max_tokens=config.max_tokens)
        acts = auditor.activations(batch)  # [B, T, d_in]
        mask = batch.content_mask.to(acts.device)  # [B, T]
        feats = acts.new_zeros((*mask.shape, sae.cfg.d_sae))  # [B, T, d_sae]
        with torch.inference_mode():
            feats[mask] = sae.encode(acts[mask]).to(feats.dtype)
        index.add(feats.cpu(), batch.input_ids, batch.content_mask)
        since_save += 1
        if progress is not None:
            progress(index.docs_done)
        if out is not None and since_save >= checkpoint_every:
            index.fill_token_text(tokenizer)
            index.save(out)
            since_save = 0
    if index.docs_done == 0:
        # An index of nothing would load and show every latent as never firing.
        raise FeatureIndexError(
            str(out) if out is not None else "index",
            "no documents to index: the corpus is empty (a JSONL corpus has one JSON object per line, such as "
            '{"text": "..."}; scripts/build_corpus.py writes one)',
        )
    index.fill_token_text(tokenizer)
    if out is not None:
        index.save(out)
    return index


def _check_resumable(index: FeatureIndex, out: Path, config: IndexConfig, d_sae: int, meta: dict[str, Any]) -> None:
    problems = []
    if index.config != config:
        problems.append(f"it was built with {index.config} but this run asks for {config}")
    if index.d_sae != d_sae:
        problems.append(f"it has {index.d_sae} latents but the SAE has {d_sae}")
    stored = index.meta.get(SAE_FINGERPRINT)
    if stored is not None and stored != meta.get(SAE_FINGERPRINT):
        problems.append(
            f"it was built from other SAE weights (sha256 {stored[:12]}, this SAE's is {str(meta.get(SAE_FINGERPRINT))[:12]}): "
            "the SAE was retrained or replaced since"
        )
    # The weights are checked, not the path (the same SAE may be given relative or absolute);
    # an index written before fingerprints knows its SAE only by the name it was given.
    keys = ("hookpoint", "corpus") if stored is not None else ("sae", "hookpoint", "corpus")
    for key in keys:
        if key in meta and key in index.meta and index.meta[key] != meta[key]:
            problems.append(f"its {key} is {index.meta[key]!r}, this run's is {meta[key]!r}")
    if problems:
        raise FeatureIndexError(str(out), "cannot resume this index: " + "; ".join(problems) + " (pass --restart to rebuild it)")
