"""The hook shared by :func:`~auditor.steering.generate` and :func:`~auditor.steering.attach`.

At the SAE hookpoint, every forward pass (prefill or one cached decode step):

1. encodes the incoming activation once, for the latents that are steered, traced
   or watched by the policy (``[B, T, U]``);
2. appends those features to each row's history;
3. when the policy has rules with ``steer`` actions, evaluates those rules (only
   they can change the forward; the verdict is :meth:`SteeringHook.evaluate`, on
   demand) on each row's history and switches on the interventions of every rule
   that matched, for that row and for the rest of the sequence, including the
   positions of this forward pass (so the next token is already computed from
   steered activations). The decision stays on the model's device: nothing is
   copied to the host while decoding, so on a GPU the hook never waits for the
   device and the queue of kernels stays full; :attr:`SteeringHook.triggers` reads
   the recorded decisions back once, when asked;
4. writes back the steered activation (the reconstruction error kept).

On a CUDA device, a one-token decode step runs as one CUDA graph: the hook copies
the activation in, replays the captured encode-record-steer kernels (the history
position advances on the device) and hands back a copy of the result. Decoding is
bound by the host launching kernels, and the graph turns a dozen launches and the
Python around them into three (:class:`_StepGraph`). With
:attr:`SteeringHook.graph_policy_steps` (on by default) the graph also covers the
incremental decision of the rules that steer (the matcher's state is updated in
place) and the reconstruction error; the positions' masks are then copied in too.
Steps that keep the residual (hookpoint probes), steering rules without the
incremental matcher, prefill and multi-token chunks stay eager. A graph is captured
on the first such step and again when the history outgrows its buffers, a new batch
starts or the slots' switches are replaced; a capture that fails leaves the hook eager.

The caller tells the hook, before each forward, which of the new positions are
content and which are completion tokens (:meth:`SteeringHook.set_positions`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from auditor._cuda import capture_cuda_graph
from auditor.policy.engine import AuditBatch
from auditor.steering.interventions import ResolvedIntervention, Steerer, SteeringLimits, resolve_interventions

if TYPE_CHECKING:
    from auditor.features import FeatureLibrary
    from auditor.models import Hookpoint
    from auditor.policy import PolicyEngine, Verdict
    from auditor.sae import SAE

__all__ = ["SteeringHook", "Trigger", "policy_slots"]


@dataclass
class Trigger:
    """A policy rule switched steering on."""

    rule_id: str
    row: int
    """Batch row (0 for :func:`generate`'s steered completion)."""
    token: int
    """Completion tokens that preceded the firing position (0: it fired on the prompt).
    The intervention applies from that position on."""
    interventions: list[str]
    """The switched-on interventions, ``feature=mode:value@positions``."""


def policy_slots(
    engine: PolicyEngine, library: FeatureLibrary | None, d_sae: int, limits: SteeringLimits | None
) -> list[ResolvedIntervention]:
    """One slot per ``steer`` action of every enabled rule, checked against ``limits``."""
    out: list[ResolvedIntervention] = []
    for rule in engine.compiled.rules:
        if not rule.steering:
            continue
        specs = [{"feature": st.index, "mode": st.mode, "value": st.value} for st in rule.steering]
        for slot, st in zip(
            resolve_interventions(specs, library=library, d_sae=d_sae, limits=limits, source=f"rule:{rule.id}"),
            rule.steering,
        ):
            out.append(
                ResolvedIntervention(slot.index, slot.mode, slot.value, slot.positions, st.feature, slot.source)
            )
    return out


class SteeringHook:
    """Measure, evaluate the policy, steer; see the module docstring.

    ``user`` slots are switched on for the rows in ``user_rows`` at every
    :meth:`reset`; ``engine``'s steer slots start off and are switched on per row
    when their rule matches. ``trace`` adds latents to measure without steering.
    ``cuda_graph`` (default :attr:`cuda_graphs`) replays one-token decode steps on a CUDA device
    as one captured graph.
    """

    cuda_graphs: bool = True
    """The default of ``cuda_graph`` for new hooks (:func:`~auditor.steering.generate` makes its own)."""
    graph_policy_steps: bool = True
    """Also replay one-token steps that evaluate steering rules (with the incremental matcher) or
    compute the reconstruction error (False: those steps run eagerly)."""
    graph_device: str = "cuda"
    """The device type whose one-token steps are captured (with :meth:`record_step`)."""

    @staticmethod
    def record_step(step: Callable[[], None], device: torch.device) -> Callable[[], None] | None:
        """Capture ``step`` (which reads and writes only static tensors) and return what replays it;
        None when it cannot be captured. The CUDA graph capture; see :func:`auditor._cuda.capture_cuda_graph`."""
        return capture_cuda_graph(step, device, "steering hook: the decode step")

    def __init__(
        self,
        sae: SAE,
        user: list[ResolvedIntervention],
        *,
        engine: PolicyEngine | None = None,
        library: FeatureLibrary | None = None,
        limits: SteeringLimits | None = None,
        trace: list[int] | tuple[int, ...] = (),
        policy_every: int = 1,
        policy_steering: bool = True,
        cuda_graph: bool | None = None,
    ) -> None:
        self.sae = sae
        self.cuda_graph = type(self).cuda_graphs if cuda_graph is None else cuda_graph
        """Run one-token decode steps as a CUDA graph on a CUDA device (see the module docstring)."""
        self.graph_steps = 0
        """Decode steps run by replaying a captured graph (over the hook's life)."""
        self.graph_captures = 0
        self.graph_capture_s = 0.0
        """Graphs captured and the host seconds the captures took, warm-up steps included (over the hook's life)."""
        self._graphs: dict[bool, _StepGraph] = {}  # by whether the step decides the steering rules
        self.engine = engine
        self.user = list(user)
        self.rule_slots = policy_slots(engine, library, sae.cfg.d_sae, limits) if engine is not None and policy_steering else []
        watched = [int(i) for i in engine.watched.tolist()] if engine is not None else []
        self.steerer = Steerer(sae, self.user + self.rule_slots, extra=[*trace, *watched])
        col = {v: c for c, v in enumerate(self.steerer.latents.tolist())}

        def columns(e: PolicyEngine | None) -> Tensor:
            """Columns of the measured features that engine ``e`` watches, in its order."""
            lats = e.watched.tolist() if e is not None else []
            return torch.tensor([col[int(w)] for w in lats], dtype=torch.long, device=self.steerer.latents.device)

        self.watch_cols = columns(engine)
        # While decoding only rules that steer can change anything: evaluate just those.
        self.trigger_engine = engine.steering_engine if engine is not None and self.rule_slots else None
        self.trigger_cols = columns(self.trigger_engine)
        # [R, S]: the slots each steering rule switches on (rule order of trigger_engine.compiled.rules).
        trigger_ids = [r.id for r in self.trigger_engine.compiled.rules] if self.trigger_engine is not None else []
        self._rule_slot_map = torch.tensor(
            [[i >= self.n_user and slot.source == f"rule:{rid}" for i, slot in enumerate(self.steerer.slots)] for rid in trigger_ids],
            dtype=torch.bool,
            device=self.steerer.latents.device,
        ).view(len(trigger_ids), len(self.steerer.slots))
        self._trigger_ids = trigger_ids
        self.policy_every = max(1, int(policy_every))
        self.need_recon = engine is not None and engine.needs_recon_error
        self.need_resid = engine is not None and engine.needs_resid
        self.reset(1, torch.ones(1, dtype=torch.bool))

    # ------------------------------------------------------------------ state

    @property
    def n_user(self) -> int:
        return len(self.user)

    def reset(self, batch_size: int, user_rows: Tensor, policy_rows: Tensor | None = None) -> None:
        """Start new sequences: empty histories, user slots on for ``user_rows [B]``, rule slots off.

        Policy steering may switch on only in ``policy_rows [B]`` (default: every row).
        """
        dev = self.steerer.latents.device
        self.policy_rows = (
            torch.ones(batch_size, dtype=torch.bool, device=dev) if policy_rows is None else policy_rows.to(dev, torch.bool)
        )
        s = len(self.steerer.slots)
        self.enabled = torch.zeros(batch_size, s, dtype=torch.bool, device=dev)
        self.enabled[:, : self.n_user] = user_rows.to(dev).view(-1, 1)
        self.verdicts: list[Verdict] | None = None
        self._feats = _Growing()  # [B, T, U], before steering
        self._steered = _Growing()  # [B, T, U], after steering
        # Position masks stay where the caller made them (the host, normally): recording them
        # costs no device work; they cross to the device only when a policy reads them.
        self._mask = _Growing()  # [B, T] content
        self._comp = _Growing()  # [B, T] completion
        self._recon = _Growing()  # [B, T]
        self._resid = _Growing()  # [B, T, d_in]
        self._tokens: list[list[str]] | None = None
        self._pending: tuple[Tensor, Tensor] | None = None
        self._steps = 0
        # Steering rules are decided on each chunk as it comes, from running aggregates (the cost per
        # token does not grow with the sequence); hookpoint-probe policies re-evaluate the history.
        self._matcher = self.trigger_engine.incremental(batch_size, dev) if self.trigger_engine is not None else None
        self._rule_hist = _Growing()  # [B, E, R] rules matched at each trigger evaluation (policy rows only)
        self._eval_starts: list[int] = []  # positions recorded before the forward of each trigger evaluation
        self._triggers: list[Trigger] | None = None
        self._graphs = {}  # they wrote into the buffers just dropped

    def set_positions(self, mask: Tensor, is_completion: Tensor) -> None:
        """Describe the positions of the next forward: ``mask``/``is_completion`` are ``[B, T]`` bool."""
        self._pending = (mask.to(torch.bool), is_completion.to(torch.bool))

    @property
    def triggers(self) -> list[Trigger]:
        """Each rule that switched steering on, per row, in the order they fired (read back on demand)."""
        if self._triggers is None:
            self._triggers = self._read_triggers()
        return self._triggers

    @property
    def fired(self) -> list[set[str]]:
        """Per row, the ids of the rules that switched steering on."""
        out: list[set[str]] = [set() for _ in range(self.enabled.shape[0])]
        for t in self.triggers:
            out[t.row].add(t.rule_id)
        return out

    def _read_triggers(self) -> list[Trigger]:
        if not self._rule_hist:
            return []
        hist = self._rule_hist.view()  # [B, E, R]
        first = hist & (hist.cumsum(1) == 1)  # the evaluation at which each rule first matched
        hits = torch.nonzero(first).tolist()  # (row, evaluation, rule)
        # Completion content tokens recorded before each evaluation's forward, per row: [B, E].
        done = (self._mask.view() & self._comp.view()).cpu().long().cumsum(1)
        done = torch.cat([done.new_zeros(done.shape[0], 1), done], dim=1)
        n_comp = done[:, self._eval_starts]
        slot_map = self._rule_slot_map.cpu()
        out = []
        for row, e, r in sorted(hits, key=lambda h: (h[1], h[0], h[2])):
            slots = torch.nonzero(slot_map[r]).flatten().tolist()
            out.append(
                Trigger(
                    rule_id=self._trigger_ids[r],
                    row=row,
                    token=int(n_comp[row, e]),
                    interventions=[_describe(self.steerer.slots[i]) for i in slots],
                )
            )
        return out

    def history(self) -> dict[str, Tensor]:
        """Everything recorded so far, concatenated over positions (on the device of the features)."""
        feats = self._feats.view()
        dev = feats.device
        out = {
            "features": feats,  # [B, T, U]
            "mask": self._mask.view().to(dev, non_blocking=True),  # [B, T]
            "is_completion": self._comp.view().to(dev, non_blocking=True),  # [B, T]
        }
        if self._steered:
            out["steered"] = self._steered.view()  # [B, T', U] (T' = T after the forward)
        if self._recon:
            out["recon"] = self._recon.view()
        if self._resid:
            out["resid"] = self._resid.view()
        return out

    def evaluate(self) -> list[Verdict] | None:
        """The policy's verdict per row on everything recorded so far (None without a policy)."""
        if self.engine is None or not self._feats:
            return None
        self.verdicts = self._evaluate(self.engine, self.watch_cols)
        return self.verdicts

    def _evaluate(self, engine: PolicyEngine, cols: Tensor) -> list[Verdict]:
        return engine.evaluate(self._history_batch(engine, cols))

    def _history_batch(self, engine: PolicyEngine, cols: Tensor) -> AuditBatch:
        """Everything recorded so far as ``engine``'s input (``cols``: its watched latents' columns)."""
        h = self.history()
        return _batch(engine, cols, h["features"], h["mask"], h["is_completion"], h.get("recon"), h.get("resid"))

    # ------------------------------------------------------------------ the hook

    def __call__(self, tensor: Tensor, *, hook: Hookpoint) -> Tensor:
        b, t, d = tensor.shape
        if t == 1 and tensor.device.type == self.graph_device and self._graph_ok(b):
            out = self._graph_step(tensor)
            if out is not None:
                return out
        x = tensor.reshape(b * t, d)
        f, state, recon = self.steerer.measure_with_error(x, recon_error=self.need_recon)  # [B*T, U], [B*T]
        mask, comp = self._take_positions(b, t)
        if b != self.enabled.shape[0]:
            self.reset(b, torch.ones(b, dtype=torch.bool) if self.user else torch.zeros(b, dtype=torch.bool))
        start = len(self._mask)
        self._feats.append(f.view(b, t, -1))
        self._mask.append(mask)
        self._comp.append(comp)
        if recon is not None:
            self._recon.append(recon.view(b, t))
        if self.need_resid:
            self._resid.append(tensor.detach().float())
        if self.trigger_engine is not None:
            self._fire(start, f.view(b, t, -1), mask, comp, recon, decide=self._steps % self.policy_every == 0)
        self._steps += 1
        enabled = self.enabled.unsqueeze(1).expand(b, t, -1).reshape(b * t, -1)  # [B*T, S]
        new_x, steered = self.steerer.steer(x, f, state, enabled)
        self._steered.append(steered.view(b, t, -1))
        return new_x.view_as(tensor)

    def _take_positions(self, b: int, t: int) -> tuple[Tensor, Tensor]:
        """The masks :meth:`set_positions` gave for this ``[B, T]`` forward (used up here); positions
        nobody described count as completion content."""
        pending, self._pending = self._pending, None
        if pending is not None and tuple(pending[0].shape) == (b, t):
            return pending
        return torch.ones(b, t, dtype=torch.bool), torch.ones(b, t, dtype=torch.bool)

    # ------------------------------------------------------------------ the CUDA graph step

    def _graph_ok(self, b: int) -> bool:
        """Whether a one-token step of batch ``b`` is one a graph replays: measure, record, steer and
        (with :attr:`graph_policy_steps`) the incremental steering decision and reconstruction error."""
        if not self.cuda_graph or self.need_resid or b != self.enabled.shape[0]:
            return False
        if self.trigger_engine is None and not self.need_recon:
            return True
        return self.graph_policy_steps and (self.trigger_engine is None or self._matcher is not None)

    def _graph_step(self, tensor: Tensor) -> Tensor | None:
        """One decode step by graph replay (capturing first if needed); None: run it eagerly."""
        n, n_eval = len(self._feats), len(self._rule_hist)
        rules = self.trigger_engine is not None
        decide = not rules or self._steps % self.policy_every == 0
        g = self._graphs.get(decide)
        if g is None or not g.fits(self, tensor, n, n_eval):
            self._graphs.pop(decide, None)
            t0 = time.perf_counter()
            g = _StepGraph.capture(self, tensor, decide=decide)
            self.graph_capture_s += time.perf_counter() - t0
            self.graph_captures += g is not None
            if g is None:
                self.cuda_graph = False  # this model/SAE/policy cannot be captured: stay eager
                return None
            self._graphs[decide] = g
        mask, comp = self._take_positions(tensor.shape[0], 1)
        start = len(self._mask)
        out = g.run(tensor, n, n_eval, mask, comp)
        self._feats.advance(1)
        self._steered.advance(1)
        if self.need_recon:
            self._recon.advance(1)
        self._mask.append(mask)
        self._comp.append(comp)
        if rules and decide:
            self._rule_hist.advance(1)
            self._decided(start)
        self._steps += 1
        self.graph_steps += 1
        return out

    def _fire(self, start: int, f: Tensor, mask: Tensor, comp: Tensor, recon: Tensor | None, *, decide: bool) -> None:
        """Evaluate the steering rules on the history; switch on the slots of every rule that matched.

        ``f``, ``mask``, ``comp``, ``recon`` are this forward's new positions. All on the device:
        the decision is recorded (for :attr:`triggers`) and or-ed into ``enabled``; a rule that
        matched before keeps its slots on, so it fires once per row. ``decide=False`` (between
        ``policy_every`` steps) only records the new positions.
        """
        matched = self._decide(f, mask, comp, recon, decide=decide)
        if matched is not None:
            self._rule_hist.append(matched.unsqueeze(1))
            self._decided(start)

    def _decide(self, f: Tensor, mask: Tensor, comp: Tensor, recon: Tensor | None, *, decide: bool) -> Tensor | None:
        """:meth:`_fire`'s device part: the rules matched ``[B, R]`` (policy rows only), their slots
        switched on; None when not deciding. With the incremental matcher, nothing here reads or
        writes host state (a graph step runs it)."""
        engine = self.trigger_engine
        assert engine is not None
        if self._matcher is not None:
            b, t = f.shape[:2]
            chunk = _batch(engine, self.trigger_cols, f, mask, comp, recon.view(b, t) if recon is not None else None, None)
            matched = self._matcher.update(chunk, decide=decide)
        elif decide:
            matched = engine.matched(self._history_batch(engine, self.trigger_cols))
        if not decide:
            return None
        matched = matched & self.policy_rows.unsqueeze(1)  # [B, R]
        self.enabled |= (matched.unsqueeze(2) & self._rule_slot_map.unsqueeze(0)).any(1)  # [B, S]
        return matched

    def _decided(self, start: int) -> None:
        """Host bookkeeping of one recorded decision (``start``: positions recorded before its forward)."""
        self._eval_starts.append(start)
        self._triggers = None


def _batch(
    engine: PolicyEngine, cols: Tensor, feats: Tensor, mask: Tensor, comp: Tensor, recon: Tensor | None, resid: Tensor | None
) -> AuditBatch:
    """Recorded positions as ``engine``'s input: its watched columns ``cols`` of ``feats [B, T, U]``, the
    position masks moved beside them (without waiting for the device), and what else it reads."""
    dev = feats.device
    comp = comp.to(dev, non_blocking=True)
    return AuditBatch(
        features=feats.index_select(-1, cols),
        mask=mask.to(dev, non_blocking=True),
        is_completion=comp,
        is_prompt=~comp,
        recon_error=recon if engine.needs_recon_error else None,
        resid=resid if engine.needs_resid else None,
    )


class _StepGraph:
    """The hook's one-token step captured as a CUDA graph (or another recorder's replay).

    Static buffers: the input activation ``x [B, d]``, the output ``out [B, d]``, the history
    position ``pos`` and the decision count ``eval_pos`` (device scalars the graph advances), the
    positions' masks ``mask`` / ``comp [B, 1]`` (when steering rules read them), and the tensors
    the step reads and writes in place: the history buffers, the slots' switches, the policy rows
    and the incremental matcher's state. The graph fits the hook only while those are the very
    tensors it holds and the buffers have room.
    """

    def __init__(self, replay: Callable[[], None], hook: SteeringHook, static: dict[str, Any], n: int, n_eval: int) -> None:
        self.replay = replay
        self.x, self.out, self.pos, self.eval_pos = static["x"], static["out"], static["pos"], static["eval_pos"]
        self.mask, self.comp = static["mask"], static["comp"]
        self.feats, self.steered = hook._feats._buf, hook._steered._buf
        self.recon = hook._recon._buf if hook.need_recon else None
        self.rule_hist = hook._rule_hist._buf if self.eval_pos is not None else None
        self.enabled, self.policy_rows, self.matcher = hook.enabled, hook.policy_rows, hook._matcher
        self.n, self.n_eval = n, n_eval  # the positions `pos` and `eval_pos` hold
        self.inference = torch.is_inference_mode_enabled()  # static tensors made in inference mode stay there

    def fits(self, hook: SteeringHook, tensor: Tensor, n: int, n_eval: int) -> bool:
        def room(buf: Tensor | None, mine: Tensor | None, at: int) -> bool:
            return buf is mine and mine is not None and at < mine.shape[1]

        return (
            tensor.shape[0] == self.x.shape[0]
            and tensor.dtype == self.x.dtype
            and tensor.device == self.x.device
            and torch.is_inference_mode_enabled() == self.inference
            and room(hook._feats._buf, self.feats, n)
            and room(hook._steered._buf, self.steered, n)
            and (self.recon is None or room(hook._recon._buf, self.recon, n))
            and (self.rule_hist is None or room(hook._rule_hist._buf, self.rule_hist, n_eval))
            and hook.enabled is self.enabled
            and hook.policy_rows is self.policy_rows
            and hook._matcher is self.matcher
        )

    def run(self, tensor: Tensor, n: int, n_eval: int, mask: Tensor, comp: Tensor) -> Tensor:
        if n != self.n:  # an eager forward recorded positions since the last replay
            self.pos.fill_(n)
        if self.eval_pos is not None and n_eval != self.n_eval:
            self.eval_pos.fill_(n_eval)
        self.x.copy_(tensor.reshape(self.x.shape))
        if self.mask is not None and self.comp is not None:
            self.mask.copy_(mask.reshape(self.mask.shape), non_blocking=True)
            self.comp.copy_(comp.reshape(self.comp.shape), non_blocking=True)
        self.replay()
        self.n = n + 1
        if self.eval_pos is not None:
            self.n_eval = n_eval + 1
        return self.out.clone().view_as(tensor)

    @staticmethod
    def capture(hook: SteeringHook, tensor: Tensor, *, decide: bool) -> _StepGraph | None:
        """Capture the step for ``tensor [B, 1, d]``'s shape; None if this step cannot be captured."""
        b, _, d = tensor.shape
        dev = tensor.device
        n, n_eval = len(hook._feats), len(hook._rule_hist)
        rules = hook.trigger_engine is not None
        recording = rules and decide
        width = hook.steerer.latents.numel()
        hook._feats.reserve(torch.empty(b, 1, width, dtype=torch.float32, device=dev), 64)
        hook._steered.reserve(torch.empty(b, 1, width, dtype=torch.float32, device=dev), 64)
        if hook.need_recon:
            hook._recon.reserve(torch.empty(b, 1, dtype=torch.float32, device=dev), 64)
        if recording:
            hook._rule_hist.reserve(torch.empty(b, 1, len(hook._trigger_ids), dtype=torch.bool, device=dev), 64)
        static: dict[str, Any] = {
            "x": tensor.reshape(b, d).clone(),
            "out": torch.empty(b, d, dtype=tensor.dtype, device=dev),
            "pos": torch.full((1,), n, dtype=torch.long, device=dev),
            "eval_pos": torch.full((1,), n_eval, dtype=torch.long, device=dev) if recording else None,
            "mask": torch.ones(b, 1, dtype=torch.bool, device=dev) if rules else None,
            "comp": torch.ones(b, 1, dtype=torch.bool, device=dev) if rules else None,
        }
        x, out, pos, eval_pos = static["x"], static["out"], static["pos"], static["eval_pos"]
        feats, steered, recon_buf = hook._feats._buf, hook._steered._buf, hook._recon._buf if hook.need_recon else None
        rule_hist, enabled, steerer = hook._rule_hist._buf, hook.enabled, hook.steerer
        assert feats is not None and steered is not None

        def step() -> None:
            f, state, recon = steerer.measure_with_error(x, recon_error=hook.need_recon)  # [B, U] float32, [B]
            feats.index_copy_(1, pos, f.unsqueeze(1))
            if recon_buf is not None and recon is not None:
                recon_buf.index_copy_(1, pos, recon.view(b, 1).to(recon_buf.dtype))
            if rules:
                r = recon.view(b, 1) if recon is not None else None
                matched = hook._decide(f.view(b, 1, -1), static["mask"], static["comp"], r, decide=decide)
                if matched is not None and rule_hist is not None and eval_pos is not None:
                    rule_hist.index_copy_(1, eval_pos, matched.unsqueeze(1))
                    eval_pos.add_(1)
            new_x, new = steerer.steer(x, f, state, enabled)
            steered.index_copy_(1, pos, new.unsqueeze(1))
            out.copy_(new_x)
            pos.add_(1)

        # What capturing runs (a CUDA graph warms up first) also advances the decision's state: the
        # matcher's running aggregates and the switches. Keep them and put them back afterwards.
        saved = _state_of(hook)
        replay = hook.record_step(step, dev)
        _restore(saved)
        if replay is None:
            return None
        pos.fill_(n)
        if eval_pos is not None:
            eval_pos.fill_(n_eval)
        return _StepGraph(replay, hook, static, n, n_eval)


def _state_of(hook: SteeringHook) -> list[tuple[Tensor, Tensor]]:
    """The tensors a step updates in place outside the history (switches, matcher state), with copies."""
    live = [hook.enabled]
    if hook._matcher is not None:
        live += [v for v in vars(hook._matcher).values() if isinstance(v, Tensor)]
    return [(t, t.clone()) for t in live]


def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    for t, copy in saved:
        t.copy_(copy)


class _Growing:
    """A tensor that grows along dim 1 by appended chunks, in amortized O(chunk) time (capacity doubles)."""

    def __init__(self) -> None:
        self._buf: Tensor | None = None
        self._n = 0

    def __bool__(self) -> bool:
        return self._n > 0

    def __len__(self) -> int:
        return self._n

    def append(self, chunk: Tensor) -> None:
        t = chunk.shape[1]
        self.reserve(chunk, t)
        assert self._buf is not None
        self._buf[:, self._n : self._n + t] = chunk
        self._n += t

    def reserve(self, like: Tensor, extra: int) -> None:
        """Room for ``extra`` more positions shaped like ``like [B, 1, ...]`` (capacity at least doubles when it grows)."""
        if self._buf is not None and self._n + extra <= self._buf.shape[1]:
            return
        capacity = max(2 * (self._buf.shape[1] if self._buf is not None else 0), self._n + extra, 64)
        # A buffer keeps the dtype of what it first recorded.
        grown = (self._buf if self._buf is not None else like).new_empty((like.shape[0], capacity, *like.shape[2:]))
        if self._buf is not None:
            grown[:, : self._n] = self._buf[:, : self._n]
        self._buf = grown

    def advance(self, t: int) -> None:
        """Count ``t`` positions someone else wrote into the buffer past the recorded ones."""
        assert self._buf is not None and self._n + t <= self._buf.shape[1]
        self._n += t

    def view(self) -> Tensor:
        """The first ``T`` positions (a view; appends only write past it, so it stays valid)."""
        assert self._buf is not None
        return self._buf[:, : self._n]


def _describe(slot: ResolvedIntervention) -> str:
    return f"{slot.label}={slot.mode}:{slot.value:g}@{slot.positions}"
