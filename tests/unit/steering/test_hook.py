"""The steering hook decides on the device: triggers equal per-step verdicts, and no step reads back to the host."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from auditor.models import Hookpoint
from auditor.policy import AuditBatch, load_policy
from auditor.sae import SAE
from auditor.steering._hook import SteeringHook
from tests.unit.steering.conftest import HIDDEN, HOOKPOINT, random_sae

WEATHER, FRAUD, SAD = 20, 5, 9
# Row r's weather latent rises at decode step WEATHER_AT[r], its fraud latent at FRAUD_AT[r] (None: never).
WEATHER_AT = [2, 4, 1]
FRAUD_AT = [3, None, 3]
PROMPT, STEPS = 4, 7


def _policy(tmp_path: Path, library_path: Path) -> Path:
    path = tmp_path / "hook.yaml"
    path.write_text(
        f"""apiVersion: auditor/v1
kind: Policy
metadata: {{name: hook-test}}
library: {library_path}
rules:
  - id: weather-steer
    severity: medium
    category: topic
    scope: completion
    condition: {{feature: topic.weather, agg: max, threshold: 2.0}}
    actions:
      - alert
      - steer: {{feature: mood.sad, mode: add, value: 30.0}}
  - id: fraud-steer
    severity: high
    category: deception
    scope: completion
    condition: {{feature: deception.fraud, agg: max, threshold: 2.0}}
    actions:
      - block
      - steer: {{feature: deception.fraud, mode: clamp, value: 0.0}}
  - id: fraud-alert
    severity: low
    category: deception
    scope: any
    condition: {{feature: deception.fraud, agg: max, threshold: 1.0}}
    actions: [alert]
"""
    )
    return path


def _activations(sae: SAE) -> list[torch.Tensor]:
    """Prompt [3, PROMPT, d] then STEPS decode inputs [3, 1, d]: latents rise at the scheduled steps."""
    gen = torch.Generator().manual_seed(1)
    w = sae.W_enc.detach()
    chunks = [torch.randn(3, PROMPT, HIDDEN, generator=gen) * 0.05]
    for step in range(STEPS):
        x = torch.randn(3, 1, HIDDEN, generator=gen) * 0.05
        for row in range(3):
            if step >= WEATHER_AT[row]:
                x[row, 0] += 4.0 * w[:, WEATHER]
            at = FRAUD_AT[row]
            if at is not None and step >= at:
                x[row, 0] += 4.0 * w[:, FRAUD]
        chunks.append(x)
    return chunks


def _run(hook: SteeringHook, chunks: list[torch.Tensor], live: torch.Tensor) -> list[torch.Tensor]:
    """Feed the chunks as one prefill and decode steps; return the hook's output per chunk."""
    point = Hookpoint(1, "resid_post")
    outs = []
    for i, x in enumerate(chunks):
        b, t, _ = x.shape
        comp = torch.zeros(b, t, dtype=torch.bool) if i == 0 else torch.ones(b, t, dtype=torch.bool)
        mask = torch.ones(b, t, dtype=torch.bool) if i == 0 else live[:, i - 1 : i]
        hook.set_positions(mask, comp)
        outs.append(hook(x, hook=point))
    return outs


def _reference_triggers(engine, sae: SAE, chunks: list[torch.Tensor], live: torch.Tensor, policy_rows: list[bool], every: int = 1):  # type: ignore[no-untyped-def]
    """The rules' first matches, every ``every`` forwards, from full verdicts on the growing history."""
    steer = engine.steering_engine
    fired: set[tuple[int, str]] = set()
    out = []
    n_comp = [0, 0, 0]
    for i in range(len(chunks)):
        x = torch.cat(chunks[: i + 1], dim=1)  # [3, T, d]
        b, t, _ = x.shape
        feats = sae.encode(x.reshape(b * t, -1), steer.watched).view(b, t, -1)
        comp = torch.zeros(b, t, dtype=torch.bool)
        comp[:, PROMPT:] = True
        mask = torch.cat([torch.ones(b, PROMPT, dtype=torch.bool), live[:, :i]], dim=1)
        verdicts = steer.evaluate(AuditBatch(feats, mask, comp, ~comp)) if i % every == 0 else []
        for row, verdict in enumerate(verdicts):
            for m in verdict.matches:
                if policy_rows[row] and (row, m.rule_id) not in fired:
                    fired.add((row, m.rule_id))
                    out.append((m.rule_id, row, n_comp[row]))
        if i > 0:
            n_comp = [n + int(live[r, i - 1]) for r, n in enumerate(n_comp)]
    return out


def _hookpoint_probe_policy(tmp_path: Path, library_path: Path) -> Path:
    """The test policy with an always-true hookpoint probe added to the weather rule (needs resid)."""
    from sklearn.linear_model import LogisticRegression

    from auditor.policy.probes import save_probe

    g = np.random.default_rng(0)
    save_probe(LogisticRegression().fit(g.normal(size=(40, HIDDEN)), g.integers(0, 2, 40)), tmp_path / "resid.json", inputs="hookpoint", pool="mean")
    path = _policy(tmp_path, library_path)
    text = path.read_text().replace(
        "condition: {feature: topic.weather, agg: max, threshold: 2.0}",
        "condition: {all: [{feature: topic.weather, agg: max, threshold: 2.0}, {probe: {path: resid.json, threshold: 0.0}}]}",
    )
    path.write_text(text)
    return path


@pytest.mark.parametrize(("every", "hookpoint_probe"), [(1, False), (2, False), (1, True)])
def test_triggers_equal_the_per_step_verdicts_and_steer_from_the_firing_step(
    tmp_path: Path, library_path: Path, library, every: int, hookpoint_probe: bool  # type: ignore[no-untyped-def]
) -> None:
    sae = random_sae()
    path = _hookpoint_probe_policy(tmp_path, library_path) if hookpoint_probe else _policy(tmp_path, library_path)
    engine = load_policy(path)
    hook = SteeringHook(sae, [], engine=engine, library=library, policy_every=every)
    policy_rows = [True, True, False]
    hook.reset(3, torch.zeros(3, dtype=torch.bool), policy_rows=torch.tensor(policy_rows))
    # Running aggregates decide, except for hookpoint probes (their inputs are re-read from the history).
    assert (hook._matcher is None) == hookpoint_probe
    chunks = _activations(sae)
    live = torch.ones(3, STEPS, dtype=torch.bool)
    live[1, 0] = False  # one padded step in row 1: its completion count lags by one
    outs = _run(hook, chunks, live)

    want = _reference_triggers(engine, sae, chunks, live, policy_rows, every) if not hookpoint_probe else None
    got = [(t.rule_id, t.row, t.token) for t in hook.triggers]
    if want is not None:
        assert got == want
    else:  # the probe always holds: the same triggers as the plain policy
        plain = tmp_path / "plain"
        plain.mkdir()
        assert got == _reference_triggers(load_policy(_policy(plain, library_path)), sae, chunks, live, policy_rows)
    # The schedule makes this a real test: rules fire at different steps and rows, row 2 never steers.
    assert {r for _, r, _ in got} == {0, 1} and len(got) == 3
    assert hook.fired == [{"weather-steer", "fraud-steer"}, {"weather-steer"}, set()]
    assert [t.interventions for t in hook.triggers if t.rule_id == "fraud-steer"] == [["deception.fraud=clamp:0@active"]]
    # Steering starts at the firing step's own forward: row 0's sad latent gets +30 from there on.
    fired_at = next(t.token for t in hook.triggers if (t.rule_id, t.row) == ("weather-steer", 0))
    assert fired_at == WEATHER_AT[0] + (WEATHER_AT[0] + 1) % every  # the first evaluated step after the rise
    sad = hook.steerer.column(SAD)
    steered = hook.history()["steered"][0, PROMPT:, sad]
    measured = hook.history()["features"][0, PROMPT:, sad]
    delta = (steered - measured).tolist()
    assert delta == pytest.approx([0.0] * fired_at + [30.0] * (STEPS - fired_at))
    # Row 2 (not a policy row) passes through unchanged.
    for x, out in zip(chunks, outs):
        assert torch.equal(out[2], x[2])
    # Reading the triggers twice gives the same list; a reset forgets them.
    assert [(t.rule_id, t.row, t.token) for t in hook.triggers] == got
    hook.reset(3, torch.zeros(3, dtype=torch.bool))
    assert hook.triggers == [] and hook.fired == [set(), set(), set()]


class _HostReads(TorchDispatchMode):
    """Records the ops that make the host wait for the device (scalar reads, data-dependent shapes).

    The SAE's index range check reads two scalars on purpose, on the CPU only (it is skipped
    for indices on an accelerator), so reads made inside it are not counted.
    """

    WAITS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique2", "aten::_unique2"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func._schema.name in self.WAITS and not _inside(SAE._feature_index.__code__):
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _inside(code) -> bool:  # type: ignore[no-untyped-def]
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def test_a_decode_step_never_reads_a_value_back(tmp_path: Path, library_path: Path, library) -> None:  # type: ignore[no-untyped-def]
    sae = random_sae()
    engine = load_policy(_policy(tmp_path, library_path))
    hook = SteeringHook(sae, [], engine=engine, library=library)
    hook.reset(3, torch.zeros(3, dtype=torch.bool))
    chunks = _activations(sae)
    live = torch.ones(3, STEPS, dtype=torch.bool)
    _run(hook, chunks[:2], live)  # prefill and a first step outside the check
    with _HostReads() as reads:
        point = Hookpoint(1, "resid_post")
        for x in chunks[2:]:
            hook.set_positions(torch.ones(3, 1, dtype=torch.bool), torch.ones(3, 1, dtype=torch.bool))
            hook(x, hook=point)
    assert reads.seen == []
    assert len(hook.triggers) == 5  # the decisions were still made (and are read back here, once)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_steps_on_cuda_never_synchronize(tmp_path: Path, library_path: Path, library) -> None:  # type: ignore[no-untyped-def]
    dev = torch.device("cuda")
    sae = random_sae().to(dev)
    engine = load_policy(_policy(tmp_path, library_path))
    hook = SteeringHook(sae, [], engine=engine, library=library)
    hook.reset(3, torch.zeros(3, dtype=torch.bool))
    chunks = [c.to(dev) for c in _activations(random_sae())]  # same seed, same weights
    point = Hookpoint(1, "resid_post")
    hook.set_positions(torch.ones(3, PROMPT, dtype=torch.bool), torch.zeros(3, PROMPT, dtype=torch.bool))
    hook(chunks[0], hook=point)  # prefill: first use copies the policy's tensors to the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in chunks[1:]:
            hook.set_positions(torch.ones(3, 1, dtype=torch.bool), torch.ones(3, 1, dtype=torch.bool))
            hook(x, hook=point)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [(t.rule_id, t.row) for t in hook.triggers] == [
        (t.rule_id, t.row) for t in _cpu_triggers(tmp_path, library_path, library)
    ]


def _cpu_triggers(tmp_path: Path, library_path: Path, library):  # type: ignore[no-untyped-def]
    sae = random_sae()
    hook = SteeringHook(sae, [], engine=load_policy(_policy(tmp_path, library_path)), library=library)
    hook.reset(3, torch.zeros(3, dtype=torch.bool))
    _run(hook, _activations(sae), torch.ones(3, STEPS, dtype=torch.bool))
    return hook.triggers


def test_history_buffers_reserve_room_and_count_what_others_wrote() -> None:
    from auditor.steering._hook import _Growing

    g = _Growing()
    g.append(torch.arange(6.0).view(1, 3, 2))
    g.reserve(torch.empty(1, 1, 2), 100)  # grows: the recorded positions move along
    assert g._buf is not None and g._buf.shape[1] >= 103
    buf = g._buf
    g.reserve(torch.empty(1, 1, 2), 100)  # room enough: the same buffer (a captured graph keeps writing it)
    assert g._buf is buf
    buf[:, 3] = torch.tensor([7.0, 8.0])
    g.advance(1)
    assert g.view().flatten().tolist() == [0, 1, 2, 3, 4, 5, 7, 8]
    with pytest.raises(AssertionError):
        g.advance(buf.shape[1])


def _clamp_hook(sae: SAE, engine, library, graph: bool, value: float = 0.0) -> SteeringHook:  # type: ignore[no-untyped-def]
    """One user clamp with the policy watching, no rule that steers: the decode step a graph replays."""
    from auditor.steering.interventions import ResolvedIntervention

    clamp = ResolvedIntervention(FRAUD, "clamp", value, "all", "deception.fraud")
    return SteeringHook(sae, [clamp], engine=engine, library=library, policy_steering=False, cuda_graph=graph)


class _ReplayOnCPU(SteeringHook):
    """The graph step's bookkeeping on the CPU: "capturing" keeps the step function and a replay
    runs it again, on the same static tensors (what a CUDA graph re-executes). The CUDA graph
    itself is checked by the CUDA tests below."""

    graph_device = "cpu"
    captures = 0

    def record_step(self, step, device):  # type: ignore[no-untyped-def, override]
        type(self).captures += 1
        return step


class _ReplayPlainStepsOnCPU(_ReplayOnCPU):
    graph_policy_steps = False


def _graph_chunks(sae: SAE, device: str = "cpu") -> list[torch.Tensor]:
    """Prefill, 7 scheduled steps, then 150 more one-token steps with one 2-token chunk among them."""
    chunks = [c.to(device) for c in _activations(sae)]
    gen = torch.Generator().manual_seed(2)
    return chunks + [(torch.randn(3, 2 if i == 40 else 1, HIDDEN, generator=gen) * 0.05).to(device) for i in range(150)]


def _feed_graph_chunks(hook: SteeringHook, chunks: list[torch.Tensor]) -> torch.Tensor:
    point = Hookpoint(1, "resid_post")
    outs = []
    for i, x in enumerate(chunks):
        b, t, _ = x.shape
        live = torch.ones(b, t, dtype=torch.bool)
        live[1] = i % 5 != 3  # row 1 skips some positions (a finished row, say)
        hook.set_positions(live, torch.full((b, t), i > 0, dtype=torch.bool))
        outs.append(hook(x, hook=point))
    return torch.cat(outs, 1)


def test_graph_steps_keep_the_eager_history_through_growth_chunks_and_resets(tmp_path: Path, library_path: Path, library) -> None:  # type: ignore[no-untyped-def]
    sae = random_sae()
    engine = load_policy(_policy(tmp_path, library_path))
    chunks = _graph_chunks(sae)
    from auditor.steering.interventions import ResolvedIntervention

    clamp = [ResolvedIntervention(FRAUD, "clamp", 0.0, "all", "deception.fraud")]
    eager = SteeringHook(sae, clamp, engine=engine, library=library, policy_steering=False, cuda_graph=False)
    graphed = _ReplayOnCPU(sae, clamp, engine=engine, library=library, policy_steering=False)
    _ReplayOnCPU.captures = 0
    for round_ in range(2):  # the second generation starts from reset: a new capture on new buffers
        for hook in (eager, graphed):
            hook.reset(3, torch.tensor([True, False, True]))
        want, got = _feed_graph_chunks(eager, chunks), _feed_graph_chunks(graphed, chunks)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for key, value in eager.history().items():
            torch.testing.assert_close(graphed.history()[key], value, rtol=0, atol=0)
        assert [v.to_dict() for v in graphed.evaluate() or []] == [v.to_dict() for v in eager.evaluate() or []]
        assert graphed.graph_steps == (round_ + 1) * (len(chunks) - 2) and eager.graph_steps == 0
    # Per generation: the first step captures (buffers for 64 more positions: 68 -> 128), the
    # 2-token chunk at position 51 runs eagerly, position 128 outgrows the buffers (-> 256).
    assert _ReplayOnCPU.captures == 4
    # Other steps run eagerly: a new batch size resets the hook, chunks of several tokens, and
    # (without graph_policy_steps) hooks whose policy steers or reads the reconstruction error.
    graphed.reset(3, torch.ones(3, dtype=torch.bool))
    for _ in range(3):  # batch 2: the first step resets eagerly, the next captures anew
        graphed(torch.randn(2, 1, HIDDEN), hook=Hookpoint(1, "resid_post"))
    assert _ReplayOnCPU.captures == 5 and graphed.graph_steps == 2 * (len(chunks) - 2) + 2
    assert graphed.graph_captures == 5 and graphed.graph_capture_s > 0 and eager.graph_captures == 0
    assert graphed.history()["features"].shape[:2] == (2, 3)
    steering = _ReplayPlainStepsOnCPU(sae, clamp, engine=engine, library=library)
    steering.reset(3, torch.ones(3, dtype=torch.bool))
    _feed_graph_chunks(steering, chunks[:5])
    assert steering.graph_steps == 0 and _ReplayOnCPU.captures == 5


_ANOMALY_RULE = """  - id: odd-tokens
    severity: low
    category: anomaly
    scope: completion
    condition: {anomaly: {threshold: 0.9}, agg: count_above, threshold: 3}
    actions:
      - alert
      - steer: {feature: topic.weather, mode: scale, value: 0.5}
"""


def _tensor_ids(hook: SteeringHook) -> dict[str, int]:
    """Where the state a step updates lives (a captured graph keeps writing those very tensors)."""
    out = {"enabled": hook.enabled.data_ptr()}
    if hook._matcher is not None:
        out.update({k: v.data_ptr() for k, v in vars(hook._matcher).items() if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.parametrize(("every", "anomaly"), [(1, False), (2, False), (1, True)])
def test_graph_steps_that_decide_steering_rules_equal_eager_steps(  # type: ignore[no-untyped-def]
    tmp_path: Path, library_path: Path, library, every: int, anomaly: bool
) -> None:
    path = _policy(tmp_path, library_path)
    if anomaly:  # a steering rule on the reconstruction error: the step computes it too
        path.write_text(path.read_text() + _ANOMALY_RULE)
    engine = load_policy(path)
    sae = random_sae()
    chunks = _graph_chunks(sae)
    kw = {"engine": engine, "library": library, "policy_every": every}
    eager = SteeringHook(sae, [], cuda_graph=False, **kw)
    graphed = _ReplayOnCPU(sae, [], **kw)
    plain = _ReplayPlainStepsOnCPU(sae, [], **kw)  # without graph_policy_steps: every step eager
    for hook in (eager, graphed, plain):
        hook.reset(3, torch.zeros(3, dtype=torch.bool))
    want = _feed_graph_chunks(eager, chunks[:3])
    got = _feed_graph_chunks(graphed, chunks[:3])
    ids = _tensor_ids(graphed)
    want = torch.cat([want, _feed_graph_chunks(eager, chunks[3:])], 1)
    got = torch.cat([got, _feed_graph_chunks(graphed, chunks[3:])], 1)
    _feed_graph_chunks(plain, chunks)
    assert plain.graph_steps == 0 and graphed.graph_steps == len(chunks) - 2
    assert _tensor_ids(graphed) == ids  # updated in place only
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for key, value in eager.history().items():
        torch.testing.assert_close(graphed.history()[key], value, rtol=0, atol=0)
    assert graphed.triggers == eager.triggers and len(eager.triggers) >= 4
    assert torch.equal(graphed.enabled, eager.enabled)
    assert graphed._eval_starts == eager._eval_starts
    if anomaly:
        assert "recon" in graphed.history() and any(t.rule_id == "odd-tokens" for t in eager.triggers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_steps_equal_eager_steps(tmp_path: Path, library_path: Path, library) -> None:  # type: ignore[no-untyped-def]
    dev = torch.device("cuda")
    sae = random_sae().to(dev)
    engine = load_policy(_policy(tmp_path, library_path))
    chunks = _graph_chunks(random_sae(), "cuda")  # same seed, same weights
    results = {}
    for graph in (False, True):
        hook = _clamp_hook(sae, engine, library, graph)
        hook.reset(3, torch.tensor([True, False, True]))
        out = _feed_graph_chunks(hook, chunks)
        results[graph] = (out, hook.history(), hook.evaluate(), hook.graph_steps)
    eager, graphed = results[False], results[True]
    assert eager[3] == 0 and graphed[3] == len(chunks) - 2  # every one-token step, none of the others
    torch.testing.assert_close(graphed[0], eager[0], rtol=1e-5, atol=1e-6)
    for key in ("features", "steered", "mask", "is_completion"):
        assert graphed[1][key].shape == eager[1][key].shape
        assert graphed[1][key].shape[:2] == (3, PROMPT + STEPS + 151)
        torch.testing.assert_close(graphed[1][key], eager[1][key], rtol=1e-5, atol=1e-6)
    col = _clamp_hook(sae, engine, library, True).steerer.column(FRAUD)
    assert (graphed[1]["steered"][[0, 2], :, col] == 0).all() and (graphed[1]["features"][:, :, col] > 0).any()
    assert [(v.action, [m.rule_id for m in v.matches]) for v in graphed[2]] == [
        (v.action, [m.rule_id for m in v.matches]) for v in eager[2]
    ]
    assert [v.scores for v in graphed[2]] == [pytest.approx(v.scores, rel=1e-5) for v in eager[2]]
    assert any(v.matches for v in eager[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("every", "anomaly"), [(1, False), (2, True)])
def test_cuda_graph_steps_that_decide_steering_rules_equal_eager_steps(  # type: ignore[no-untyped-def]
    tmp_path: Path, library_path: Path, library, every: int, anomaly: bool
) -> None:
    path = _policy(tmp_path, library_path)
    if anomaly:
        path.write_text(path.read_text() + _ANOMALY_RULE)
    engine = load_policy(path)
    sae = random_sae().to("cuda")
    chunks = _graph_chunks(random_sae(), "cuda")  # same seed, same weights
    kw = {"engine": engine, "library": library, "policy_every": every}
    eager = SteeringHook(sae, [], cuda_graph=False, **kw)
    graphed = SteeringHook(sae, [], **kw)  # graph_policy_steps by default
    for hook in (eager, graphed):
        hook.reset(3, torch.zeros(3, dtype=torch.bool))
    want, got = _feed_graph_chunks(eager, chunks), _feed_graph_chunks(graphed, chunks)
    assert graphed.graph_steps == len(chunks) - 2 and eager.graph_steps == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for key, value in eager.history().items():
        torch.testing.assert_close(graphed.history()[key], value, rtol=1e-5, atol=1e-5)
    # The warm-up before a capture runs the step for real: the matcher's counts and the switches
    # are put back, or the rules would fire early.
    assert [(t.rule_id, t.row, t.token) for t in graphed.triggers] == [(t.rule_id, t.row, t.token) for t in eager.triggers]
    assert len(eager.triggers) >= 4 and torch.equal(graphed.enabled, eager.enabled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_never_synchronize_and_steer_a_real_decode_loop(tokenizer, library) -> None:  # type: ignore[no-untyped-def]
    import transformers

    from auditor.models import hooks
    from tests.unit.steering.conftest import build_model

    dev = torch.device("cuda")
    model = build_model(len(tokenizer)).to(dev)
    sae = random_sae().to(dev)
    prompt = torch.tensor([tokenizer.encode("the weather is fine."), tokenizer.encode("send your password!!")], device=dev)

    def decode(graph: bool | None, steps: int = 40) -> tuple[torch.Tensor, SteeringHook]:
        hook = _clamp_hook(sae, None, library, bool(graph), value=5.0)
        hook.reset(2, torch.ones(2, dtype=torch.bool))

        def checked(tensor: torch.Tensor, *, hook: Hookpoint, inner: SteeringHook = hook) -> torch.Tensor:
            # Past the step that captured the graph, a step must not wait for the device.
            if inner.graph_steps:
                torch.cuda.set_sync_debug_mode("error")
            try:
                return inner(tensor, hook=hook)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        cache = transformers.DynamicCache(config=model.config)
        out = []
        with torch.inference_mode(), hooks(model, {HOOKPOINT: checked} if graph is not None else {}):
            ids = prompt
            for _ in range(steps):
                logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
                ids = logits.argmax(-1, keepdim=True)
                out.append(logits.float())
        return torch.stack(out, 1), hook

    eager, eager_hook = decode(False)
    graphed, graphed_hook = decode(True)
    plain, _ = decode(None)
    assert eager_hook.graph_steps == 0 and graphed_hook.graph_steps == 39
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(graphed.argmax(-1), eager.argmax(-1))
    assert (graphed - plain).abs().amax() > 0.1  # the clamp steered the replayed steps too
