"""The one place the model, the SAE, the feature library and the policies meet.

``Auditor.run(inputs)`` tokenizes, runs the model only as deep as the SAE's
hookpoint, encodes the content tokens with the SAE (only the watched latents
when no caller asks for all of them), evaluates the loaded policy and returns
one :class:`AuditResult` per input, in input order. Every entry point (CLI,
server, library) goes through it.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
import time
from contextlib import contextmanager
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from auditor._cuda import HostCopy, to_device
from auditor.errors import AuditorError, ConfigError, HookpointError
from auditor.text import (
    ROLE_BOTH,
    ROLE_COMPLETION,
    ROLE_PROMPT,
    AuditInput,
    Encoded,
    InputError,
    TokenBatch,
    role_masks,
    tokenize_batch,
)

if TYPE_CHECKING:
    from auditor.features import FeatureLibrary
    from auditor.models import Hookpoint, LoadedModel
    from auditor.policy import AuditBatch, PendingVerdicts, PolicyEngine, Verdict
    from auditor.sae import SAE

__all__ = [
    "Auditor",
    "LaunchedRun",
    "AuditStream",
    "AuditResult",
    "TokenFeatures",
    "StageTimings",
    "DEFAULT_LIBRARY",
    "resolve_library",
    "check_fit",
]

_log = logging.getLogger(__name__)

#: The feature library (and through it the SAE) used when none is named.
DEFAULT_LIBRARY = "smollm2-135m-instruct"

# SAE math runs in float32 whatever the stored dtype (the shipped SAEs store float16).
_SAE_DTYPE = torch.float32


@dataclass
class TokenFeatures:
    """The strongest features of one token."""

    token: str
    position: int
    indices: list[int]
    activations: list[float]
    names: list[str | None]


@dataclass
class StageTimings:
    """Seconds spent per pipeline stage for one call of :meth:`Auditor.run`."""

    tokenize: float = 0.0
    forward: float = 0.0
    encode: float = 0.0
    evaluate: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "tokenize": self.tokenize,
            "forward": self.forward,
            "encode": self.encode,
            "evaluate": self.evaluate,
        }


@dataclass
class AuditResult:
    """What the auditor found in one input."""

    id: str | None
    tokens: list[str]
    content_mask: list[bool]
    truncated: bool
    n_content_tokens: int
    top_features: list[TokenFeatures] = field(default_factory=list)
    verdict: Verdict | None = None


PACK_ROW_TOKENS = 256
"""Longest packed row: texts share rows up to this many tokens (128-256 ran fastest on the
2-core CPU for 8-32 texts of 10-50 tokens, benchmarks/RESULTS.md)."""
PACKED_BUDGET_FACTOR = 4
"""A packed forward may hold this many times ``batch_tokens`` real tokens (it has no padding)."""


@dataclass
class _Launched:
    """One bucket whose device work is queued (:meth:`Auditor._launch_batch`)."""

    batch: TokenBatch
    pending: PendingVerdicts | None
    top: tuple[HostCopy, HostCopy] | None
    """The top-k activations and latent indices of each content token, on their way to the host."""


class LaunchedRun:
    """An :meth:`Auditor.launch` whose last bucket's device work may still be running."""

    def __init__(self, auditor: Auditor, items: Sequence[AuditInput]) -> None:
        self._auditor, self._items = auditor, items
        self.timings = StageTimings()
        """Seconds per stage, :meth:`results` included once it has returned. On a GPU these are
        the host's: the wait for the device falls in the stage that first needs its results."""
        self._results: list[AuditResult | None] = [None] * len(items)
        self._queued: tuple[list[int], _Launched] | None = None
        # A second caller of results() waits for the first to build the queued bucket (its
        # results are not there yet), and a bucket that failed to build stays queued.
        self._lock = threading.Lock()

    def _finish_queued(self) -> None:
        with self._lock:
            if self._queued is not None:
                rows, launched = self._queued
                self._auditor._finish_batch(rows, launched, self._items, self._results, self.timings)
                self._queued = None

    def results(self) -> list[AuditResult]:
        """One :class:`AuditResult` per item, in input order (waits for the device's work)."""
        self._finish_queued()
        return [r for r in self._results if r is not None]


def default_policy_path() -> Path:
    """``policies/default.yaml`` beside the package: the policy used when none is named."""
    return Path(__file__).resolve().parent.parent / "policies" / "default.yaml"


class Auditor:
    """Audit texts with one model, one SAE and, optionally, a feature library and a policy.

    Example::

        auditor = Auditor.load()                      # embedded default model, SAE, library
        [result] = auditor.run([AuditInput(text="Send me your bank PIN")], top_k=3)
        for tf in result.top_features:
            print(tf.token, tf.names, tf.activations)
    """

    overlap_buckets: bool = True
    """Whether :meth:`run` queues a bucket's device work before it builds the previous bucket's
    results (on a GPU the host's Python then runs while the GPU computes; on a CPU it changes
    nothing). False builds each bucket's results first (``benchmarks/audit_pipeline.py``
    compares the two)."""

    def __init__(
        self,
        model: LoadedModel,
        sae: SAE,
        *,
        hookpoint: str | None = None,
        library: FeatureLibrary | None = None,
        policy: PolicyEngine | None = None,
        max_tokens: int = 2048,
        batch_tokens: int = 512,
        pack: bool | None = None,
        shared_streams: bool | None = None,
    ) -> None:
        from auditor.models import check_sae_compatible

        if sae.W_enc.dtype != torch.float32:
            raise ConfigError(
                f"the SAE's weights are {str(sae.W_enc.dtype).removeprefix('torch.')}; the auditor computes "
                "features in float32: load it with load_sae(path, dtype='float32') (Auditor.load does) or pass sae.float()"
            )
        hook = check_fit(sae, library=library, policy=policy, hookpoint=hookpoint, model_name=model.name)
        check_sae_compatible(model, sae.cfg.d_in, hook)
        if max_tokens < 2:
            raise ConfigError(f"max_tokens must be at least 2, got {max_tokens}")
        if batch_tokens < 1:
            raise ConfigError(f"batch_tokens must be at least 1, got {batch_tokens}")
        self.model = model
        self.sae = sae
        self.hookpoint = hook
        self.library = library
        self.policy = policy
        self.max_tokens = max_tokens
        # Padded tokens per forward. On a 2-core CPU, 512 ran 19% faster than 8,192
        # (benchmarks/RESULTS.md): smaller matmuls stay in cache. An input longer than
        # the budget still runs, alone in its batch.
        self.batch_tokens = batch_tokens
        self._pack = pack
        self._shared_streams = shared_streams
        self._streams_lock = threading.Lock()
        self.device = torch.device(model.device)
        self._timings = threading.local()
        self._fitted: weakref.WeakSet[PolicyEngine] = weakref.WeakSet()  # engines checked against the SAE

    def engine_for(self, policy: PolicyEngine | None) -> PolicyEngine | None:
        """``policy`` (checked once to fit this auditor's SAE, see :func:`check_fit`), else the
        auditor's own policy."""
        if policy is None or policy is self.policy:
            return self.policy
        if policy not in self._fitted:
            check_fit(self.sae, policy=policy, hookpoint=self.hookpoint)
            self._fitted.add(policy)
        return policy

    @property
    def last_timings(self) -> StageTimings:
        """Stage timings of this thread's latest :meth:`run` (threads that share an auditor each see their own)."""
        timings = getattr(self._timings, "value", None)
        return timings if timings is not None else StageTimings()

    @property
    def pack(self) -> bool:
        """Whether forwards pack several texts per row (see :func:`~auditor.models.capture_packed`).

        ``Auditor(pack=None)`` (the default) decides on first use: packing is on when the
        model's packed activations match its padded ones (:func:`~auditor.models.packing_supported`).
        """
        if self._pack is None:
            from auditor.models import packing_supported

            self._pack = packing_supported(self.model.model, self.hookpoint)
        return self._pack

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        *,
        model: str | Any | None = None,
        tokenizer: Any = None,
        sae: str | None = None,
        sae_format: str | None = None,
        library: str | None = None,
        policy: str | None = None,
        hookpoint: str | None = None,
        device: str | None = None,
        max_tokens: int = 2048,
        compile: bool | str = False,
        dtype: str | torch.dtype | None = None,
    ) -> Auditor:
        """Load model, SAE, library and policy by name or path.

        ``model`` is a name or path (default: ``$AUDITOR_MODEL``, else the embedded default), a
        :class:`~auditor.models.LoadedModel`, or a ``transformers`` model already in your process
        with its ``tokenizer`` (:func:`~auditor.models.wrap_model`: it stays on its device, in its
        dtype; ``device`` then defaults to that device and ``dtype`` does not apply). ``device``
        defaults to the CPU for a model loaded by name.

        ``compile`` (True or a ``torch.compile`` backend) compiles the model's decoder layers
        (:func:`auditor.models.compile_layers`). ``dtype`` is the model's (default: float32 on
        the CPU, bfloat16 elsewhere); the SAE and the policy always compute in float32.

        The library is ``library``, else the one ``policy`` names, else (without ``sae``)
        the default ``feature_libraries/smollm2-135m-instruct`` (:func:`resolve_library`);
        the SAE is ``sae``, else the library's.

        A model object is left as it was (training mode, gradients, its tokenizer's pad token)
        when loading fails.
        """
        with _unchanged_on_failure(model, tokenizer):
            return cls._load(
                model=model, tokenizer=tokenizer, sae=sae, sae_format=sae_format, library=library, policy=policy,
                hookpoint=hookpoint, device=device, max_tokens=max_tokens, compile=compile, dtype=dtype,
            )

    @classmethod
    def _load(
        cls,
        *,
        model: str | Any | None,
        tokenizer: Any,
        sae: str | None,
        sae_format: str | None,
        library: str | None,
        policy: str | None,
        hookpoint: str | None,
        device: str | None,
        max_tokens: int,
        compile: bool | str,
        dtype: str | torch.dtype | None,
    ) -> Auditor:
        from auditor.features import load_library
        from auditor.models import LoadedModel, load_model, parse_device, wrap_model
        from auditor.policy import load_policy
        from auditor.sae import load_sae

        given: LoadedModel | None = None
        if isinstance(model, LoadedModel):
            if tokenizer is not None:
                raise ConfigError("tokenizer= goes with a transformers model; a LoadedModel brings its own")
            given = model
        elif model is not None and not isinstance(model, (str, os.PathLike)):
            given = wrap_model(model, tokenizer)
        elif tokenizer is not None:
            raise ConfigError("tokenizer= goes with a model object; a model given by name or path brings its own")
        if given is not None:
            if dtype is not None:
                raise ConfigError("dtype= applies to a model loaded by name or path; convert your model with .to(dtype) instead")
            device = device or str(given.device)
            asked = parse_device(device, usable=False)  # a misspelt device is a ModelError naming the usable ones
            # "cuda" is whichever GPU the model is on; the CPU has one device ("cpu:0" is "cpu").
            same_index = asked.index in (None, given.device.index) or asked.type == "cpu"
            if asked.type != given.device.type or not same_index:
                raise ConfigError(f"the model is on {given.device}, not {device}: leave device= out or move the model first")
            device = str(given.device)
        device = device or "cpu"
        parse_device(device)  # before the SAE loads onto it
        engine = load_policy(policy) if policy else None
        lib = resolve_library(
            load_library(library) if library else None, [engine] if engine is not None else [], sae_given=sae is not None
        )
        if sae is not None:
            sae_name = sae
        elif lib is not None and lib.sae.path is not None:
            sae_name = str(lib.resolve_path(lib.sae.path))
        elif lib is not None:
            raise ConfigError(f"feature library {lib.id!r} does not say where its SAE is (no sae.path); pass --sae PATH")
        else:  # pragma: no cover - _default_library raises first
            raise ConfigError("no SAE given")
        sae_obj = load_sae(sae_name, format=sae_format if sae is not None else None, device=device, dtype=_SAE_DTYPE)
        # Before the (slower) model load; the constructor checks again, with the model's name.
        check_fit(sae_obj, library=lib, policy=engine, hookpoint=hookpoint, sae_name=sae_name)
        loaded = given if given is not None else load_model(model, device=device, dtype=dtype, compile=compile)
        auditor = cls(
            loaded,
            sae_obj,
            hookpoint=hookpoint,
            library=lib,
            policy=engine,
            max_tokens=max_tokens,
        )
        if given is not None and compile:
            # Last, once nothing else can fail: compiled forwards on a user's modules are not undone
            # by _unchanged_on_failure (compile_layers checks its backend before it changes any).
            from auditor.models import compile_layers

            compile_layers(loaded, compile)
        return auditor

    # ------------------------------------------------------------------ running
    def name_of(self, index: int) -> str | None:
        return self.library.name_for_index(index) if self.library is not None else None

    def run(
        self,
        items: Sequence[AuditInput],
        *,
        top_k: int = 0,
        evaluate: bool = True,
        policy: PolicyEngine | None = None,
    ) -> list[AuditResult]:
        """Audit ``items`` in length-bucketed batches; results come back in input order.

        ``top_k > 0`` records each content token's ``top_k`` strongest latents
        (this needs the full-width encode); policy evaluation encodes only the
        latents the policy watches. ``policy`` overrides the auditor's own policy
        for this call (a server holding several policies passes the one asked for);
        ``evaluate=False`` skips policy evaluation.
        """
        launched = self._launch(items, top_k, evaluate, policy, "Auditor.run()")
        results = launched.results()
        self._timings.value = launched.timings
        return results

    def launch(
        self,
        items: Sequence[AuditInput],
        *,
        top_k: int = 0,
        evaluate: bool = True,
        policy: PolicyEngine | None = None,
    ) -> LaunchedRun:
        """:meth:`run` in two halves: the device's work queued now, the results built by
        :meth:`LaunchedRun.results` later (in any thread).

        On a GPU this returns once the last bucket's forward, encode and decision are queued,
        before they are computed: a caller that builds the results elsewhere (the sidecar does,
        on a GPU) can queue the next batch meanwhile. On a CPU the work is done when it returns.
        """
        return self._launch(items, top_k, evaluate, policy, "Auditor.launch()")

    def _launch(
        self, items: Sequence[AuditInput], top_k: int, evaluate: bool, policy: PolicyEngine | None, caller: str
    ) -> LaunchedRun:
        _check_items(items, caller)
        engine = self.engine_for(policy) if evaluate else None
        run = LaunchedRun(self, items)
        timings = run.timings
        t0 = time.perf_counter()
        batch = tokenize_batch(self.model.tokenizer, items, max_tokens=self.max_tokens)
        timings.tokenize += time.perf_counter() - t0
        # Each bucket's device work is queued before the previous bucket's results are built: on
        # a GPU the host's Python (verdict objects, token features) runs while the GPU computes
        # the next forward. On a CPU this is the same work in the same order.
        for rows in self._buckets(batch):
            launched = self._launch_batch(_select_rows(batch, rows), top_k, engine, timings)
            run._finish_queued()
            run._queued = (rows, launched)
            if not self.overlap_buckets:
                run._finish_queued()
        return run

    def _buckets(self, batch: TokenBatch) -> Iterator[list[int]]:
        """Group rows of similar length so each group fits the token budget.

        Padded forwards count ``longest x rows`` against ``batch_tokens``; packed forwards
        (:attr:`pack`) count real tokens only, against ``PACKED_BUDGET_FACTOR x batch_tokens``.
        """
        lengths = batch.lengths.tolist()
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        packed = self.pack
        budget = self.batch_tokens * (PACKED_BUDGET_FACTOR if packed else 1)
        group: list[int] = []
        total = 0
        for i in order:
            # Rows come shortest first, so a padded group is as wide as its newest row.
            cost = total + lengths[i] if packed else lengths[i] * (len(group) + 1)
            if group and cost > budget:
                yield group
                group, total = [], 0
            group.append(i)
            total += lengths[i]
        if group:
            yield group

    @torch.inference_mode()
    def activations(self, batch: TokenBatch) -> torch.Tensor:
        """Hookpoint activations ``[B, T, d_in]`` in float32 (the forward stops after the hooked layer)."""
        return self._activations(batch).float()

    def _activations(self, batch: TokenBatch) -> torch.Tensor:
        """:meth:`activations` in the model's dtype; the inputs cross to the device without waiting."""
        from auditor.models import capture, capture_packed

        if self.pack and batch.input_ids.shape[0] > 1:
            acts = capture_packed(
                self.model.model, batch.input_ids, batch.attention_mask, [self.hookpoint], row_tokens=PACK_ROW_TOKENS
            )[self.hookpoint]
        else:
            acts = capture(
                self.model.model, batch.input_ids, batch.attention_mask, [self.hookpoint], stop_early=True
            )[self.hookpoint]
        return acts

    @torch.inference_mode()
    def _launch_batch(self, batch: TokenBatch, top_k: int, engine: PolicyEngine | None, timings: StageTimings) -> _Launched:
        """Queue one bucket's device work: the forward, the encode, the policy's decision and the
        copies of what the results need to the host. Nothing here waits for the device but
        transformers' own mask preparation inside the forward: the content tokens are picked by an
        index computed on the host (a boolean mask on a GPU would wait for it), every input crosses
        to the device through pinned memory without waiting (``to_device``), and a batch without
        padding runs with no mask (``capture``)."""
        t0 = time.perf_counter()
        B, T = batch.content_mask.shape
        index = to_device(batch.content_mask.reshape(-1).nonzero().squeeze(1), self.device)  # content tokens, row-major
        mask = role = None
        if engine is not None:
            mask, role = to_device(batch.content_mask, self.device), to_device(batch.role, self.device)
        # In the model's dtype: a bfloat16 model's rows meet the SAE's float32 weights in the
        # encode (SAE.encode_watched), not as a float32 copy of the whole batch first.
        acts = self._activations(batch)  # [B, T, d_in]
        t1 = time.perf_counter()
        timings.forward += t1 - t0

        x = acts.reshape(B * T, -1).index_select(0, index)  # [N, d_in] content tokens only
        full: torch.Tensor | None = None
        watched_feats: torch.Tensor | None = None
        recon: torch.Tensor | None = None
        if engine is not None:
            f, r, full = self._encode_watched(x, engine, full=top_k > 0)
            watched_feats = f.new_zeros((B * T, f.shape[1])).index_copy_(0, index, f).view(B, T, -1)
            if r is not None:
                recon = r.new_zeros(B * T).index_copy_(0, index, r).view(B, T)
        elif top_k > 0:
            full = self.sae.encode(x)  # [N, d_sae]
        t2 = time.perf_counter()
        timings.encode += t2 - t1

        pending = None
        if engine is not None and watched_feats is not None:
            pending = engine.decide(_audit_batch(engine, batch, acts, watched_feats, recon, mask, role))
        top = None
        if full is not None:
            vals, idx = full.topk(min(top_k, full.shape[1]), dim=1)  # [N, k]
            top = (HostCopy(vals), HostCopy(idx))
        timings.evaluate += time.perf_counter() - t2
        return _Launched(batch, pending, top)

    def _finish_batch(
        self,
        rows: list[int],
        launched: _Launched,
        items: Sequence[AuditInput],
        results: list[AuditResult | None],
        timings: StageTimings,
    ) -> None:
        """Build a launched bucket's results (waiting for its device work only) into ``results[rows]``."""
        batch = launched.batch
        B = len(rows)
        t0 = time.perf_counter()
        verdicts: list[Any] = launched.pending.verdicts() if launched.pending is not None else [None] * B
        timings.evaluate += time.perf_counter() - t0

        top_per_row: list[list[TokenFeatures]] = [[] for _ in range(B)]
        if launched.top is not None:
            vals_l, idx_l = launched.top[0].get().tolist(), launched.top[1].get().tolist()
            rows_idx, pos_idx = batch.content_mask.nonzero(as_tuple=True)  # the order of the content tokens
            for n, (r, p) in enumerate(zip(rows_idx.tolist(), pos_idx.tolist())):
                keep = [j for j, v in enumerate(vals_l[n]) if v > 0]
                top_per_row[r].append(
                    TokenFeatures(
                        token=batch.tokens[r][p],
                        position=p,
                        indices=[idx_l[n][j] for j in keep],
                        activations=[vals_l[n][j] for j in keep],
                        names=[self.name_of(idx_l[n][j]) for j in keep],
                    )
                )

        lengths = batch.lengths.tolist()
        for b, row in enumerate(rows):
            n_tok = lengths[b]
            results[row] = AuditResult(
                id=items[row].id,
                tokens=batch.tokens[b],
                content_mask=batch.content_mask[b, :n_tok].tolist(),
                truncated=batch.truncated[b],
                n_content_tokens=int(batch.content_mask[b].sum()),
                top_features=top_per_row[b],
                verdict=verdicts[b],
            )

    def _encode_watched(
        self, x: torch.Tensor, engine: PolicyEngine, *, full: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Watched latents ``[N, F]`` of rows ``x [N, d_in]``, their reconstruction error ``[N]`` if
        the policy reads it, and every latent ``[N, d_sae]`` if ``full`` (one encode serves all)."""
        enc = self.sae.encode_watched(x, engine.watched, recon_error=engine.needs_recon_error, full=full)
        return enc.features, enc.recon_error, enc.full

    def stream(self, item: AuditInput, *, policy: PolicyEngine | None = None) -> AuditStream:
        """Start an incremental audit of ``item`` whose completion (or text) arrives in chunks.

        Each :meth:`AuditStream.feed` runs the model only on the tokens not seen before,
        reusing the KV cache of the prefix, and returns the verdict on everything so far:
        the same result :meth:`run` gives on the whole input (up to float rounding).
        :meth:`feed_streams` feeds several streams in one forward.

        Example::

            stream = auditor.stream(AuditInput(prompt="Tell me a story. ", completion=""))
            for chunk in chunks_from_upstream:
                result = stream.feed(chunk)
                if result.verdict is not None and result.verdict.action == "block":
                    break
        """
        if not isinstance(item, AuditInput):
            raise InputError(
                f"Auditor.stream() takes one AuditInput, got {type(item).__name__}: pass "
                "AuditInput(text=...), AuditInput(prompt=..., completion=\"\") or AuditInput(messages=[...])"
            )
        engine = self.engine_for(policy)
        if engine is None:
            raise ConfigError("a streaming audit needs a policy; load one with policy=... or pass policy=")
        return AuditStream(self, item, engine)

    @property
    def shared_stream_forwards(self) -> bool:
        """Whether streams' new tokens share forwards (:func:`~auditor.models.streams.capture_streams`).

        ``Auditor(shared_streams=None)`` (the default) decides on first use: on when the model's
        streamed activations match its plain ones (:func:`~auditor.models.streams.streams_supported`);
        otherwise (or with ``shared_streams=False``) each stream keeps a ``transformers`` cache
        and runs its own forward.
        """
        if self._shared_streams is None:
            from auditor.models.streams import streams_supported

            with self._streams_lock:
                if self._shared_streams is None:
                    self._shared_streams = streams_supported(self.model.model, self.hookpoint)
        return self._shared_streams

    def feed_streams(self, feeds: Sequence[tuple[AuditStream, str]]) -> list[AuditResult]:
        """Append each chunk to its stream and audit every stream so far, sharing the work.

        The new tokens of all the streams run through one forward (each stream attends to its
        own cache), one encode per policy and one policy evaluation per policy, so ``n``
        streams fed together cost about one forward over their new tokens instead of ``n``
        forwards (each of which reads every weight). Results come back in ``feeds`` order and
        equal what :meth:`AuditStream.feed` gives each stream alone. A stream may appear once.
        If the work fails, every stream in ``feeds`` starts over on its next feed (its cache is
        dropped; its text so far is kept).
        """
        streams = [stream for stream, _ in feeds]
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("feed_streams got the same stream twice; feed it one chunk per call")
        for stream in streams:
            if stream.auditor is not self:
                raise ValueError("feed_streams got a stream started by another Auditor")
        for stream, chunk in feeds:
            stream._append(chunk)
        if not streams:
            return []
        try:
            return self._update_streams(streams)
        except BaseException:
            # A half-finished update leaves caches and features out of step: start over next time.
            for stream in streams:
                stream._reset()
            raise

    @torch.inference_mode()
    def _update_streams(self, streams: list[AuditStream]) -> list[AuditResult]:
        timings = StageTimings()
        t0 = time.perf_counter()
        batch = tokenize_batch(
            self.model.tokenizer, [s.item for s in streams], max_tokens=self.max_tokens, previous=[s._encoded for s in streams]
        )
        for stream, encoded in zip(streams, batch.encoded):
            stream._encoded = encoded
        lengths = batch.lengths.tolist()
        all_ids = [row[:n] for row, n in zip(batch.input_ids.tolist(), lengths)]
        t1 = time.perf_counter()
        timings.tokenize = t1 - t0

        new_ids = [stream._keep_common(ids) for stream, ids in zip(streams, all_ids)]
        growing = [i for i, ids in enumerate(new_ids) if ids]
        acts: dict[int, torch.Tensor] = {}  # stream -> [n_new, d_in]
        if growing:
            if self.shared_stream_forwards:
                from auditor.models import pack_rows
                from auditor.models.streams import capture_streams

                # Forwards of at most a packed batch's token budget (a longer stream runs alone).
                budget = self.batch_tokens * PACKED_BUDGET_FACTOR
                for rows in pack_rows([len(new_ids[i]) for i in growing], budget):
                    group = [growing[r] for r in rows]
                    outs = capture_streams(
                        self.model.model, self.hookpoint, [streams[j]._kv for j in group], [new_ids[j] for j in group]
                    )
                    acts.update({j: out.float() for j, out in zip(group, outs)})
            else:
                for i in growing:
                    acts[i] = streams[i]._forward_alone(new_ids[i])
        t2 = time.perf_counter()
        timings.forward = t2 - t1

        # One encode per policy over all its streams' new rows; rows encode independently.
        by_engine: dict[int, list[int]] = {}
        for i, stream in enumerate(streams):
            by_engine.setdefault(id(stream.engine), []).append(i)
        for members in by_engine.values():
            fed = [i for i in members if i in acts]
            if not fed:
                continue
            feats, recon, _ = self._encode_watched(torch.cat([acts[i] for i in fed]), streams[fed[0]].engine)
            start = 0
            for i in fed:
                n = acts[i].shape[0]
                streams[i]._store(acts[i], feats[start : start + n], None if recon is None else recon[start : start + n])
                start += n
        for stream, ids in zip(streams, all_ids):
            stream._ids = ids
        t3 = time.perf_counter()
        timings.encode = t3 - t2

        verdicts: dict[int, Any] = {}
        for members in by_engine.values():
            engine = streams[members[0]].engine
            sub = _select_rows(batch, members)
            width = sub.input_ids.shape[1]
            mask = sub.content_mask.to(self.device)  # [G, T]
            feats_bt = self._zeros(len(members), width, streams[members[0]]._feats.shape[1])
            recon_bt = self._zeros(len(members), width, None) if engine.needs_recon_error else None
            acts_bt = self._zeros(len(members), width, self.sae.cfg.d_in) if engine.needs_resid else None
            for g, i in enumerate(members):
                n = lengths[i]
                feats_bt[g, :n] = streams[i]._feats
                if recon_bt is not None:
                    recon_bt[g, :n] = streams[i]._recon
                if acts_bt is not None:
                    acts_bt[g, :n] = streams[i]._acts
            feats_bt = torch.where(mask[..., None], feats_bt, 0.0)
            if recon_bt is not None:
                recon_bt = torch.where(mask, recon_bt, 0.0)
            if acts_bt is not None:
                acts_bt = torch.where(mask[..., None], acts_bt, 0.0)
            for i, verdict in zip(members, engine.evaluate(_audit_batch(engine, sub, acts_bt, feats_bt, recon_bt))):
                verdicts[i] = verdict
        timings.evaluate = time.perf_counter() - t3
        self._timings.value = timings
        results = []
        for i, stream in enumerate(streams):
            stream.last_timings = timings
            n = lengths[i]
            results.append(
                AuditResult(
                    id=stream.item.id,
                    tokens=batch.tokens[i],
                    content_mask=batch.content_mask[i, :n].tolist(),
                    truncated=batch.truncated[i],
                    n_content_tokens=int(batch.content_mask[i].sum()),
                    verdict=verdicts[i],
                )
            )
        return results

    def _zeros(self, rows: int, width: int, features: int | None) -> torch.Tensor:
        """SAE-dtype zeros ``[rows, width]`` or ``[rows, width, features]`` on the auditor's device."""
        shape = (rows, width) if features is None else (rows, width, features)
        return torch.zeros(shape, dtype=_SAE_DTYPE, device=self.device)


class AuditStream:
    """An audit of one growing input that keeps the truncated model's KV cache between chunks.

    Built by :meth:`Auditor.stream`. Tokenization always covers the whole input so far
    (cheap), then only the new token ids go through the model; when a chunk changes the
    tokenization of the last tokens (a word split across chunks), the cache is cut back
    to the longest common prefix and the changed tokens are recomputed. Per-token watched
    features are cached too, so a chunk costs a forward and an encode of its own tokens
    plus one policy evaluation over the sequence. :meth:`Auditor.feed_streams` feeds many
    streams in one forward. Not thread-safe: one stream per caller (feeds of one stream
    must not overlap); streams of one auditor may be fed from several threads, and, like
    :meth:`Auditor.run`, not concurrently with steering on the same model from ordinary
    threads.
    """

    def __init__(self, auditor: Auditor, item: AuditInput, engine: PolicyEngine) -> None:
        self.auditor = auditor
        self.engine = engine
        # Text that is not a completion (a bare text) grows itself; everything else grows its completion.
        self._grows_text = item.text is not None
        if not self._grows_text and item.completion is None:
            item = AuditInput(messages=item.messages, prompt=item.prompt, completion="", id=item.id)
        self.item = item
        # Made on the first feed, on the thread that runs it (deciding the kind may run the model).
        self._kv: Any = None
        self._ids: list[int] = []
        self._encoded: Encoded | None = None  # the rendered input's tokens so far (the next feed encodes only its end)
        d_in = auditor.sae.cfg.d_in
        n_watched = engine.watched.numel()
        self._acts = torch.zeros((0, d_in), device=auditor.device)  # [T_seen, d_in], kept only if the policy reads it
        self._feats = torch.zeros((0, n_watched), device=auditor.device)  # [T_seen, F]
        self._recon = torch.zeros((0,), device=auditor.device)  # [T_seen]
        self.last_timings = StageTimings()

    @property
    def n_cached(self) -> int:
        """Tokens whose activations (and cache entries) are held."""
        return len(self._ids)

    def feed(self, chunk: str) -> AuditResult:
        """Append ``chunk`` to the input and audit everything so far; ``feed("")`` audits the prefix."""
        [result] = self.auditor.feed_streams([(self, chunk)])
        return result

    def estimate_new_tokens(self, chunk: str) -> int:
        """About how many tokens feeding ``chunk`` runs through the model (the whole input on a
        first feed), from its characters (a batcher's token budget needs no tokenizer)."""
        chars = len(chunk)
        if not self._ids:
            item = self.item
            chars += sum(len(x or "") for x in (item.text, item.prompt, item.completion))
            chars += sum(len(m.get("content") or "") + 8 for m in item.messages or ())
        return chars // 4 + 1

    # ------------------------------------------------------------------ used by Auditor.feed_streams
    def _new_cache(self) -> Any:
        if self.auditor.shared_stream_forwards:
            from auditor.models.streams import StreamCache

            return StreamCache()
        from transformers import DynamicCache

        return DynamicCache(config=self.auditor.model.model.config)

    def _append(self, chunk: str) -> None:
        if not chunk:
            return
        if self._grows_text:
            self.item = AuditInput(text=(self.item.text or "") + chunk, id=self.item.id)
        else:
            self.item = AuditInput(
                messages=self.item.messages,
                prompt=self.item.prompt,
                completion=(self.item.completion or "") + chunk,
                id=self.item.id,
            )

    def _reset(self) -> None:
        self._kv = None
        self._ids = []
        self._encoded = None
        self._acts, self._feats, self._recon = self._acts[:0], self._feats[:0], self._recon[:0]

    def _keep_common(self, ids: list[int]) -> list[int]:
        """Cut cache and features back to the prefix ``ids`` shares with what was seen; the ids to run."""
        if self._kv is None:
            self._kv = self._new_cache()
        limit = min(len(ids), len(self._ids))
        common = next((i for i in range(limit) if ids[i] != self._ids[i]), limit)
        if common < len(self._ids):
            # The new chunk re-split the last tokens: forget them (cache included) and redo them.
            try:
                self._kv.crop(common - len(self._ids))  # a negative count removes that many tokens
            except (ValueError, RuntimeError):
                # A cache layer that cannot roll back (a full sliding window): start over.
                self._kv = self._new_cache()
                common = 0
            self._acts, self._feats, self._recon = self._acts[:common], self._feats[:common], self._recon[:common]
        return ids[common:]

    def _forward_alone(self, new: list[int]) -> torch.Tensor:
        """The new tokens' activations ``[n, d_in]`` from a forward that continues this stream's own cache."""
        from auditor.models import capture

        aud = self.auditor
        return capture(
            aud.model.model,
            torch.tensor([new], dtype=torch.long, device=aud.device),
            None,
            [aud.hookpoint],
            stop_early=True,
            past_key_values=self._kv,
        )[aud.hookpoint][0].float()

    def _store(self, acts: torch.Tensor, feats: torch.Tensor, recon: torch.Tensor | None) -> None:
        if self.engine.needs_resid:  # hookpoint probes read the residual stream; nothing else does
            self._acts = torch.cat([self._acts, acts])
        self._feats = torch.cat([self._feats, feats])
        if recon is not None:
            self._recon = torch.cat([self._recon, recon])


def _audit_batch(
    engine: PolicyEngine,
    batch: TokenBatch,
    acts: torch.Tensor | None,
    watched_feats: torch.Tensor,
    recon: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    role: torch.Tensor | None = None,
) -> AuditBatch:
    """What ``engine`` reads of a batch: ``acts [B, T, d_in]`` (needed only when the policy reads
    the residual stream), ``watched_feats [B, T, F]``, ``recon [B, T]``; ``mask`` and ``role``: the
    batch's content mask and roles already on the features' device (else moved there here)."""
    from auditor.policy import AuditBatch

    if mask is None or role is None:
        dev = watched_feats.device
        mask, role = batch.content_mask, batch.role
        if mask.device != dev:  # a call each, even when already there
            mask, role = mask.to(dev), role.to(dev)
    # A policy that reads no prompt or completion scope (every rule and leaf "any", as in the
    # default policy) needs no role masks: two tensor operations fewer per batch.
    is_completion, is_prompt = role_masks(role) if engine.reads_roles else (None, None)
    return AuditBatch(
        features=watched_feats,
        mask=mask,
        is_completion=is_completion,
        is_prompt=is_prompt,
        recon_error=recon,
        resid=acts if engine.needs_resid else None,
        tokens=batch.tokens,
    )


@contextmanager
def _unchanged_on_failure(model: Any, tokenizer: Any) -> Iterator[None]:
    """Put a user's model (and tokenizer) back as they were if the block fails after
    :func:`~auditor.models.wrap_model` changed them (eval mode, gradients off, a pad token)."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    training = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    pad = getattr(tokenizer, "pad_token", None) if tokenizer is not None else None
    try:
        yield
    except BaseException:
        for module, mode in training:
            module.training = mode
        for param, flag in grads:
            param.requires_grad_(flag)
        if tokenizer is not None and pad is None and getattr(tokenizer, "pad_token", None) is not None:
            tokenizer.pad_token = None
        raise


def _check_items(items: Any, caller: str) -> None:
    """``items`` is a sequence of :class:`AuditInput`, else :class:`InputError` saying how to make one."""
    how = (
        "wrap each input: AuditInput(text=...), AuditInput(messages=[...]), AuditInput(prompt=..., completion=...) "
        "(auditor.text.parse_input turns a JSON-style dict or a string into one)"
    )
    if isinstance(items, (AuditInput, str, bytes, dict)) or not isinstance(items, Sequence):
        raise InputError(f"{caller} takes a list of AuditInput, got {type(items).__name__}; {how}")
    for i, item in enumerate(items):
        if not isinstance(item, AuditInput):
            raise InputError(f"{caller}: item {i} is a {type(item).__name__}, not an AuditInput; {how}")


def _select_rows(batch: TokenBatch, rows: list[int]) -> TokenBatch:
    """Rows of a batch, with padding trimmed to the longest selected row (the batch itself when
    that is every row in order, already as wide as its longest: a single text, or streams that
    share one policy; five indexing calls fewer, 0.2 ms a streamed chunk on a 2-core VM)."""
    if rows == list(range(len(batch.tokens))) and max(map(len, batch.tokens), default=0) == batch.input_ids.shape[1]:
        return batch
    idx = torch.tensor(rows, dtype=torch.long)
    width = int(batch.lengths[idx].max()) if rows else 1
    return TokenBatch(
        input_ids=batch.input_ids[idx, :width],
        attention_mask=batch.attention_mask[idx, :width],
        content_mask=batch.content_mask[idx, :width],
        role=batch.role[idx, :width],
        tokens=[batch.tokens[i] for i in rows],
        truncated=[batch.truncated[i] for i in rows],
    )


def resolve_library(
    explicit: FeatureLibrary | None, engines: Sequence[PolicyEngine], *, sae_given: bool
) -> FeatureLibrary | None:
    """The feature library an auditor runs with: the one asked for, else the policies', else the default.

    One rule for ``auditor audit`` and ``auditor serve``: an explicit library wins, and it
    must describe the same SAE (``sae.id``) as every policy's library, since a policy's
    feature indices belong to its library's SAE. Without either, and without an explicit
    SAE, the shipped default library.
    """
    if explicit is not None:
        for engine in engines:
            theirs = engine.library
            if theirs is not None and theirs.sae.id != explicit.sae.id:
                raise ConfigError(
                    f"--library {explicit.id!r} describes SAE {explicit.sae.id!r}, but policy {engine.name!r} was "
                    f"written for library {theirs.id!r} (SAE {theirs.sae.id!r}); drop --library to use the "
                    "policy's, or use a policy written for this library"
                )
        return explicit
    if engines:
        return engines[0].library
    return None if sae_given else _default_library()


def check_fit(
    sae: SAE,
    *,
    library: FeatureLibrary | None = None,
    policy: PolicyEngine | None = None,
    hookpoint: str | None = None,
    sae_name: str | None = None,
    model_name: str | None = None,
) -> str:
    """Check that ``library`` and ``policy`` belong to ``sae``; return the hookpoint an auditor reads.

    The one check of how the parts fit, run when they are put together, before any audit:
    by :meth:`Auditor.load` (before the model loads), by every :class:`Auditor`, and by the
    server for each policy it loads or reloads. The hookpoint is ``hookpoint`` (a caller's
    override), else the SAE's, else the library's (the policy's library without one). Raises :class:`ConfigError` (naming the
    files and how to fix it) when

    - the library declares ``sae.d_sae`` and the SAE has another number of latents;
    - the library's ``sae.hookpoint`` is not that hookpoint;
    - the policy watches a latent the SAE does not have (feature leaves, feature probes);
    - a hookpoint probe of the policy reads another width than the SAE's ``d_in`` (the
      model's width at the hookpoint).

    A library's features are only meaningful for its SAE at its hookpoint, so a hookpoint
    mismatch is an error: hookpoint names are canonical, a mismatch is certain, and auditing
    there gives verdicts that look valid and mean nothing. Model names are not canonical (a
    Hub id, a local folder's name and a GGUF stem can all name one model), so a library
    written for another ``model_name`` only logs a warning. ``sae_name`` (a path or id) and
    ``model_name`` are for the messages and that warning.
    """
    from auditor.models import parse_hookpoint

    named_by = library if library is not None else (policy.library if policy is not None else None)
    hook = hookpoint or sae.cfg.metadata.hook_name or (named_by.sae.hookpoint if named_by is not None else None)
    if not hook:
        raise ConfigError(
            "the SAE does not say which hookpoint it reads; pass a hookpoint "
            "such as --hookpoint blocks.15.hook_resid_post"
        )
    point = parse_hookpoint(hook)
    where = f"the SAE at {sae_name}" if sae_name else "the SAE"
    d_sae = sae.cfg.d_sae
    libraries = {id(lib): lib for lib in (policy.library if policy is not None else None, library) if lib is not None}
    for lib in libraries.values():  # a policy's library is usually the auditor's too: checked once
        user = f"policy {policy.name!r} uses " if policy is not None and lib is policy.library else ""
        fix = "pass the matching --sae or another --policy" if user else "pass the matching --sae or another --library"
        declared = lib.sae.d_sae
        if declared is not None and declared != d_sae:
            raise ConfigError(
                f"{user}{_library_label(lib)}, which describes an SAE with {declared} latents (sae.d_sae), but "
                f"{where} has {d_sae} latents: {fix}"
            )
        if not _same_hookpoint(lib.sae.hookpoint, point):
            source = "--hookpoint asks for" if hookpoint else f"{where} reads"
            raise ConfigError(
                f"{user}{_library_label(lib)}, which labels the latents of an SAE at {lib.sae.hookpoint}, but "
                f"{source} {point.name}, where those labels mean nothing: {fix} (or correct the library's "
                "sae.hookpoint if that is what is wrong)"
            )
        if model_name is not None and _model_key(lib.sae.model) != _model_key(model_name):
            _log.warning(
                "%s describes an SAE of model %s, but the model is %s; its feature names only mean something "
                "on that model: pass --model %s, or ignore this if both names are the same model",
                _library_label(lib), lib.sae.model, model_name, lib.sae.model,
            )
    if policy is not None:
        if policy.watched.numel() and int(policy.watched.max()) >= d_sae:
            top = int(policy.watched.max())
            name = policy.library.name_for_index(top)
            feature = f" ({name})" if name else ""
            raise ConfigError(
                f"policy {policy.name!r} watches latent {top}{feature} but {where} has {d_sae} latents; its "
                f"{_library_label(policy.library)} describes another SAE: pass the matching --sae or another --policy"
            )
        width = policy.compiled.d_in
        if width is not None and width != sae.cfg.d_in:
            probes = [leaf for leaf in policy.compiled.leaves if leaf.probe is not None and leaf.probe.inputs == "hookpoint"]
            files = sorted({leaf.probe_key or leaf.name for leaf in probes})
            raise ConfigError(
                f"policy {policy.name!r} has hookpoint probe {', '.join(files)} of width {width}, but {where} reads "
                f"{point.name} of width {sae.cfg.d_in} (the model's): use a probe trained on these activations, "
                "or the SAE and model it was trained for"
            )
    return hook


def _library_label(lib: FeatureLibrary) -> str:
    return f"feature library {lib.id!r} ({lib.path})" if lib.path is not None else f"feature library {lib.id!r}"


def _same_hookpoint(name: str, point: Hookpoint) -> bool:
    from auditor.models import parse_hookpoint

    try:
        return bool(parse_hookpoint(name) == point)
    except HookpointError:
        return False  # a library's hookpoint that is no hookpoint name matches none


def _model_key(name: str) -> str:
    """``HuggingFaceTB/SmolLM2-135M-Instruct`` and ``SmolLM2-135M-Instruct`` name one model."""
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def _default_library() -> FeatureLibrary:
    from auditor.features import load_library

    try:
        return load_library(DEFAULT_LIBRARY)
    except AuditorError as exc:
        raise ConfigError(
            f"no SAE given and the default feature library {DEFAULT_LIBRARY!r} could not be loaded "
            f"({exc.message}); pass --sae PATH (an SAE folder or file in any supported format) "
            "or --library PATH"
        ) from exc


__all__ += ["ROLE_PROMPT", "ROLE_COMPLETION", "ROLE_BOTH"]
