"""Training activations: corpus -> packed contexts -> truncated forward -> clean activation rows.

A *clean* activation is one of a real text token: position 0, special tokens (BOS, EOS
separators, padding) are masked, and tokens whose residual norm exceeds
``outlier_factor`` times the running median norm are dropped (SmolLM2 carries a few
"massive activation" tokens, ~150x the median, that would otherwise own the variance).

Rows can be saved to a ``.safetensors`` shard (``train`` and ``eval`` tensors plus
metadata) and loaded again, so collection and training can run on different machines;
a plain ``.npy`` array ``[N, d_in]`` also loads.

Example::

    documents = read_corpus("corpus.jsonl")
    source = ActivationSource(model, tokenizer, "blocks.3.hook_resid_post", documents)
    for chunk in source.chunks():          # [n, d_in] float32
        ...
"""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from auditor.errors import ConfigError
from auditor.models.adapters import ArchitectureAdapter
from auditor.models.capture import capture
from auditor.text import sink_token_id

__all__ = [
    "ActivationShard",
    "ActivationSource",
    "ActivationStats",
    "NormFilter",
    "context_batches",
    "load_activations",
    "pack_contexts",
    "read_corpus",
    "save_activations",
    "shuffled_batches",
    "special_token_ids",
    "tensor_batches",
    "token_mask",
]


def read_corpus(path: str | Path) -> list[str]:
    """The ``text`` field of every line of a JSONL corpus (as written by ``scripts/build_corpus.py``).

    Raises :class:`ConfigError` naming the file and line for a missing file, invalid JSON
    or a line without a string ``text``.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"corpus {file} does not exist; build one with scripts/build_corpus.py")
    texts: list[str] = []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{file}:{number}: not valid JSON ({exc.msg}); expected {{\"text\": ...}}") from exc
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ConfigError(f"{file}:{number}: each line needs a string field \"text\"")
            if text.strip():
                texts.append(text)
    if not texts:
        raise ConfigError(f"corpus {file} holds no documents")
    return texts


def _special_ids(tokenizer: Any) -> tuple[int | None, int | None, int, list[int]]:
    """(bos, separator, pad, all special ids) of ``tokenizer``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    # The audit pipeline puts the same token in front of plain text.
    sink = sink_token_id(tokenizer)
    start = sink if sink is not None else eos
    sep = eos if eos is not None else bos
    pad_id = pad if pad is not None else (sep if sep is not None else 0)
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    special.update(int(i) for i in (bos, eos, pad) if i is not None)
    return start, sep, pad_id, sorted(special)


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, padding, ...): never trained on, never spliced."""
    return _special_ids(tokenizer)[3]


def pack_contexts(
    token_lists: Iterable[Sequence[int]], context_size: int, start_id: int | None, sep_id: int | None
) -> Iterator[list[int]]:
    """Concatenate documents (each followed by ``sep_id``) and cut the stream into contexts.

    Every context starts with ``start_id`` (when given) and has ``context_size`` tokens,
    except the last, which holds what is left (at least one text token).
    """
    body = context_size - (1 if start_id is not None else 0)
    prefix = [start_id] if start_id is not None else []
    pending: list[int] = []
    for tokens in token_lists:
        pending.extend(tokens)
        if sep_id is not None:
            pending.append(sep_id)
        while len(pending) >= body:
            yield prefix + pending[:body]
            del pending[:body]
    if any(t != sep_id for t in pending):
        yield prefix + pending


def _tokenize(tokenizer: Any, texts: Iterable[str], chunk: int = 256) -> Iterator[list[int]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == chunk:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def context_batches(
    tokenizer: Any, texts: Iterable[str], context_size: int, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(input_ids, attention_mask)`` batches ``[B, context_size]`` of packed contexts, right-padded."""
    start, sep, pad, _ = _special_ids(tokenizer)
    rows: list[list[int]] = []

    def emit() -> tuple[Tensor, Tensor]:
        ids = torch.full((len(rows), context_size), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), context_size), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    for context in pack_contexts(_tokenize(tokenizer, texts), context_size, start, sep):
        rows.append(context)
        if len(rows) == batch_size:
            yield emit()
            rows = []
    if rows:
        yield emit()


def token_mask(input_ids: Tensor, attention_mask: Tensor, special_ids: Sequence[int]) -> Tensor:
    """``[B, T]`` bool: real text tokens (not padding, not position 0, not a special token)."""
    keep = attention_mask.to(torch.bool).clone()
    keep[:, 0] = False
    if special_ids:
        special = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
        keep &= ~torch.isin(input_ids, special)
    return keep


class NormFilter:
    """Drops rows whose norm exceeds ``factor`` x the median norm of the last ``window`` rows seen.

    The median includes the batch being filtered, so the first batch is judged against itself.
    """

    def __init__(self, factor: float | None, window: int = 65_536) -> None:
        self.factor = factor
        self.window = window
        self._norms: deque[Tensor] = deque()
        self._count = 0
        self.dropped = 0
        self.seen = 0

    @property
    def median(self) -> float | None:
        """Running median norm, or None before any row was seen."""
        if not self._norms:
            return None
        return float(torch.cat(list(self._norms)).median())

    @property
    def threshold(self) -> float | None:
        """Norm above which a row is dropped now (None: nothing is dropped)."""
        median = self.median
        if self.factor is None or median is None:
            return None
        return self.factor * median

    def _push(self, norms: Tensor) -> None:
        self._norms.append(norms.detach().float().cpu())
        self._count += norms.numel()
        while self._norms and self._count - self._norms[0].numel() >= self.window:
            self._count -= self._norms.popleft().numel()

    def __call__(self, acts: Tensor) -> Tensor:
        """The rows of ``acts [N, d]`` whose norm is within the limit."""
        norms = acts.float().norm(dim=-1)  # [N]
        self.seen += norms.numel()
        if norms.numel() == 0:
            return acts
        self._push(norms)
        threshold = self.threshold
        if threshold is None:
            return acts
        keep = norms <= threshold
        self.dropped += int((~keep).sum())
        return acts[keep]


@dataclass
class ActivationStats:
    """Counts kept by an :class:`ActivationSource`."""

    contexts: int = 0
    """Contexts run through the model."""
    positions: int = 0
    """Real (unpadded) token positions in those contexts."""
    masked: int = 0
    """Positions masked as position 0 or special tokens."""
    epochs: int = 0
    """Complete passes over the documents."""


class ActivationSource:
    """Streams clean activations ``[n, d_in]`` at one hookpoint from a list of documents."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        hookpoint: str,
        documents: Sequence[str],
        *,
        context_size: int = 128,
        model_batch_size: int = 16,
        norm_filter: NormFilter | None = None,
        repeat: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        adapter: ArchitectureAdapter | None = None,
    ) -> None:
        if not documents:
            raise ConfigError("no documents to collect activations from")
        self.model = model
        self.tokenizer = tokenizer
        self.hookpoint = hookpoint
        self.documents = documents
        self.context_size = context_size
        self.model_batch_size = model_batch_size
        self.norm_filter = norm_filter if norm_filter is not None else NormFilter(None)
        self.repeat = repeat
        self.seed = seed
        self.device = torch.device(device)
        self.adapter = adapter
        self.stats = ActivationStats()
        self._special = _special_ids(tokenizer)[3]

    def _order(self, epoch: int) -> Sequence[str]:
        # The first pass keeps the corpus order; rereads shuffle so the model sees new contexts.
        if epoch == 0:
            return self.documents
        order = list(range(len(self.documents)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return [self.documents[i] for i in order]

    def chunks(self) -> Iterator[Tensor]:
        """Clean activation chunks (one per model batch), float32 on ``device``; endless with ``repeat``."""
        epoch = 0
        while True:
            produced = False
            batches = context_batches(self.tokenizer, self._order(epoch), self.context_size, self.model_batch_size)
            for input_ids, attention_mask in batches:
                chunk = self._collect(input_ids, attention_mask)
                if chunk.numel():
                    produced = True
                    yield chunk
            self.stats.epochs = epoch + 1
            if not self.repeat:
                return
            if not produced:
                raise ConfigError("the documents produced no clean tokens; check the corpus and the tokenizer")
            epoch += 1

    def _collect(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        acts = capture(self.model, input_ids, attention_mask, [self.hookpoint], adapter=self.adapter)
        tensor = next(iter(acts.values()))  # [B, T, d]
        keep = token_mask(input_ids, attention_mask, self._special).to(tensor.device)
        self.stats.contexts += int(input_ids.shape[0])
        n_real = int(attention_mask.sum())
        self.stats.positions += n_real
        self.stats.masked += n_real - int(keep.sum())
        rows = tensor[keep].to(device=self.device, dtype=torch.float32)  # [n, d]
        return self.norm_filter(rows)

    def take(self, n_tokens: int) -> Tensor:
        """The next ``n_tokens`` clean activations (fewer if the documents run out), ``[n, d_in]``."""
        parts: list[Tensor] = []
        have = 0
        for chunk in self.chunks():
            parts.append(chunk)
            have += chunk.shape[0]
            if have >= n_tokens:
                break
        if not parts:
            raise ConfigError("the documents produced no clean tokens; check the corpus and the tokenizer")
        return torch.cat(parts)[:n_tokens]


def shuffled_batches(
    chunks: Iterable[Tensor], batch_size: int, capacity: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """Mix ``chunks`` in a buffer of ``capacity`` rows and yield shuffled batches ``[batch_size, d]``.

    Whenever the buffer is full it is permuted and emptied down to half, so every batch
    mixes rows from many contexts; what is left at the end is drained the same way (the
    last batch may be smaller).
    """
    parts: list[Tensor] = []
    held = 0
    for chunk in chunks:
        parts.append(chunk)
        held += chunk.shape[0]
        if held < capacity:
            continue
        pool = torch.cat(parts)
        pool = pool[torch.randperm(pool.shape[0], generator=generator).to(pool.device)]
        n_out = (pool.shape[0] - capacity // 2) // batch_size * batch_size
        for start in range(0, n_out, batch_size):
            yield pool[start : start + batch_size]
        parts = [pool[n_out:]]
        held = pool.shape[0] - n_out
    if held:
        pool = torch.cat(parts)
        pool = pool[torch.randperm(pool.shape[0], generator=generator).to(pool.device)]
        for start in range(0, pool.shape[0], batch_size):
            yield pool[start : start + batch_size]


def tensor_batches(data: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled batches from stored activations ``[N, d]``, one permutation per epoch."""
    if data.shape[0] == 0:
        raise ConfigError("the activation shard holds no training rows")
    while True:
        perm = torch.randperm(data.shape[0], generator=generator).to(data.device)
        for start in range(0, data.shape[0], batch_size):
            yield data[perm[start : start + batch_size]].float()


@dataclass
class ActivationShard:
    """Stored activations: training rows, held-out rows and provenance."""

    train: Tensor
    """``[N, d_in]`` training activations (clean tokens only)."""
    eval: Tensor
    """``[M, d_in]`` held-out activations."""
    metadata: dict[str, str]
    """Model, hookpoint, context size, median norm, ... (strings, as safetensors stores them)."""

    @property
    def d_in(self) -> int:
        """Width of the rows."""
        return int(self.train.shape[1])


def save_activations(path: str | Path, shard: ActivationShard) -> Path:
    """Write ``shard`` to a ``.safetensors`` file (float16 when the values fit, else float32)."""
    file = Path(path)
    if file.suffix != ".safetensors":
        raise ConfigError(f"activations are saved as .safetensors, not {file.suffix or 'no suffix'}: {file}")

    def compact(t: Tensor) -> Tensor:
        t = t.detach().cpu()
        # float16 halves the file; its range (65504) covers clean activations, not massive ones.
        if t.numel() and float(t.abs().max()) < 60_000:
            return t.to(torch.float16).contiguous()
        return t.to(torch.float32).contiguous()

    file.parent.mkdir(parents=True, exist_ok=True)
    # The held-out rows are copied: safetensors refuses tensors that share memory.
    tensors = {"train": compact(shard.train), "eval": compact(shard.eval).clone()}
    save_file(tensors, str(file), metadata=shard.metadata)
    return file


def load_activations(path: str | Path, eval_rows: int = 16_384) -> ActivationShard:
    """Read a shard written by :func:`save_activations`, or a plain ``.npy`` array ``[N, d_in]``.

    For ``.npy`` the last ``eval_rows`` rows (at most a fifth) are held out.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"activation file {file} does not exist")
    if file.suffix == ".npy":
        try:
            array = np.load(file, allow_pickle=False)
        except ValueError as exc:
            raise ConfigError(f"{file}: not a plain numeric .npy array ({exc})") from exc
        if array.ndim != 2:
            raise ConfigError(f"{file}: expected a 2-D array [tokens, d_in], got shape {list(array.shape)}")
        data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        n_eval = min(eval_rows, data.shape[0] // 5)
        return ActivationShard(data[: data.shape[0] - n_eval], data[data.shape[0] - n_eval :], {})
    if file.suffix != ".safetensors":
        raise ConfigError(f"activation file {file} must be .safetensors or .npy")
    try:
        tensors = load_file(str(file))
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{file}: cannot read safetensors ({exc})") from exc
    missing = {"train", "eval"} - set(tensors)
    if missing:
        raise ConfigError(f"{file}: missing tensors {sorted(missing)}; expected 'train' and 'eval'")
    # Kept in the stored dtype (float16 halves the memory); batches are converted as they are used.
    train, held = tensors["train"], tensors["eval"]
    if train.ndim != 2 or held.ndim != 2 or train.shape[1] != held.shape[1]:
        raise ConfigError(f"{file}: 'train' {list(train.shape)} and 'eval' {list(held.shape)} must be [N, d_in]")
    return ActivationShard(train, held, metadata)
