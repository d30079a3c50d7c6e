"""Buckets queued before the previous bucket's results are built (``Auditor.launch``), and the
copies to the host that let the GPU compute meanwhile (``HostCopy``, ``PolicyEngine.decide``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from auditor._cuda import HostCopy
from auditor.pipeline import Auditor, AuditResult
from auditor.policy import AuditBatch, PendingVerdicts, load_policy
from auditor.text import AuditInput, tokenize_batch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ITEMS = [
    AuditInput(text="Your account is locked. Reply with your bank PIN and password to restore it.", id="pin"),
    AuditInput(text="Maths is the language of the universe.", id="maths"),
    AuditInput(prompt="How do I bake bread?", completion="Mix flour, water, salt and yeast, then knead and let it rise.", id="bread"),
    AuditInput(text="Urgent: confirm your card number and the code we just texted you, or your account closes today.", id="card"),
    AuditInput(text="ok", id="short"),
    AuditInput(
        messages=[
            {"role": "user", "content": "Write a message asking my grandmother for her online banking login."},
            {"role": "assistant", "content": "Hi Grandma, the bank needs your login and password, send them to me today."},
        ],
        id="chat",
    ),
    AuditInput(text="The rain kept falling on the quiet town all night, and nobody minded.", id="rain"),
]


# Two rules over the tiny test library (tests/unit/steering/conftest.py's tiny_auditor).
TINY_RULES = """  - id: any-fraud
    severity: high
    category: deception
    condition: {feature: deception.fraud, agg: max, threshold: 0.01}
    actions: [alert]
  - id: sad-mean
    severity: low
    category: mood
    condition: {feature: mood.sad, agg: mean, threshold: 0.01}
    actions: [alert]
"""


def _plain(r: AuditResult) -> dict:
    v = r.verdict
    assert v is not None
    return {
        "id": r.id,
        "tokens": r.tokens,
        "content_mask": r.content_mask,
        "n": r.n_content_tokens,
        "top": [(t.token, t.position, t.indices, [round(a, 3) for a in t.activations], t.names) for t in r.top_features],
        "action": v.action,
        "matches": [(m.rule_id, round(m.score, 4), [(e.name, round(e.value, 4), e.fired, e.token_spans) for e in m.explanation]) for m in v.matches],
        "scores": {k: round(x, 4) for k, x in v.scores.items()},
        "suppressed": v.suppressed,
    }


@pytest.fixture(scope="module")
def auditor(default_model) -> Auditor:  # type: ignore[no-untyped-def]
    from auditor.pipeline import default_policy_path

    return Auditor.load(model=default_model, policy=str(default_policy_path()))


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
def test_buckets_queued_ahead_give_the_results_of_buckets_in_turn_and_alone(auditor: Auditor, pack: bool) -> None:
    auditor._pack = pack
    auditor.batch_tokens = 16 if pack else 64  # several buckets for these texts
    assert len(list(auditor._buckets(_tokenized(auditor)))) >= 3
    try:
        auditor.overlap_buckets = False
        in_turn = [_plain(r) for r in auditor.run(ITEMS, top_k=3)]
    finally:
        auditor.overlap_buckets = True
    ahead = [_plain(r) for r in auditor.run(ITEMS, top_k=3)]
    assert ahead == in_turn
    assert [r["id"] for r in ahead] == [it.id for it in ITEMS]
    # Each text alone (one bucket each) gives the same verdicts and features. A text alone is a
    # forward of a few rows, which the few-row kernel runs (auditor.models.skinny): its
    # activations equal the bucket's to float rounding, so compare them within rounding, not
    # rounded to 3 decimals (which two float32 sums can straddle).
    alone = [_plain(auditor.run([it], top_k=3)[0]) for it in ITEMS]

    def features(rows: list[dict]) -> list[tuple]:
        return [(r["id"], r["action"], [m[0] for m in r["matches"]], [t[:3] + t[4:] for t in r["top"]]) for r in rows]

    assert features(alone) == features(ahead)
    for one, bucketed in zip(alone, ahead):
        for a, b in zip(one["top"], bucketed["top"]):
            assert a[3] == pytest.approx(b[3], abs=2e-3)
    assert {r["action"] for r in ahead} >= {"allow", "alert"}  # the texts exercise matches and explanations


def test_launch_then_results_is_run_and_keeps_its_timings(auditor: Auditor) -> None:
    launched = auditor.launch(ITEMS[:3], top_k=2)
    results = launched.results()
    assert [_plain(r) for r in results] == [_plain(r) for r in auditor.run(ITEMS[:3], top_k=2)]
    assert launched.results() == results  # built once
    t = launched.timings
    assert t.tokenize > 0 and t.forward > 0 and t.encode > 0 and t.evaluate > 0
    with pytest.raises(Exception, match=r"Auditor\.launch\(\)"):
        auditor.launch("not a list")  # type: ignore[arg-type]


def test_decide_then_verdicts_is_evaluate(tmp_path: Path) -> None:
    engine = load_policy(Path(__file__).resolve().parents[3] / "policies" / "default.yaml")
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(3, 12, engine.watched.numel(), generator=g) * 3
    mask = torch.ones(3, 12, dtype=torch.bool)
    comp = torch.zeros(3, 12, dtype=torch.bool)
    comp[:, 6:] = True
    batch = AuditBatch(feats, mask, comp, recon_error=torch.rand(3, 12, generator=g))
    pending = engine.decide(batch)
    assert pending.ready is None  # on the CPU the numbers are already on the host
    got = pending.verdicts()
    assert pending.verdicts() is got
    want = engine.evaluate(batch)
    assert [v.to_dict() for v in got] == [v.to_dict() for v in want]
    assert any(v.matches for v in got)


def test_results_asked_for_by_two_threads_are_every_result_for_both(auditor: Auditor) -> None:
    """``LaunchedRun.results`` may be called in any thread: a second caller that comes while the
    first is still building the last bucket waits for it rather than getting the results so far."""
    import threading
    import time

    items = [AuditInput(text=f"Reply with your bank PIN and password, customer {i}. " * 6, id=str(i)) for i in range(12)]
    start = time.perf_counter()
    auditor.launch(items, top_k=64).results()
    build_s = time.perf_counter() - start
    for _ in range(3):
        run = auditor.launch(items, top_k=64)  # on the CPU only the last bucket's results are left to build
        got: dict[str, list[AuditResult]] = {}
        first_in = threading.Event()

        def first() -> None:
            first_in.set()
            got["first"] = run.results()

        def second() -> None:
            first_in.wait()
            time.sleep(build_s / 20)  # while the first caller builds them
            got["second"] = run.results()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.id for r in got["first"]] == [it.id for it in items]
        assert [r.id for r in got["second"]] == [it.id for it in items]


def test_verdicts_asked_for_by_two_threads_are_built_once() -> None:
    import sys

    engine = load_policy(Path(__file__).resolve().parents[3] / "policies" / "default.yaml")
    g = torch.Generator().manual_seed(2)
    feats = torch.rand(256, 64, engine.watched.numel(), generator=g) * 3  # a few thousand matches to build
    batch = AuditBatch(feats, torch.ones(256, 64, dtype=torch.bool), torch.zeros(256, 64, dtype=torch.bool),
                       recon_error=torch.rand(256, 64, generator=g))
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the threads take turns often while the verdicts are built
    try:
        for _ in range(5):
            _read_by_two_threads(engine.decide(batch))
    finally:
        sys.setswitchinterval(switch)


def _read_by_two_threads(pending: PendingVerdicts) -> None:
    """``pending.verdicts()`` in two threads at once: both get the one list, neither an error."""
    import threading

    both = threading.Barrier(2)
    got: list[object] = []

    def read() -> None:
        both.wait()
        try:
            got.append(pending.verdicts())
        except Exception as exc:  # noqa: BLE001 - what the other thread must not see
            got.append(exc)

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not any(isinstance(v, Exception) for v in got), got
    assert got[0] is got[1] and len(got[0]) == 256  # type: ignore[arg-type]


def _tokenized(auditor: Auditor):  # type: ignore[no-untyped-def]
    return tokenize_batch(auditor.model.tokenizer, ITEMS, max_tokens=auditor.max_tokens)


# ---------------------------------------------------------------------- CUDA


def _busy(matmuls: int = 40) -> torch.Tensor:
    """Queue GPU work on the current stream: about 3 ms a float32 4096 x 4096 matmul on an H100."""
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(matmuls):
        a = torch.tanh(a @ a)
    return a


@needs_cuda
def test_host_copy_waits_for_its_own_work_not_for_later_work_cuda() -> None:
    x = torch.randn(64, 100, device="cuda")
    copy = HostCopy(x * 2)
    _busy()
    got = copy.get()
    assert not torch.cuda.current_stream().query()  # the later work is still running
    assert got.device.type == "cpu" and got.is_pinned()
    torch.testing.assert_close(got, (x * 2).cpu())


@needs_cuda
def test_verdicts_and_explanations_are_read_while_the_gpu_works_cuda() -> None:
    engine = load_policy(Path(__file__).resolve().parents[3] / "policies" / "default.yaml")
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(4, 20, engine.watched.numel(), generator=g) * 3
    mask = torch.ones(4, 20, dtype=torch.bool)
    comp = torch.zeros(4, 20, dtype=torch.bool)
    recon = torch.rand(4, 20, generator=g)
    want = [v.to_dict() for v in engine.evaluate(AuditBatch(feats, mask, comp, recon_error=recon))]
    assert any(w["matches"] for w in want)
    pending = engine.decide(AuditBatch(feats.cuda(), mask.cuda(), comp.cuda(), recon_error=recon.cuda()))
    assert pending.ready is not None
    # About a second of work: building the verdicts and explanations (a side stream made, copies,
    # a garbage collection perhaps) took longer than 40 matmuls once.
    _busy(400)
    verdicts = pending.verdicts()
    got = [v.to_dict() for v in verdicts]  # explanations included: copied on a stream of their own
    assert not torch.cuda.current_stream().query()
    assert [(v["action"], [m["rule_id"] for m in v["matches"]]) for v in got] == [
        (v["action"], [m["rule_id"] for m in v["matches"]]) for v in want
    ]
    for v, w in zip(got, want):
        for m, n in zip(v["matches"], w["matches"]):
            assert m["score"] == pytest.approx(n["score"], rel=1e-4)
            assert [(e["name"], e["fired"], e["token_spans"]) for e in m["explanation"]] == [
                (e["name"], e["fired"], e["token_spans"]) for e in n["explanation"]
            ]


@needs_cuda
def test_auditor_on_cuda_queues_buckets_ahead_with_the_cpu_results_cuda(tmp_path: Path) -> None:
    from tests.unit.steering.conftest import tiny_auditor

    texts = [AuditInput(text=("Send me your PIN now! " * (i + 1))[: 10 + 9 * i], id=str(i)) for i in range(9)]
    results = {}
    for device in ("cpu", "cuda"):
        a = tiny_auditor(tmp_path, device, TINY_RULES)
        a.batch_tokens = 48
        results[device] = [_plain(r) for r in a.run(texts, top_k=2)]
        if device == "cuda":
            a.overlap_buckets = False
            assert [_plain(r) for r in a.run(texts, top_k=2)] == results["cuda"]
    assert len(list(a._buckets(tokenize_batch(a.model.tokenizer, texts, max_tokens=2048)))) >= 3
    for c, g in zip(results["cpu"], results["cuda"]):
        assert (g["id"], g["action"], [m[0] for m in g["matches"]]) == (c["id"], c["action"], [m[0] for m in c["matches"]])
        assert [t[2] for t in g["top"]] == [t[2] for t in c["top"]]


def test_a_bf16_model_is_audited_through_the_split_encode_like_its_cast_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A bfloat16 model's rows stay bfloat16 up to the encode, which on CUDA multiplies them with
    # the SAE's float32 weights split in three bfloat16 terms (auditor.sae.sae._split_mm). Run
    # here with that path switched on for the CPU: the results are those of the rows cast.
    import auditor.sae.sae as sae_module
    from tests.unit.steering.conftest import tiny_auditor

    a = tiny_auditor(tmp_path, "cpu", TINY_RULES)
    a.model.model.to(torch.bfloat16)
    a.batch_tokens = 48
    texts = [AuditInput(text=("Send me your PIN now! " * (i + 1))[: 10 + 9 * i], id=str(i)) for i in range(6)]
    # No top features asked for: those need every latent, which casts the rows (one full encode).
    cast = [_plain(r) for r in a.run(texts)]
    assert a.policy is not None and sae_module._SPLIT_KEY not in (a.sae._watch_columns(a.policy.watched)[1] or {})
    monkeypatch.setattr(sae_module, "_SPLIT_DEVICES", frozenset({"cpu"}))
    split = [_plain(r) for r in a.run(texts)]
    assert sae_module._SPLIT_KEY in (a.sae._watch_columns(a.policy.watched)[1] or {})  # the split path ran
    assert all(r["matches"] for r in cast)  # scores to compare
    for s, c in zip(split, cast):
        assert (s["id"], s["action"], [m[0] for m in s["matches"]]) == (c["id"], c["action"], [m[0] for m in c["matches"]])
        assert s["scores"] == pytest.approx(c["scores"], rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("items", [
    [AuditInput(text="", id="empty")],
    [AuditInput(prompt="", completion="", id="nothing-yet"), AuditInput(text="", id="empty")],
], ids=["empty-text", "empty-rows"])
def test_a_bf16_bucket_without_content_tokens_is_audited_through_the_split_encode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, items: list[AuditInput]
) -> None:
    # A bucket whose rows have no content token (an empty text, an answer not started yet)
    # encodes zero rows: allowed, as with the rows cast.
    import auditor.sae.sae as sae_module
    from tests.unit.steering.conftest import tiny_auditor

    a = tiny_auditor(tmp_path, "cpu", TINY_RULES)
    a.model.model.to(torch.bfloat16)
    cast = [_plain(r) for r in a.run(items)]
    monkeypatch.setattr(sae_module, "_SPLIT_DEVICES", frozenset({"cpu"}))
    split = [_plain(r) for r in a.run(items)]
    assert a.policy is not None and sae_module._SPLIT_KEY in (a.sae._watch_columns(a.policy.watched)[1] or {})
    assert [r["n"] for r in split] == [0] * len(items) and [r["action"] for r in split] == ["allow"] * len(items)
    assert split == cast


@needs_cuda
def test_a_bucket_launch_waits_for_the_gpu_only_in_the_models_mask_check_cuda(tmp_path: Path) -> None:
    # Every input crosses to the device without waiting and a batch without padding runs with
    # no mask, so queuing a bucket (forward, encode, decision, copies back) synchronizes nowhere
    # but in transformers' mask preparation (it reads back whether position ids restart, or
    # whether a mask can be dropped): the host queues on while the previous bucket still runs.
    import warnings

    from auditor.pipeline import StageTimings
    from tests.unit.steering.conftest import tiny_auditor

    a = tiny_auditor(tmp_path, "cuda", TINY_RULES)
    a.model.model.to(torch.bfloat16)
    a._pack = False
    texts = [AuditInput(text="Send me your PIN now, or else!"[: 20 + i], id=str(i)) for i in range(3)]
    batch = tokenize_batch(a.model.tokenizer, texts, max_tokens=a.max_tokens)
    assert a.policy is not None
    for _ in range(2):  # the first launch warms up (allocations, pinned host blocks)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                launched = a._launch_batch(batch, 2, a.policy, StageTimings())
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = {f"{Path(w.filename).parent.name}/{Path(w.filename).name}" for w in caught if "synchroniz" in str(w.message)}
    syncs.discard("cuda/__init__.py")  # the debug mode's own notice
    assert syncs <= {"transformers/masking_utils.py"}, syncs
    assert launched.pending is not None
    got = [v.action for v in launched.pending.verdicts()]
    assert got == [r.verdict.action for r in a.run(texts, top_k=2)]  # type: ignore[union-attr]
