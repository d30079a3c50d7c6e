"""A policy evaluation's tensor program on the host: one C call (``_host.c``), or NumPy.

On a CPU the evaluation of one short text is a few dozen operations on arrays of a few thousand
numbers, so what each costs is the call, not the arithmetic: a torch operation's dispatch, output
tensor and bookkeeping took 5-10 us on the development VMs, a NumPy call 1-3 us; right after a
forward has swept the caches, every call costs several times that (a NumPy call 20-30 us, a torch
call 5-15 us on the AMD VM). For one 21-token text and the default policy the torch program was an
evaluation's largest part, and the evaluation 1.5% of the audit's forward at batch 1
(``benchmarks/audit_throughput.py``).

:class:`HostProgram` computes what :meth:`PolicyEngine._compute
<auditor.policy.engine.PolicyEngine._compute>` computes, float32 throughout, in fewer operations:
each scope's column maxima first (every ``max`` leaf and every max-pooled probe reads them),
per-token values only for the ``mean`` / ``count_above`` / ``fraction_above`` leaves, per-token
holds only when a ``for_tokens`` rule or an explanation asks. It runs as:

- its C twin (:class:`_NativeProgram`, ``_host.c``, built into the kernel library of
  :mod:`auditor.models.skinny`): the whole evaluation in one call, rows split over OpenMP threads
  for large batches, its results cut out of one buffer only when read (:class:`NativeRun`); for
  every batch size where that library builds (x86-64 with AVX2; ``AUDITOR_SKINNY_KERNEL=0`` turns
  it off). The default policy's evaluation of one short text took 0.26-0.30 ms, against 0.63 ms
  in NumPy (``benchmarks/audit_throughput.py``; ``benchmarks/RESULTS.md``, twentieth session);
- else NumPy, on views of the batch's tensors, for batches of up to :data:`MAX_ELEMENTS` feature
  values.

The engine picks it on a CPU (``PolicyEngine.host_program``); larger batches without the C twin,
hookpoint probes (their own torch modules), tensors that carry gradients and CUDA batches stay
with torch.

What can differ from the torch program: sums (``mean``, feature-probe logits) may add in another
order, and a probe's probability, ``1 / (1 + exp(-logit))`` here, differs from ``torch.sigmoid``'s
in the last bit for about one value in six, so a value within float rounding of its threshold may
decide differently (a probe leaf's per-token holds too), as in a CUDA graph's padded shapes;
maxima, counts, runs and the comparisons of the features and the reconstruction error are exact
(``tests/unit/policy/test_host_program.py`` compares the programs on random policies and inputs).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from auditor.policy.compile import NOT_SCORE_CAP, OP_ALL, OP_ANY

if TYPE_CHECKING:
    from auditor.policy.engine import PolicyEngine, _KnownHolds

MAX_ELEMENTS = 1 << 17
"""Largest batch (rows x tokens x watched latents) evaluated here: 32 texts of 54 tokens at the
default policy's 75 watched latents. On the 2-vCPU development VM NumPy was as fast or faster at
every size tried, warm, verdicts included: for the default policy 0.20 against 0.46 ms at one
28-token text, 1.3 against 1.9 ms at 32 x 27, 13.9 against 17.9 ms at 32 x 512; for a random
100-rule policy (331 leaves of up to 4 latents, 21 ``for_tokens`` rules, 273 latents) 8.7
against 12.7 ms per 1,000 tokens at 8 x 128 with one thread, and level with torch's two threads
from 16 x 128 up. Torch spreads a large batch over every core, which a server has more of than
that VM: past this size its program runs, unless the C twin can (it spreads rows over the cores
too)."""

_F32 = np.float32
_ONE = _F32(1.0)
_ZERO = _F32(0.0)
_CAP = _F32(NOT_SCORE_CAP)
_ONE_MINUS = np.nextafter(_ONE, _ZERO)  # the largest float32 below 1
_NEG_INF = _F32(-np.inf)


try:  # numpy >= 2: the floating-point error state is a context variable; set it to one made once
    from numpy._core.umath import _extobj_contextvar, _make_extobj

    _IGNORE = _make_extobj(all="ignore")

    def _ignore_fp_errors() -> Any:
        """What ``np.errstate(all="ignore")`` does on entry, without building the state anew: right
        after a forward, entering ``np.errstate`` (or any context manager made by ``contextlib``)
        cost ~20 us of a 0.3 ms evaluation. Returns what :func:`_restore_fp_errors` takes."""
        return _extobj_contextvar.set(_IGNORE)

    def _restore_fp_errors(token: Any) -> None:
        _extobj_contextvar.reset(token)

except ImportError:  # numpy 1.x: a per-thread state, set and put back

    def _ignore_fp_errors() -> Any:
        return np.seterr(all="ignore")

    def _restore_fp_errors(token: Any) -> None:
        np.seterr(**token)


def _consistent(score: np.ndarray, fired: np.ndarray) -> np.ndarray:
    """Scores nudged so ``score >= 1`` exactly where ``fired`` (rounding can disagree at the boundary)."""
    return np.where(fired, np.maximum(score, _ONE), np.minimum(score, _ONE_MINUS))


def _longest_run(x: np.ndarray) -> np.ndarray:
    """Longest run of True along axis 1 of ``x [B, T, R]`` -> ``[B, R]`` (int64)."""
    t = x.shape[1]
    pos = np.arange(t).reshape(1, t, 1)
    last_false = np.maximum.accumulate(np.where(x, -1, pos), axis=1)
    return np.where(x, pos - last_false, 0).max(axis=1)


class HostProgram:
    """One engine's evaluation program over NumPy arrays (see the module docstring)."""

    def __init__(self, engine: PolicyEngine) -> None:
        c = engine.compiled
        k = engine._tensors(torch.device("cpu"))
        n_leaves, width = (int(n) for n in c.leaf_columns.shape)
        self.n_leaves, self.width = n_leaves, width
        self.n_nodes, self.const_true = c.n_nodes, c.const_true
        self.needs_recon = c.needs_recon_error
        self.n_feat = int(c.watched.numel())
        n_direct = self.n_feat + int(c.needs_recon_error)  # columns of X: latents, recon
        fp = k["feature_probes"]
        n_units = int(fp["weight"].shape[1]) if fp is not None else 0
        # Each leaf's columns of V = [X | the feature probes' per-token probabilities], a group's
        # padding replaced by its own first column (the max is the same, no -inf column needed).
        cols = k["value_columns"].numpy().reshape(n_leaves, width).copy()
        pad = cols >= n_direct + n_units
        cols[pad] = np.broadcast_to(cols[:, :1], cols.shape)[pad]
        # Indices are group-major ([G, L] flat): a group's max is then G - 1 elementwise maxima of
        # contiguous [.., L] slices, where a reduction over a last axis of G (2-4) columns loops
        # once per leaf and token (10x slower for 331 leaves of 4 columns over 1,024 tokens).
        self.token_columns = cols.T.reshape(-1)  # [G * L]
        # Only the scopes the policy reads (every leaf and rule of the default policy reads "any":
        # its scope masks are the content mask itself), renumbered 0..S-1 in SCOPES order.
        pooled = fp["pooled_index"].numpy() if fp is not None else np.zeros(0, dtype=np.int64)
        units = max(n_units, 1)
        pool_part, pool_scope, pool_unit = pooled // (3 * units), pooled // units % 3, pooled % units  # [pool, 3, U] flat
        used = sorted({*k["leaf_scope"].tolist(), *k["rule_scope"].tolist(), *pool_scope.tolist()})
        self.scopes = tuple(used)
        compact = np.zeros(3, dtype=np.int64)
        compact[used] = np.arange(len(used))
        self.leaf_scope = scope = compact[k["leaf_scope"].numpy()]
        # Every leaf's max over its scope, read from the per-scope column maxima [B, S * C0] (a probe
        # leaf reads a column it then overwrites).
        direct = np.where(cols < n_direct, cols, 0)
        self.max_index = (scope[:, None] * n_direct + direct).T.reshape(-1)  # [G * L]
        self.leaf_above = k["leaf_above"].numpy()
        self.leaf_threshold = k["leaf_threshold"].numpy()
        self.leaf_positive = k["leaf_positive"].numpy()
        self.leaf_divisor = k["leaf_divisor"].numpy()
        self.leaf_counting = k["leaf_counting"].numpy()
        # Leaves aggregated from per-token values: mean, count_above, fraction_above.
        tl = np.flatnonzero(k["leaf_mean"].numpy() | self.leaf_counting)
        self.token_leaves = tl if tl.size else None
        self.tl_columns = cols[tl].T.reshape(-1)  # [G * Lt]
        self.tl_scope = scope[tl]
        self.tl_above = self.leaf_above[tl]
        self.tl_mean = k["leaf_mean"].numpy()[tl]
        self.tl_fraction = k["leaf_fraction"].numpy()[tl]
        self.has_mean, self.has_count, self.has_fraction = engine._has_mean, engine._has_count, engine._has_fraction
        self.all_positive = engine._all_positive
        self.scope_guard = engine._scope_guard
        self.node_tail = k["node_tail"].numpy()  # [1, N - L]
        # Children child-major ([c, n] flat), for the reason the leaf columns are group-major.
        self.groups = [(op, out.numpy(), children.shape[1], children.numpy().T.reshape(-1)) for op, out, children, _ in k["groups"]]
        self.rule_node = k["rule_node"].numpy()
        self.rule_scope = compact[k["rule_scope"].numpy()]
        ft = k["ft_rules"].numpy()
        self.ft_rules = ft if ft.size else None
        if self.ft_rules is not None:
            self.ft_node = self.rule_node[ft]
            self.ft_scope = self.rule_scope[ft]
            self.ft_need = k["rule_for_tokens"].numpy()[ft].astype(_F32)
            self.ft_need_int = k["rule_for_tokens"].numpy()[ft]
        exc_node, exc_rule = k["exc_node"].numpy(), k["exc_rule"].numpy()
        self.exc_node = exc_node if exc_node.size else None
        # Which rule each exception belongs to, one-hot [E, R]: an exception's firing excepts its rule.
        self.exc_onehot = np.zeros((exc_node.size, len(c.rules)), dtype=_F32)
        self.exc_onehot[np.arange(exc_node.size), exc_rule] = _ONE
        self.probes: dict[str, np.ndarray] | None = None
        if fp is not None:
            self.probes = {n: t.numpy() for n, t in fp.items()}
            self.probes.update(
                neg_weight=-self.probes["weight"],
                neg_bias=-self.probes["bias"],
                # Into the flattened [pool (mean, max), S, U] pooled logits.
                pooled_index=(pool_part * len(used) + compact[pool_scope]) * n_units + pool_unit,
            )
        self.probe_max_pool = engine._probe_max_pool
        self.probe_bound = engine._probe_bound
        self.native = True
        """Whether :meth:`run` calls the C twin of this program (``_host.c``) where it can: where
        the kernel library builds (``auditor.models.skinny``; the first evaluation on a machine
        where nothing has built it yet compiles it, seconds, then cached), for contiguous inputs.
        Off, or where it cannot, the NumPy program runs."""
        self._native: _NativeProgram | None = None  # None: not made yet, or it cannot run
        self._native_made = False

    def probe_input(self, feats: np.ndarray) -> np.ndarray:
        """The features as the feature probes read them: NaN as 0, beyond +-bound (+-inf included)
        as +-bound (a copy)."""
        return np.clip(np.nan_to_num(feats, nan=0.0), -self.probe_bound, self.probe_bound)

    def run(
        self,
        feats: torch.Tensor,
        mask: torch.Tensor,
        comp: torch.Tensor | None,
        prompt: torch.Tensor | None,
        recon: torch.Tensor | None,
        *,
        numpy: bool = True,
    ) -> tuple[Any, ...] | NativeRun | None:
        """The C twin's :class:`NativeRun` (:attr:`native`); else node scores ``[B, N]``, rule
        scores ``[B, R]``, leaf values and decisions ``[B, L]`` as NumPy arrays, and the per-token
        leaf holds (``[B, T, L]``, computed on first ``get()``); or, with ``numpy`` False (a batch
        past :data:`MAX_ELEMENTS`), None where the C twin cannot run."""
        if self.native:
            native = self._native if self._native_made else self._make_native()
            if native is not None:
                out = native.run(feats, mask, comp, prompt, recon)
                if out is not None:
                    return out
        if not numpy:
            return None
        token = _ignore_fp_errors()  # 1 / 0 in a `not`, exp overflowing in a sigmoid: inf, as in torch
        try:
            return self._run(
                feats.numpy(),
                mask.numpy(),
                None if comp is None else comp.numpy(),  # None: no roles, for a policy that reads none
                None if prompt is None else prompt.numpy(),
                None if recon is None else recon.numpy(),
            )
        finally:
            _restore_fp_errors(token)

    def _run(
        self,
        feats: np.ndarray,
        mask: np.ndarray,
        comp: np.ndarray | None,
        prompt: np.ndarray | None,
        recon: np.ndarray | None,
    ) -> tuple[Any, ...]:
        # As few calls as the policy allows: right after a forward has swept the caches (and the
        # TLB), each call costs several times its warm cost, 10-30 us here whatever its size.
        # Reductions are ufunc reductions (ndarray.max and .sum go through Python wrappers first).
        bsz, t, _ = feats.shape
        sm = self.scope_masks(mask, comp, prompt)  # [B, S, T]: the tokens each scope sees
        n_scope = np.add.reduce(sm, axis=2)  # [B, S]
        # X [B, T, C0]: the latents, then the reconstruction error when the policy reads it.
        x = np.concatenate([feats, recon[:, :, None]], axis=2) if self.needs_recon and recon is not None else feats

        # Each scope's column maxima [B, S, C0], then every leaf's max of its group's. (Reshapes
        # spell every size out: -1 is ambiguous for a batch of no rows.)
        colmax = np.maximum.reduce(np.where(sm[:, :, :, None], x[:, None], _NEG_INF), axis=2)
        value = colmax.reshape(bsz, len(self.scopes) * x.shape[2]).take(self.max_index, axis=1)  # [B, G * L]
        if self.width > 1:
            value = np.maximum.reduce(value.reshape(bsz, self.width, self.n_leaves), axis=1)
        one_scope = len(self.scopes) == 1
        n = n_scope if one_scope else n_scope.take(self.leaf_scope, axis=1)  # [B, L] ([B, 1] for one scope)

        tl = self.token_leaves
        if tl is not None:  # mean, count_above, fraction_above: from per-token values
            vt = x.take(self.tl_columns, axis=2)  # [B, T, G * Lt]
            if self.width > 1:
                vt = np.maximum.reduce(vt.reshape(bsz, t, self.width, tl.size), axis=2)
            lm = (sm if one_scope else sm.take(self.tl_scope, axis=1)).transpose(0, 2, 1)  # [B, T, Lt or 1]
            if self.has_mean or self.has_fraction:
                nf = np.maximum(n if one_scope else n.take(tl, axis=1), 1).astype(_F32)
            if self.has_count:
                agg = np.add.reduce(vt > self.tl_above, axis=1, dtype=_F32, where=lm)
                if self.has_fraction:
                    agg = np.where(self.tl_fraction, agg / nf, agg)
            if self.has_mean:
                mean = np.add.reduce(vt, axis=1, dtype=_F32, where=lm) / nf
                agg = np.where(self.tl_mean, mean, agg) if self.has_count else mean
            value[:, tl] = agg

        fp = self.probes
        if fp is not None:
            # What each probe pools, [B, pool (mean, max), S, F], then all their logits in one
            # product. The probes are linear: the logit of a scope's mean input is the mean of its
            # tokens' logits. A scope with no token divides 0 by 0 (mean) or has -inf (max): its
            # leaves are 0 below whatever their logits come to.
            n_feat = feats.shape[2]
            pool_in = np.empty((bsz, 2 if self.probe_max_pool else 1, len(self.scopes), n_feat), dtype=_F32)
            # Two reductions tell whether the probes read the features as they are: a NaN makes
            # both NaN (the comparisons false), and so does anything beyond the bound (an infinity,
            # or a huge finite value whose sum over a scope's tokens could overflow). A finite total
            # sum did not tell: 3e38 twice in scope and -3e38 twice out of it may sum to a finite
            # value, and the scope's sum was inf, x 0 = NaN in every probe.
            bound = self.probe_bound
            as_is = (
                np.maximum.reduce(feats, axis=None, initial=-bound) <= bound
                and np.minimum.reduce(feats, axis=None, initial=bound) >= -bound
            )
            # Else NaN or beyond +-bound among the features: as the probes read them (PolicyEngine._probe_input).
            pf = feats if as_is else self.probe_input(feats)
            np.divide(sm.astype(_F32) @ pf, n_scope[:, :, None], out=pool_in[:, 0])
            if self.probe_max_pool:
                pool_in[:, 1] = colmax[:, :, :n_feat] if as_is else (
                    np.maximum.reduce(np.where(sm[:, :, :, None], pf[:, None], _NEG_INF), axis=2))
            # Negated logits (weights and bias negated once; negation is exact): a probability is
            # 1 / (1 + exp(logit)), one operation fewer.
            logits = pool_in @ fp["neg_weight"] + fp["neg_bias"]  # [B, pool, S, U]
            pooled = logits.reshape(bsz, logits[0].size if bsz else 0).take(fp["pooled_index"], axis=1)
            value[:, fp["leaves"]] = _ONE / (_ONE + np.exp(pooled))

        # Leaf decisions; a NaN value (broken activations) counts as 0, as does a leaf with no token.
        value[(n == 0) | np.isnan(value)] = _ZERO
        thr = self.leaf_threshold
        if self.all_positive:
            fired = value >= thr
            score = value / thr  # >= 1 wherever fired (division rounds monotonically); 1 may also round up from below
            score = np.where(fired, score, np.minimum(score, _ONE_MINUS))
        else:
            fired = (value >= thr) & (n > 0)
            score = _consistent(np.where(self.leaf_positive, value / self.leaf_divisor, fired * _CAP), fired)
        # Holds not needed now are computed when an explanation is first read, maybe after the
        # caller has written its next batch into the same tensors (``x`` is the features without a
        # recon column, ``sm`` the content mask for a policy that reads only "any"): they keep
        # copies then, as the torch program's values are its own.
        if self.ft_rules is None:
            holds = _HostHolds(self, x.copy() if x is feats else x, sm.copy() if self.scopes == (0,) else sm)
        else:
            holds = _HostHolds(self, x, sm)

        # The node program.
        scores = np.empty((bsz, self.n_nodes), dtype=_F32)
        n_leaves = self.n_leaves
        scores[:, n_leaves:] = self.node_tail
        scores[:, :n_leaves] = score
        tok_nodes = None
        if self.ft_rules is not None:
            tok_nodes = np.zeros((bsz, t, self.n_nodes), dtype=bool)
            tok_nodes[:, :, :n_leaves] = holds.get()
            tok_nodes[:, :, self.const_true] = True
        for op, out, n_children, flat in self.groups:
            cs = scores.take(flat, axis=1).reshape(bsz, n_children, out.size)
            if op == OP_ALL:
                scores[:, out] = np.minimum.reduce(cs, axis=1)
            elif op == OP_ANY:
                scores[:, out] = np.maximum.reduce(cs, axis=1)
            else:
                child = cs[:, 0]
                inv = np.minimum(np.where(child > 0, _ONE / child, _CAP), _CAP)
                scores[:, out] = _consistent(inv, child < _ONE)
            if tok_nodes is not None:
                ct = tok_nodes.take(flat, axis=2).reshape(bsz, t, n_children, out.size)
                if op == OP_ALL:
                    tok_nodes[:, :, out] = np.logical_and.reduce(ct, axis=2)
                elif op == OP_ANY:
                    tok_nodes[:, :, out] = np.logical_or.reduce(ct, axis=2)
                else:
                    tok_nodes[:, :, out] = ~ct[:, :, 0]

        # Rule scores.
        rscore = scores.take(self.rule_node, axis=1)  # [B, R]
        if tok_nodes is not None:
            held = tok_nodes.take(self.ft_node, axis=2) & sm.take(self.ft_scope, axis=1).transpose(0, 2, 1)
            run = _longest_run(held)
            run_score = _consistent(run.astype(_F32) / self.ft_need, run >= self.ft_need_int)
            rscore[:, self.ft_rules] = np.minimum(rscore[:, self.ft_rules], run_score)
        if self.scope_guard:
            rscore[n_scope.take(self.rule_scope, axis=1) == 0] = _ZERO
        return scores, rscore, value, fired, holds

    def _make_native(self) -> _NativeProgram | None:
        """The C twin of this program, made on first use (None where it cannot run)."""
        from auditor.models import skinny

        lib = skinny.library()
        native = None
        direct = self.n_feat + int(self.needs_recon)  # X's columns: what a token leaf reads
        if lib is not None and bool((self.tl_columns < direct).all()):
            native = _NativeProgram(self, lib.policy_eval)
        self._native, self._native_made = native, True
        return native

    def scope_masks(self, mask: np.ndarray, comp: np.ndarray | None, prompt: np.ndarray | None) -> np.ndarray:
        """``[B, S, T]`` the tokens each scope the policy reads sees (a view of ``mask`` for "any" alone)."""
        if self.scopes == (0,):  # "any" alone: the content mask
            return mask[:, None]
        bsz, t = mask.shape
        sm = np.empty((bsz, len(self.scopes), t), dtype=bool)
        for i, scope in enumerate(self.scopes):
            if scope == 0:
                sm[:, i] = mask
            else:
                np.logical_and(mask, prompt if scope == 1 else comp, out=sm[:, i])
        return sm

    def host_rows(self, nodes: np.ndarray, rscore: np.ndarray) -> np.ndarray:
        """What every verdict needs, ``[B, R + E]``: the rule scores, then each exception's node score."""
        if self.exc_node is None:
            return rscore
        return np.concatenate([rscore, nodes.take(self.exc_node, axis=1)], axis=1)

    def matched(self, nodes: np.ndarray, rscore: np.ndarray) -> np.ndarray:
        """Which rules matched, ``[B, R]`` bool: fired and no exception's node fired."""
        rfired = rscore >= _ONE
        if self.exc_node is None:
            return rfired
        exc_fired = (nodes.take(self.exc_node, axis=1) >= _ONE).astype(_F32)  # [B, E]
        return rfired & ~((exc_fired @ self.exc_onehot) > _ZERO)


class _HostHolds:
    """Where each leaf held, per token (``[B, T, L]`` bool), computed on first :meth:`get`: only
    ``for_tokens`` rules and explanations need it. From ``x`` (the features, then the
    reconstruction error when the policy reads it) and ``sm`` (:meth:`HostProgram.scope_masks`),
    or from the program's input tensors (``inputs``: features, mask, completion, prompt, recon)."""

    def __init__(self, program: HostProgram, x: np.ndarray | None, sm: np.ndarray | None, inputs: tuple[Any, ...] = ()) -> None:
        self._args: tuple[Any, ...] | None = (program, x, sm, inputs)
        self._tok: np.ndarray | None = None

    def get(self) -> np.ndarray:
        if self._tok is None:
            assert self._args is not None
            p, x, sm, inputs = self._args
            if x is None:
                feats, mask, comp, prompt, recon = (None if a is None else a.numpy() for a in inputs)
                x = np.concatenate([feats, recon[:, :, None]], axis=2) if p.needs_recon and recon is not None else feats
                sm = p.scope_masks(mask, comp, prompt)
            bsz, t, _ = x.shape
            v = x
            if p.probes is not None:  # each feature probe's per-token probability, after X's columns
                with np.errstate(all="ignore"):  # broken activations: NaN, inf, as in torch
                    logit = p.probe_input(x[:, :, : p.n_feat]) @ p.probes["neg_weight"] + p.probes["neg_bias"]  # negated
                    v = np.concatenate([x, _ONE / (_ONE + np.exp(logit))], axis=2)
            vals = v.take(p.token_columns, axis=2)  # [B, T, G * L]
            if p.width > 1:
                vals = np.maximum.reduce(vals.reshape(bsz, t, p.width, p.n_leaves), axis=2)
            # count_above / fraction_above leaves hold where v > above; the others where v >= threshold.
            tok = np.where(p.leaf_counting, vals > p.leaf_above, vals >= p.leaf_threshold)
            tok &= sm.take(p.leaf_scope, axis=1).transpose(0, 2, 1)
            self._tok, self._args = tok, None
        return self._tok


class _ProgramStruct(ctypes.Structure):
    """``auditor_policy`` in ``_host.c``, field for field."""

    _fields_ = [
        *[(n, ctypes.c_int64) for n in ("n_feat", "recon", "n_scopes")],
        ("scopes", ctypes.c_void_p),
        *[(n, ctypes.c_int64) for n in ("n_leaves", "width")],
        *[(n, ctypes.c_void_p) for n in ("max_index", "leaf_scope", "threshold", "divisor", "positive")],
        *[(n, ctypes.c_int64) for n in ("all_positive", "n_tl")],
        *[(n, ctypes.c_void_p) for n in ("tl", "tl_columns", "tl_scope", "tl_kind", "tl_above")],
        *[(n, ctypes.c_int64) for n in ("n_probe", "n_units", "n_pools")],
        *[(n, ctypes.c_void_p) for n in ("probe_leaves", "pooled_index", "neg_weight", "neg_bias")],
        *[(n, ctypes.c_float) for n in ("bound", "not_cap", "one_minus")],
        ("n_nodes", ctypes.c_int64),
        ("node_tail", ctypes.c_void_p),
        ("n_groups", ctypes.c_int64),
        *[(n, ctypes.c_void_p) for n in ("group_op", "group_outs", "group_children", "outs", "children")],
        ("n_rules", ctypes.c_int64),
        *[(n, ctypes.c_void_p) for n in ("rule_node", "rule_scope")],
        *[(n, ctypes.c_int64) for n in ("scope_guard", "n_exc")],
        ("exc_node", ctypes.c_void_p),
        *[(n, ctypes.c_int64) for n in ("n_ft", "const_true")],
        *[(n, ctypes.c_void_p) for n in ("ft_rules", "ft_node", "ft_scope", "ft_need", "token_columns", "counting", "leaf_above")],
    ]


_TL_MEAN, _TL_COUNT, _TL_FRACTION = 0, 1, 2


class _NativeProgram:
    """A :class:`HostProgram` as ``_host.c``'s ``auditor_policy``, and its call. Gives what the
    NumPy program gives but for the order of sums (a mean, a feature probe's pooled input and
    logit) and ``exp`` in a probe's probability (the C library's ``expf``, NumPy's own): values
    within float rounding, as between the NumPy and torch programs."""

    def __init__(self, p: HostProgram, fn: Any) -> None:
        def i64(a: Any) -> np.ndarray:
            return np.ascontiguousarray(a, dtype=np.int64).reshape(-1)

        def f32(a: Any) -> np.ndarray:
            return np.ascontiguousarray(a, dtype=_F32).reshape(-1)

        tl = p.token_leaves if p.token_leaves is not None else np.zeros(0, dtype=np.int64)
        kind = np.where(p.tl_mean, _TL_MEAN, np.where(p.tl_fraction, _TL_FRACTION, _TL_COUNT))
        fp = p.probes
        groups = p.groups
        arrays = {
            "scopes": i64(p.scopes),
            "max_index": i64(p.max_index),
            "leaf_scope": i64(p.leaf_scope),
            "threshold": f32(p.leaf_threshold),
            "divisor": f32(p.leaf_divisor),
            "positive": np.ascontiguousarray(p.leaf_positive, dtype=np.uint8),
            "tl": i64(tl),
            "tl_columns": i64(p.tl_columns),
            "tl_scope": i64(p.tl_scope),
            "tl_kind": i64(kind),
            "tl_above": f32(p.tl_above),
            "probe_leaves": i64(fp["leaves"] if fp is not None else []),
            "pooled_index": i64(fp["pooled_index"] if fp is not None else []),
            "neg_weight": f32(fp["neg_weight"] if fp is not None else []),
            "neg_bias": f32(fp["neg_bias"] if fp is not None else []),
            "node_tail": f32(p.node_tail),
            "group_op": i64([g[0] for g in groups]),
            "group_outs": i64([g[1].size for g in groups]),
            "group_children": i64([g[2] for g in groups]),
            "outs": i64(np.concatenate([g[1].reshape(-1) for g in groups]) if groups else []),
            "children": i64(np.concatenate([g[3] for g in groups]) if groups else []),
            "rule_node": i64(p.rule_node),
            "rule_scope": i64(p.rule_scope),
            "exc_node": i64(p.exc_node if p.exc_node is not None else []),
            "ft_rules": i64(p.ft_rules if p.ft_rules is not None else []),
            "ft_node": i64(p.ft_node if p.ft_rules is not None else []),
            "ft_scope": i64(p.ft_scope if p.ft_rules is not None else []),
            "ft_need": i64(p.ft_need_int if p.ft_rules is not None else []),
            "token_columns": i64(p.token_columns),
            "counting": np.ascontiguousarray(p.leaf_counting, dtype=np.uint8),
            "leaf_above": f32(p.leaf_above),
        }
        self._arrays = arrays  # the struct points into them
        n_units = int(fp["neg_weight"].shape[1]) if fp is not None else 0
        self.n_rules, self.n_exc = int(arrays["rule_node"].size), int(arrays["exc_node"].size)
        self.n_nodes, self.n_leaves = p.n_nodes, p.n_leaves
        self.stride = self.n_rules + self.n_exc + self.n_nodes + 2 * self.n_leaves  # a row of auditor_policy_eval's out
        self.for_tokens = p.ft_rules is not None  # the per-token holds are computed, not copies of the inputs kept
        self._struct = _ProgramStruct(
            n_feat=p.n_feat, recon=int(p.needs_recon), n_scopes=len(p.scopes),
            n_leaves=p.n_leaves, width=p.width, all_positive=int(p.all_positive), n_tl=int(tl.size),
            n_probe=int(arrays["probe_leaves"].size), n_units=n_units, n_pools=2 if p.probe_max_pool else 1,
            bound=p.probe_bound, not_cap=float(_CAP), one_minus=float(_ONE_MINUS),
            n_nodes=p.n_nodes, n_groups=len(groups), n_rules=self.n_rules, scope_guard=int(p.scope_guard),
            n_exc=self.n_exc, n_ft=int(arrays["ft_rules"].size), const_true=p.const_true,
            **{name: a.ctypes.data for name, a in arrays.items()},
        )
        self._ref = ctypes.byref(self._struct)
        self._fn = fn
        self._program = p

    def run(
        self,
        feats: torch.Tensor,
        mask: torch.Tensor,
        comp: torch.Tensor | None,
        prompt: torch.Tensor | None,
        recon: torch.Tensor | None,
    ) -> NativeRun | None:
        """:meth:`HostProgram.run`'s results, or None where the C call cannot run (the NumPy
        program then does).

        As few calls as can be around the C call: right after a forward, any call whose code has
        left the caches costs 5-30 us here (a NumPy call, a torch slice, a dtype view alike), more
        than the evaluation itself. So one buffer takes everything, the inputs' copies for the
        per-token holds included, and its parts are cut out only when read (:class:`NativeRun`)."""
        if not self._program.needs_recon:
            recon = None  # not read (nor checked by the engine): not passed, not copied
        if not (feats.is_contiguous() and mask.is_contiguous() and (comp is None or comp.is_contiguous())
                and (prompt is None or prompt.is_contiguous()) and (recon is None or recon.is_contiguous())):
            return None
        bsz, t, f = feats.shape
        stride = self.stride
        if self.for_tokens:
            after = (bsz * t * self.n_leaves + 3) // 4  # the holds' bytes
        else:
            n_bytes = bsz * t * ((comp is not None) + (prompt is not None) + 1)
            after = bsz * t * (f + (recon is not None)) + (n_bytes + 3) // 4  # the inputs' copies
        out = torch.empty(bsz * stride + after, dtype=torch.float32, device="cpu")
        if self._fn(
            self._ref, feats.data_ptr(), mask.data_ptr(), comp.data_ptr() if comp is not None else None,
            prompt.data_ptr() if prompt is not None else None, recon.data_ptr() if recon is not None else None,
            bsz, t, out.data_ptr(), torch.get_num_threads(),
        ):
            return None
        return NativeRun(self, out, (bsz, t, f), recon is not None, comp is not None, prompt is not None)


class NativeRun:
    """What :class:`_NativeProgram` computed, in :class:`~auditor.policy.engine._RuleTensors`'
    names: ``rows`` (``[B, R + E + ...]``: the rule scores, then each exception's node score, then
    more columns that a verdict does not read) as it is, every other part cut out of the buffer
    as CPU tensors on first read."""

    def __init__(self, native: _NativeProgram, out: torch.Tensor, shape: tuple[int, int, int],
                 has_recon: bool, has_comp: bool, has_prompt: bool) -> None:
        self._native, self._out, self._shape = native, out, shape
        self._given = (has_recon, has_comp, has_prompt)
        bsz = shape[0]
        rows = out[: bsz * native.stride].view(bsz, native.stride)
        self._all = rows
        # A verdict reads the first R + E columns of its row; the rest converted by ``tolist`` as
        # well costs less than a slice right after a forward, unless there is much of it.
        extra = bsz * (native.stride - native.n_rules - native.n_exc)
        self.rows = rows if extra <= 4096 else rows[:, : native.n_rules + native.n_exc]
        self._holds: _HostHolds | _KnownHolds | None = None

    def _part(self, start: int, width: int) -> torch.Tensor:
        return self._all[:, start : start + width]

    @property
    def score(self) -> torch.Tensor:
        return self._part(0, self._native.n_rules)

    @property
    def nodes(self) -> torch.Tensor:
        return self._part(self._native.n_rules + self._native.n_exc, self._native.n_nodes)

    @property
    def leaf_value(self) -> torch.Tensor:
        n = self._native
        return self._part(n.n_rules + n.n_exc + n.n_nodes, n.n_leaves)

    @property
    def leaf_fired(self) -> torch.Tensor:
        n = self._native
        return self._part(n.n_rules + n.n_exc + n.n_nodes + n.n_leaves, n.n_leaves) > 0

    @property
    def holds(self) -> _HostHolds | _KnownHolds:
        if self._holds is None:
            from auditor.policy.engine import _KnownHolds

            bsz, t, f = self._shape
            has_recon, has_comp, has_prompt = self._given
            at = bsz * self._native.stride
            if self._native.for_tokens:
                n_leaves = self._native.n_leaves
                held = self._out[at:].view(torch.uint8)[: bsz * t * n_leaves].view(torch.bool).view(bsz, t, n_leaves)
                self._holds = _KnownHolds(held)
                return self._holds
            feats = self._out[at : at + bsz * t * f].view(bsz, t, f)
            at += bsz * t * f
            recon = None
            if has_recon:
                recon = self._out[at : at + bsz * t].view(bsz, t)
                at += bsz * t
            k = 1 + has_comp + has_prompt
            masks = self._out[at:].view(torch.uint8)[: k * bsz * t].view(torch.bool)
            parts = iter(masks.view(k, bsz, t))
            mask = next(parts)
            comp = next(parts) if has_comp else None
            prompt = next(parts) if has_prompt else None
            # The holds of the program's input tensors (these copies, the holds' own).
            self._holds = _HostHolds(self._native._program, None, None, (feats, mask, comp, prompt, recon))
        return self._holds


class HostRows:
    """The host program's verdict numbers in :class:`~auditor._cuda.HostCopy`'s shape: already on
    the host (no tensor wrapped around them, no copy to wait for)."""

    ready = None

    def __init__(self, rows: np.ndarray | torch.Tensor) -> None:
        self._rows = rows

    def get(self) -> np.ndarray | torch.Tensor:
        return self._rows
