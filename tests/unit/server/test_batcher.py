"""Micro-batching on the real model: batched results equal one-by-one results, bounds hold."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from auditor.server.batcher import MicroBatcher
from auditor.server.errors import AuditTimeoutError, OverloadedError
from auditor.text import AuditInput
from tests.conftest import make_random_sae

TEXTS = [
    "The committee met on Tuesday.",
    "Send the wire transfer today or your account will be closed.",
    "A short one.",
    "Rain is expected later this week across the northern hills.",
]


@pytest.fixture(scope="module")
def auditor(default_model, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from auditor.pipeline import Auditor
    from auditor.policy import load_policy
    from auditor.sae import load_sae

    sae = make_random_sae(tmp_path_factory.mktemp("b") / "sae", d_in=576, d_sae=64, hookpoint="blocks.5.hook_resid_post")
    engine = load_policy(Path(__file__).resolve().parents[3] / "policies" / "examples" / "deception.yaml")
    return Auditor(default_model, load_sae(str(sae)), library=engine.library, policy=engine)


def test_concurrent_jobs_share_a_forward_and_match_single_runs(auditor) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> tuple[list[list[object]], int]:
        batcher = MicroBatcher(auditor, max_wait_ms=50, max_tokens=4096, queue_size=16)
        await batcher.start()
        try:
            jobs = [
                batcher.audit([AuditInput(text=t)], auditor.policy, top_k=0, n_tokens=20, timeout_s=60) for t in TEXTS
            ]
            results = await asyncio.gather(*jobs)
            return results, batcher.batches
        finally:
            await batcher.stop()

    results, batches = asyncio.run(scenario())
    assert batches == 1
    for text, [res] in zip(TEXTS, results):
        [alone] = auditor.run([AuditInput(text=text)])
        assert res.tokens == alone.tokens  # type: ignore[attr-defined]
        for rule, score in alone.verdict.scores.items():
            torch.testing.assert_close(res.verdict.scores[rule], score, rtol=1e-4, atol=1e-5)  # type: ignore[attr-defined]


def test_token_budget_splits_batches(auditor) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> int:
        batcher = MicroBatcher(auditor, max_wait_ms=50, max_tokens=40, queue_size=16)
        await batcher.start()
        try:
            await asyncio.gather(
                *(batcher.audit([AuditInput(text=t)], None, top_k=0, n_tokens=20, timeout_s=60) for t in TEXTS)
            )
            return batcher.batches
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == 2  # 4 jobs x 20 tokens under a 40-token budget


def test_queue_bound_rejects_at_once_and_timeouts_fail(auditor) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        batcher = MicroBatcher(auditor, max_wait_ms=1, max_tokens=4096, queue_size=2)
        await batcher.start()
        try:
            first = batcher.submit([AuditInput(text="a")], None, top_k=0, n_tokens=3)
            batcher.submit([AuditInput(text="b")], None, top_k=0, n_tokens=3)
            with pytest.raises(OverloadedError) as info:
                batcher.submit([AuditInput(text="c")], None, top_k=0, n_tokens=3)
            assert info.value.headers == {"Retry-After": "1"} and info.value.status == 503
            assert batcher.depth == 2
            # A chunk of a stream already under way is not cut off by the bound, and counts toward it.
            stream = auditor.stream(AuditInput(prompt="Hi. "))
            chunk = batcher.submit([], stream.engine, top_k=0, n_tokens=4, feed=(stream, "there"))
            assert batcher.depth == 3
            [fed] = await chunk.future
            assert fed.verdict is not None and stream.n_cached == len(fed.tokens)
            await first.future
            await asyncio.sleep(0.2)
            assert batcher.depth == 0
            with pytest.raises(AuditTimeoutError, match="request_timeout_s"):
                await batcher.audit([AuditInput(text="d")], None, top_k=0, n_tokens=3, timeout_s=1e-9)
            await asyncio.sleep(0.2)
            assert batcher.depth == 0  # the timed-out job's slot is freed
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_a_lone_request_never_waits_but_returning_clients_are_waited_for(auditor) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(auditor, max_wait_ms=3000, max_tokens=4096, queue_size=16)
        await batcher.start()
        try:
            t0 = loop.time()
            await batcher.audit([AuditInput(text=TEXTS[0])], auditor.policy, top_k=0, n_tokens=20, timeout_s=60)
            lone = loop.time() - t0

            async def client(text: str) -> None:
                for _ in range(3):  # closed loop: the next request goes out after the answer
                    await batcher.audit([AuditInput(text=text)], auditor.policy, top_k=0, n_tokens=20, timeout_s=60)
                    await asyncio.sleep(0.01)

            before = batcher.batches
            await asyncio.gather(*(client(t) for t in TEXTS))
            return lone, batcher.batches - before
        finally:
            await batcher.stop()

    lone, batches = asyncio.run(scenario())
    assert lone < 2.0  # not held for max_wait_ms (3 s): nothing else was in flight
    assert batches == 3  # every round waits for all four clients, none runs alone


@pytest.fixture
def two_workers():  # type: ignore[no-untyped-def]
    """Two model workers with one torch thread each (the CPU default); torch's count restored after."""
    from auditor.workers import ModelWorkers

    before = torch.get_num_threads()
    workers = ModelWorkers()
    workers.executor(0).submit(workers.configure, 2).result()
    yield workers
    workers.shutdown()
    torch.set_num_threads(before)


def test_two_workers_run_batches_side_by_side_with_single_run_results(auditor, two_workers) -> None:  # type: ignore[no-untyped-def]
    import threading
    import time as _time

    spans: list[tuple[str, float, float]] = []
    run = auditor.run

    class Recording:
        """The real auditor, with when and where each batch ran recorded."""

        def __getattr__(self, name: str) -> object:
            return getattr(auditor, name)

        def run(self, *args: object, **kwargs: object) -> object:
            t0 = _time.perf_counter()
            out = run(*args, **kwargs)
            spans.append((threading.current_thread().name, t0, _time.perf_counter()))
            return out

    texts = TEXTS * 2

    async def scenario() -> list[list[object]]:
        # 40-token batches: two jobs each, four batches, two workers free from the start.
        batcher = MicroBatcher(Recording(), max_wait_ms=50, max_tokens=40, queue_size=16, workers=two_workers)  # type: ignore[arg-type]
        await batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.audit([AuditInput(text=t)], auditor.policy, top_k=0, n_tokens=20, timeout_s=60) for t in texts)
            )
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert two_workers.n == 2 and two_workers.threads == 1
    assert len(spans) == 4 and {name for name, _, _ in spans} == {"auditor-model-0_0", "auditor-model-1_0"}
    first, second = sorted(spans, key=lambda s: s[1])[:2]
    assert second[1] < first[2]  # the second batch started before the first ended
    for text, [res] in zip(texts, results):
        [alone] = auditor.run([AuditInput(text=text)])
        assert res.tokens == alone.tokens  # type: ignore[attr-defined]
        for rule, score in alone.verdict.scores.items():
            torch.testing.assert_close(res.verdict.scores[rule], score, rtol=1e-4, atol=1e-5)  # type: ignore[attr-defined]


def test_a_steered_generation_on_one_worker_leaves_audits_on_the_other_alone(auditor, two_workers) -> None:  # type: ignore[no-untyped-def]
    from auditor.steering import generate

    item = AuditInput(prompt="The cat sat on the mat and")
    plain = generate(auditor, item, max_tokens=12)
    steered_alone = generate(auditor, item, max_tokens=12, interventions=["5=add:40"])
    assert steered_alone.text != plain.text  # the intervention matters, so a leak would show
    alone = {t: auditor.run([AuditInput(text=t)])[0] for t in TEXTS}

    async def scenario() -> tuple[object, list[object]]:
        batcher = MicroBatcher(auditor, max_wait_ms=1, max_tokens=4096, queue_size=64, workers=two_workers)
        await batcher.start()
        try:
            gen = asyncio.ensure_future(
                batcher.run_model(lambda: generate(auditor, item, max_tokens=12, interventions=["5=add:40"]))
            )
            audited = []
            while not gen.done():  # audits keep the other worker busy for the whole generation
                for text in TEXTS:
                    [res] = await batcher.audit([AuditInput(text=text)], auditor.policy, top_k=0, n_tokens=20, timeout_s=60)
                    audited.append((text, res))
            return await gen, audited
        finally:
            await batcher.stop()

    steered, audited = asyncio.run(scenario())
    assert steered.text == steered_alone.text  # type: ignore[attr-defined]
    assert len(audited) >= 4
    for text, res in audited:
        assert res.tokens == alone[text].tokens
        for rule, score in alone[text].verdict.scores.items():
            torch.testing.assert_close(res.verdict.scores[rule], score, rtol=1e-4, atol=1e-5)


def test_with_two_workers_each_batch_takes_its_share_and_a_lone_request_still_never_waits(auditor, two_workers) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> tuple[float, list[int]]:
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(auditor, max_wait_ms=3000, max_tokens=4096, queue_size=16, workers=two_workers)
        await batcher.start()
        sizes: list[int] = []
        run = batcher._run

        def recording(batch):  # type: ignore[no-untyped-def]
            sizes.append(len(batch))
            return run(batch)

        batcher._run = recording  # type: ignore[method-assign]
        try:
            t0 = loop.time()
            await batcher.audit([AuditInput(text=TEXTS[0])], auditor.policy, top_k=0, n_tokens=20, timeout_s=60)
            lone = loop.time() - t0

            async def client(text: str) -> None:
                for _ in range(3):
                    await batcher.audit([AuditInput(text=text)], auditor.policy, top_k=0, n_tokens=20, timeout_s=60)
                    await asyncio.sleep(0.01)

            await asyncio.gather(*(client(t) for t in TEXTS))
            return lone, sizes[1:]
        finally:
            await batcher.stop()

    lone, sizes = asyncio.run(scenario())
    assert lone < 2.0  # not held for max_wait_ms (3 s)
    # Four closed-loop clients on two workers: every round is two batches of two, none waits out
    # the 3 s for all four, none runs a straggler alone.
    assert sizes == [2] * 6


def test_concurrent_stream_chunks_share_a_forward_and_match_streams_fed_alone(auditor) -> None:  # type: ignore[no-untyped-def]
    prompts = ["Summarize the memo.", "Answer the customer.", "Describe the weather.", "Plan the trip."]
    chunks = ["The committee met on Tuesday ", "and asked for the wire transfer ", "before the account closes."]

    async def scenario() -> tuple[list[list[object]], int]:
        batcher = MicroBatcher(auditor, max_wait_ms=200, max_tokens=4096, queue_size=16)
        await batcher.start()
        try:
            streams = [auditor.stream(AuditInput(prompt=p)) for p in prompts]

            async def client(stream: object) -> list[object]:
                return [await batcher.feed(stream, c) for c in chunks]  # type: ignore[arg-type]

            results = await asyncio.gather(*(client(s) for s in streams))
            return results, batcher.batches
        finally:
            await batcher.stop()

    assert auditor.shared_stream_forwards  # decided (the check runs forwards of its own) before counting
    forwards: list[int] = []
    handle = auditor.model.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        results, batches = asyncio.run(scenario())
    finally:
        handle.remove()
    assert batches == len(chunks)  # each round of four chunks ran as one batch
    assert len(forwards) == len(chunks)  # and as one forward
    for prompt, got in zip(prompts, results):
        solo = auditor.stream(AuditInput(prompt=prompt))
        for chunk, res in zip(chunks, got):
            want = solo.feed(chunk)
            assert res.tokens == want.tokens  # type: ignore[attr-defined]
            assert res.verdict.action == want.verdict.action  # type: ignore[attr-defined]
            for rule, score in want.verdict.scores.items():
                torch.testing.assert_close(res.verdict.scores[rule], score, rtol=1e-4, atol=1e-5)  # type: ignore[attr-defined]


def test_audit_duration_counts_audits_feeds_and_timeouts(auditor) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client import CollectorRegistry

    from auditor.metrics import AuditorMetrics

    registry = CollectorRegistry()

    def observed() -> tuple[float, float]:
        count = registry.get_sample_value("auditor_audit_duration_seconds_count")
        total = registry.get_sample_value("auditor_audit_duration_seconds_sum")
        return count or 0.0, total or 0.0

    async def scenario() -> list[tuple[float, float]]:
        batcher = MicroBatcher(auditor, max_wait_ms=1, max_tokens=4096, queue_size=8, metrics=AuditorMetrics(registry))
        await batcher.start()
        seen = [observed()]
        try:
            await batcher.audit([AuditInput(text="The committee met.")], None, top_k=0, n_tokens=6, timeout_s=60)
            seen.append(observed())
            await batcher.feed(auditor.stream(AuditInput(prompt="Hi. ")), "there")
            seen.append(observed())
            with pytest.raises(AuditTimeoutError):
                await batcher.audit([AuditInput(text="d")], None, top_k=0, n_tokens=3, timeout_s=1e-9)
            seen.append(observed())
        finally:
            await batcher.stop()
        return seen

    seen = asyncio.run(scenario())
    assert [count for count, _ in seen] == [0.0, 1.0, 2.0, 3.0]
    assert all(later > earlier for (_, earlier), (_, later) in zip(seen[:2], seen[1:3]))  # real durations were added


def test_a_job_given_up_on_while_it_waited_for_a_worker_takes_no_forward(auditor) -> None:  # type: ignore[no-untyped-def]
    import time

    async def scenario() -> tuple[int, list[str]]:
        batcher = MicroBatcher(auditor, max_wait_ms=1, max_tokens=4096, queue_size=8)
        await batcher.start()
        try:
            busy = asyncio.ensure_future(batcher.run_model(time.sleep, 1.0))  # the one worker, taken
            await asyncio.sleep(0.05)
            with pytest.raises(AuditTimeoutError):  # the collector holds it while it waits for the worker
                await batcher.audit([AuditInput(text="A text nobody waits for.")], None, top_k=0, n_tokens=8, timeout_s=0.2)
            await busy
            [after] = await batcher.audit([AuditInput(text="The next one.")], None, top_k=0, n_tokens=5, timeout_s=60)
            return batcher.batches, after.tokens
        finally:
            await batcher.stop()

    batches, tokens = asyncio.run(scenario())
    # Before: the timed-out job still ran a forward once the worker was free (under overload, a
    # worker's time spent on answers nobody will read).
    assert batches == 1 and "next" in "".join(tokens).lower()


@pytest.mark.parametrize("hand_off", [True, False], ids=["built-off-the-worker", "built-on-the-worker"])
def test_batches_whose_results_are_built_off_the_worker_match_single_runs(auditor, hand_off: bool) -> None:  # type: ignore[no-untyped-def]
    """What the sidecar does on a GPU (``hand_off``): the worker queues a batch, a host thread
    builds its results; groups under two policies and with token features, failures kept apart."""
    from prometheus_client import CollectorRegistry

    from auditor.metrics import AuditorMetrics
    from auditor.policy import load_policy

    other = load_policy(Path(__file__).resolve().parents[3] / "policies" / "examples" / "deception.yaml")
    registry = CollectorRegistry()
    jobs_spec = [(t, auditor.policy, 0) for t in TEXTS] + [(TEXTS[1], other, 0), (TEXTS[0], auditor.policy, 3), (TEXTS[3], None, 2)]

    async def scenario() -> tuple[list[object], int, bool]:
        batcher = MicroBatcher(auditor, max_wait_ms=50, max_tokens=4096, queue_size=16, metrics=AuditorMetrics(registry))
        assert batcher.hand_off is False  # the default on a CPU
        batcher.hand_off = hand_off
        await batcher.start()
        try:
            jobs = [batcher.audit([AuditInput(text=t)], e, top_k=k, n_tokens=20, timeout_s=60) for t, e, k in jobs_spec]
            # A group of its own (top_k 1) that fails: the others are answered.
            bad = batcher.audit(["not an input"], auditor.policy, top_k=1, n_tokens=3, timeout_s=60)  # type: ignore[list-item]
            results = await asyncio.gather(*jobs, bad, return_exceptions=True)
            return results, batcher.batches, batcher._host is not None
        finally:
            await batcher.stop()

    results, batches, host_thread = asyncio.run(scenario())
    assert batches == 1 and host_thread is hand_off
    assert isinstance(results[-1], Exception) and "AuditInput" in str(results[-1])
    tokens = 0
    for (text, engine, k), got in zip(jobs_spec, results[:-1]):
        assert not isinstance(got, BaseException), got
        [res] = got  # type: ignore[misc]
        [alone] = auditor.run([AuditInput(text=text)], top_k=k, policy=engine, evaluate=engine is not None)
        tokens += alone.n_content_tokens
        assert res.tokens == alone.tokens and [t.indices for t in res.top_features] == [t.indices for t in alone.top_features]
        if engine is None:
            assert res.verdict is None
            continue
        assert res.verdict.action == alone.verdict.action
        for rule, score in alone.verdict.scores.items():
            torch.testing.assert_close(res.verdict.scores[rule], score, rtol=1e-4, atol=1e-5)
    assert registry.get_sample_value("auditor_tokens_audited_total") == tokens
    # One stage observation per group that ran (the failing group's launch raised first).
    groups = len({(id(e), k) for _, e, k in jobs_spec})
    assert registry.get_sample_value("auditor_audit_stage_duration_seconds_count", {"stage": "evaluate"}) == groups


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_batches_are_built_off_the_worker_with_single_run_results_cuda(tmp_path: Path) -> None:
    from tests.unit.steering.conftest import tiny_auditor

    gpu = tiny_auditor(tmp_path, "cuda", """  - id: fraud-max
    severity: high
    category: deception
    condition: {feature: deception.fraud, agg: max, threshold: 0.01}
    actions: [alert]
""")
    engine = gpu.policy

    async def scenario() -> tuple[list[list[object]], bool]:
        batcher = MicroBatcher(gpu, max_wait_ms=50, max_tokens=4096, queue_size=32)
        await batcher.start()
        try:
            waves = []
            for wave in range(3):  # later waves queue while earlier ones are being built
                waves.append([batcher.audit([AuditInput(text=t * (wave + 1))], engine, top_k=2, n_tokens=60, timeout_s=60)
                              for t in TEXTS])
            results = await asyncio.gather(*(j for w in waves for j in w))
            return results, batcher.hand_off
        finally:
            await batcher.stop()

    results, hand_off = asyncio.run(scenario())
    assert hand_off  # the default on a GPU
    texts = [t * (wave + 1) for wave in range(3) for t in TEXTS]
    for text, [res] in zip(texts, results):
        [alone] = gpu.run([AuditInput(text=text)], top_k=2)
        assert res.tokens == alone.tokens and [t.indices for t in res.top_features] == [t.indices for t in alone.top_features]
        assert res.verdict.action == alone.verdict.action
        for rule, score in alone.verdict.scores.items():
            torch.testing.assert_close(res.verdict.scores[rule], score, rtol=1e-3, atol=1e-4)
