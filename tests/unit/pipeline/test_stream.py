"""Incremental (KV-cache) audits give the same result as one audit of the whole input."""

from __future__ import annotations

from pathlib import Path


import pytest
import torch
import transformers

from auditor.errors import ConfigError
from auditor.models import LoadedModel, capture, get_adapter
from auditor.pipeline import Auditor
from auditor.policy import PolicyEngine
from auditor.text import AuditInput
from tests.unit.steering.conftest import HOOKPOINT, LIBRARY_YAML, build_model, build_tokenizer, random_sae

POLICY = """apiVersion: auditor/v1
kind: Policy
metadata: {{name: stream-test}}
library: {library}
rules:
  - id: weather-max
    severity: medium
    category: topic
    scope: completion
    condition: {{feature: topic.weather, agg: max, threshold: 0.05}}
    actions: [alert]
  - id: sad-mean
    severity: low
    category: mood
    scope: any
    condition: {{feature: mood.sad, agg: mean, threshold: 0.01}}
    actions: [alert]
  - id: fraud-count
    severity: high
    category: deception
    scope: prompt
    condition: {{feature: deception.fraud, agg: count_above, above: 0.01, threshold: 2}}
    actions: [block]
"""

COMPLETION = "The sky was grey and the rain would not stop. We waited by the window, counting drops! " * 3


@pytest.fixture(scope="module")
def auditor(tmp_path_factory: pytest.TempPathFactory) -> Auditor:
    from auditor.policy import load_policy

    folder = tmp_path_factory.mktemp("stream")
    (folder / "library.yaml").write_text(LIBRARY_YAML)
    (folder / "policy.yaml").write_text(POLICY.format(library=folder / "library.yaml"))
    tok = build_tokenizer()
    model = build_model(len(tok))
    adapter = get_adapter(model)
    loaded = LoadedModel(
        model=model,
        tokenizer=tok,
        name="tiny-llama",
        adapter=adapter,
        d_model=adapter.d_model(model),
        n_layers=adapter.n_layers(model),
        device=torch.device("cpu"),
    )
    engine = load_policy(folder / "policy.yaml")
    return Auditor(loaded, random_sae(), hookpoint=HOOKPOINT, library=engine.library, policy=engine)


@pytest.fixture(scope="module")
def alone(auditor: Auditor) -> Auditor:
    """The same parts, each stream with its own transformers cache and forward."""
    return Auditor(auditor.model, auditor.sae, hookpoint=HOOKPOINT, library=auditor.library, policy=auditor.policy, shared_streams=False)


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _grown(item: AuditInput, so_far: str) -> AuditInput:
    if item.text is not None:
        return AuditInput(text=item.text + so_far)
    return AuditInput(messages=item.messages, prompt=item.prompt, completion=so_far)


def _same_verdict(got: object, want: object) -> None:
    assert got.tokens == want.tokens  # type: ignore[attr-defined]
    assert got.content_mask == want.content_mask  # type: ignore[attr-defined]
    gv, wv = got.verdict, want.verdict  # type: ignore[attr-defined]
    assert gv is not None and wv is not None
    assert gv.action == wv.action
    assert [m.rule_id for m in gv.matches] == [m.rule_id for m in wv.matches]
    keys = sorted(wv.scores)
    assert sorted(gv.scores) == keys
    torch.testing.assert_close(
        torch.tensor([gv.scores[k] for k in keys]), torch.tensor([wv.scores[k] for k in keys]), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("shared", [True, False], ids=["shared-forwards", "own-cache"])
@pytest.mark.parametrize(
    ("item", "chunk"),
    [
        (AuditInput(prompt="Tell me about the weather. "), 16),
        (AuditInput(prompt="Tell me about the weather. "), 1),
        (AuditInput(messages=({"role": "user", "content": "How was your day?"},)), 7),
        (AuditInput(text="Notes: "), 23),
    ],
)
def test_stream_matches_a_single_audit_after_every_chunk(
    auditor: Auditor, alone: Auditor, shared: bool, item: AuditInput, chunk: int
) -> None:
    auditor = auditor if shared else alone
    assert auditor.shared_stream_forwards is shared
    stream = auditor.stream(item)
    so_far = ""
    for piece in _chunks(COMPLETION, chunk)[:12]:
        so_far += piece
        got = stream.feed(piece)
        whole = AuditInput(text=item.text + so_far) if item.text is not None else AuditInput(
            messages=item.messages, prompt=item.prompt, completion=so_far
        )
        [want] = auditor.run([whole])
        assert got.tokens == want.tokens
        assert got.content_mask == want.content_mask
        assert got.verdict is not None and want.verdict is not None
        assert got.verdict.action == want.verdict.action
        assert [m.rule_id for m in got.verdict.matches] == [m.rule_id for m in want.verdict.matches]
        keys = sorted(want.verdict.scores)
        assert sorted(got.verdict.scores) == keys
        torch.testing.assert_close(
            torch.tensor([got.verdict.scores[k] for k in keys]),
            torch.tensor([want.verdict.scores[k] for k in keys]),
            rtol=1e-4,
            atol=1e-5,
        )
    # Only new tokens ran through the model: the cache holds exactly the sequence.
    assert stream.n_cached == len(got.tokens)


def test_streams_fed_together_share_one_forward_and_match_single_audits(auditor: Auditor, alone: Auditor) -> None:
    items = [
        AuditInput(prompt="Tell me about the weather. "),
        AuditInput(messages=({"role": "user", "content": "How was your day?"},)),
        AuditInput(text="Notes: "),
    ]
    # Chunk sizes differ (16 characters, 1, 23), and the streams run out at different rounds.
    plans = [_chunks(COMPLETION, 16)[:6], _chunks(COMPLETION, 1)[:9], _chunks(COMPLETION, 23)[:3]]
    streams = [auditor.stream(item) for item in items]
    solo = [alone.stream(item) for item in items]
    forwards = []
    handle = auditor.model.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        for r in range(max(len(p) for p in plans)):
            live = [i for i, plan in enumerate(plans) if r < len(plan)]
            before = len(forwards)
            results = auditor.feed_streams([(streams[i], plans[i][r]) for i in live])
            assert len(forwards) - before == 1  # one forward for every stream fed this round
            for i, got in zip(live, results):
                so_far = "".join(plans[i][: r + 1])
                [want] = auditor.run([_grown(items[i], so_far)])
                _same_verdict(got, want)
                _same_verdict(solo[i].feed(plans[i][r]), want)
                assert streams[i].n_cached == len(want.tokens)
    finally:
        handle.remove()


def test_streams_beyond_the_token_budget_split_into_several_forwards(auditor: Auditor) -> None:
    # batch_tokens=5: forwards of at most 20 new tokens (the packed budget is 4x).
    small = Auditor(auditor.model, auditor.sae, hookpoint=HOOKPOINT, library=auditor.library, policy=auditor.policy, batch_tokens=5)
    items = [AuditInput(text="Notes: "), AuditInput(text="Weather: "), AuditInput(text="Diary: ")]
    streams = [small.stream(item) for item in items]
    forwards: list[int] = []
    assert small.shared_stream_forwards  # decided (its check runs forwards) before counting
    handle = auditor.model.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        results = small.feed_streams([(s, COMPLETION[:12]) for s in streams])  # 3 x ~20 tokens
    finally:
        handle.remove()
    assert len(forwards) >= 2
    for item, got in zip(items, results):
        _same_verdict(got, auditor.run([_grown(item, COMPLETION[:12])])[0])


def test_streams_under_different_policies_are_fed_together(auditor: Auditor, tmp_path: Path) -> None:
    from auditor.policy import load_policy

    (tmp_path / "library.yaml").write_text(LIBRARY_YAML)
    (tmp_path / "policy.yaml").write_text(ANOMALY_POLICY.format(library=tmp_path / "library.yaml"))
    other = load_policy(tmp_path / "policy.yaml")
    item = AuditInput(prompt="Tell me about the weather. ")
    mine, theirs = auditor.stream(item), auditor.stream(item, policy=other)
    for piece in _chunks(COMPLETION, 20)[:3]:
        got_mine, got_theirs = auditor.feed_streams([(mine, piece), (theirs, piece)])
    whole = _grown(item, "".join(_chunks(COMPLETION, 20)[:3]))
    _same_verdict(got_mine, auditor.run([whole])[0])
    _same_verdict(got_theirs, auditor.run([whole], policy=other)[0])
    assert "odd" in got_theirs.verdict.scores and "odd" not in got_mine.verdict.scores  # type: ignore[union-attr]


def test_starting_a_stream_runs_nothing_until_its_first_feed(auditor: Auditor) -> None:
    # The server starts streams on its event loop; the model runs only on its workers, in feeds.
    fresh = Auditor(auditor.model, auditor.sae, hookpoint=HOOKPOINT, library=auditor.library, policy=auditor.policy)
    forwards: list[int] = []
    handle = auditor.model.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        stream = fresh.stream(AuditInput(prompt="Hi. "))
        assert forwards == [] and fresh._shared_streams is None
        stream.feed("there")
        assert forwards and fresh._shared_streams is True
    finally:
        handle.remove()


def test_feed_streams_refuses_a_stream_twice_or_from_another_auditor(auditor: Auditor, alone: Auditor) -> None:
    stream = auditor.stream(AuditInput(text="Notes: "))
    with pytest.raises(ValueError, match="same stream twice"):
        auditor.feed_streams([(stream, "a"), (stream, "b")])
    with pytest.raises(ValueError, match="another Auditor"):
        alone.feed_streams([(stream, "a")])
    assert auditor.feed_streams([]) == []
    # Nothing was appended by the refused calls.
    assert stream.feed("").tokens == auditor.run([AuditInput(text="Notes: ")])[0].tokens


def test_stream_first_feed_of_nothing_audits_the_prefix(auditor: Auditor) -> None:
    stream = auditor.stream(AuditInput(prompt="Tell me about the weather. "))
    got = stream.feed("")
    [want] = auditor.run([AuditInput(prompt="Tell me about the weather. ")])
    assert got.tokens == want.tokens
    assert got.verdict is not None and want.verdict is not None
    assert got.verdict.scores == pytest.approx(want.verdict.scores, rel=1e-4, abs=1e-5)


def test_stream_without_a_policy_is_a_config_error(auditor: Auditor) -> None:
    bare = Auditor(auditor.model, auditor.sae, hookpoint=HOOKPOINT)
    with pytest.raises(ConfigError, match="needs a policy"):
        bare.stream(AuditInput(text="x"))


def test_capture_with_a_cache_continues_the_sequence(auditor: Auditor) -> None:
    model = auditor.model.model
    ids = torch.randint(5, 60, (1, 40), generator=torch.Generator().manual_seed(3))
    [want] = capture(model, ids, None, [HOOKPOINT]).values()  # [1, 40, d]
    cache = transformers.DynamicCache(config=model.config)
    parts = [capture(model, ids[:, a:b], None, [HOOKPOINT], past_key_values=cache)[HOOKPOINT] for a, b in [(0, 9), (9, 10), (10, 40)]]
    torch.testing.assert_close(torch.cat(parts, dim=1), want, rtol=1e-4, atol=1e-5)
    # The truncated forward only filled the layers up to the hooked one.
    assert cache.get_seq_length() == 40


def test_stream_engine_override(auditor: Auditor) -> None:
    engine: PolicyEngine = auditor.policy  # type: ignore[assignment]
    stream = auditor.stream(AuditInput(prompt="Hi. "), policy=engine)
    assert stream.engine is engine


ANOMALY_POLICY = """apiVersion: auditor/v1
kind: Policy
metadata: {{name: anomaly-test}}
library: {library}
rules:
  - id: weather
    severity: low
    category: topic
    condition: {{feature: topic.weather, agg: max, threshold: 0.05}}
    actions: [alert]
  - id: odd
    severity: low
    category: anomaly
    condition:
      anomaly: {{threshold: 0.5}}
    actions: [annotate]
"""


@pytest.mark.parametrize(
    ("architecture", "normalize"),
    [("standard", "none"), ("topk", "none"), ("jumprelu", "expected_average_only_in"), ("topk", "layer_norm")],
)
def test_shared_encode_gives_the_reference_features_and_error(
    auditor: Auditor, tmp_path: Path, architecture: str, normalize: str
) -> None:
    from auditor.policy import load_policy

    (tmp_path / "library.yaml").write_text(LIBRARY_YAML)
    (tmp_path / "policy.yaml").write_text(ANOMALY_POLICY.format(library=tmp_path / "library.yaml"))
    engine = load_policy(tmp_path / "policy.yaml")
    assert engine.needs_recon_error
    sae = random_sae(architecture=architecture, normalize=normalize, seed=4)
    aud = Auditor(auditor.model, sae, hookpoint=HOOKPOINT, library=engine.library, policy=engine)
    x = torch.randn(50, sae.cfg.d_in, generator=torch.Generator().manual_seed(5)) * 3.0
    feats, recon, full = aud._encode_watched(x, engine)
    torch.testing.assert_close(feats, sae.encode(x)[:, engine.watched])
    assert recon is not None and full is None
    torch.testing.assert_close(recon, sae.reconstruction_error(x))
    feats, recon, full = aud._encode_watched(x, engine, full=True)
    assert full is not None
    torch.testing.assert_close(full, sae.encode(x))
    torch.testing.assert_close(feats, full[:, engine.watched])


def test_stream_under_a_residual_probe_keeps_the_activations_it_reads(auditor: Auditor, tmp_path: Path) -> None:
    """A hookpoint probe reads the residual stream, so its streams keep each token's activations
    (and still match a whole audit after every chunk); other policies' streams keep none."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from auditor.policy import load_policy
    from auditor.policy.probes import save_probe
    from tests.unit.steering.conftest import HIDDEN

    g = np.random.default_rng(0)
    save_probe(LogisticRegression().fit(g.normal(size=(40, HIDDEN)), g.integers(0, 2, 40)), tmp_path / "resid.json", inputs="hookpoint", pool="mean")
    assert auditor.policy is not None and auditor.policy.path is not None
    (tmp_path / "policy.yaml").write_text(
        f"""apiVersion: auditor/v1
kind: Policy
metadata: {{name: resid-probe}}
library: {Path(auditor.policy.path).parent / "library.yaml"}
rules:
  - id: resid-mean
    severity: medium
    category: topic
    scope: completion
    condition: {{probe: {{path: resid.json, threshold: 0.5}}}}
    actions: [alert]
"""
    )
    engine = load_policy(tmp_path / "policy.yaml")
    assert engine.needs_resid
    item = AuditInput(prompt="Tell me about the weather. ")
    probed, plain = auditor.stream(item, policy=engine), auditor.stream(item)
    so_far = ""
    for piece in _chunks(COMPLETION, 16)[:6]:
        so_far += piece
        got = probed.feed(piece)
        plain.feed(piece)
        [want] = auditor.run([_grown(item, so_far)], policy=engine)
        _same_verdict(got, want)
        assert probed._acts.shape == (probed.n_cached, HIDDEN)
        assert plain._acts.shape[0] == 0


def test_ordinary_threads_audit_and_feed_streams_on_one_auditor_at_once(auditor: Auditor) -> None:
    """Two threads that never called isolate_this_thread share the auditor: each audit's
    recording hook fires (and stops the forward) only in its own thread's forward."""
    import threading

    texts = {"a": COMPLETION, "b": "Send the fee now or the account closes. " * 4}
    want = {k: auditor.run([AuditInput(text=t)])[0].verdict.scores for k, t in texts.items()}
    got: dict[str, list[dict[str, float]]] = {k: [] for k in texts}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(key: str) -> None:
        try:
            start.wait()
            for _ in range(8):
                got[key].append(auditor.run([AuditInput(text=texts[key])])[0].verdict.scores)
            stream = auditor.stream(AuditInput(text=""))
            for i in range(0, len(texts[key]), 17):
                result = stream.feed(texts[key][i : i + 17])
            got[key].append(result.verdict.scores)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for key, runs in got.items():
        assert len(runs) == 9
        for scores in runs:
            assert scores.keys() == want[key].keys()
            assert all(abs(scores[r] - want[key][r]) < 1e-4 for r in scores), (key, scores, want[key])


def test_a_policy_for_another_sae_is_refused_by_run_stream_and_generate(auditor: Auditor, tmp_path: Path) -> None:
    """Passing a policy per call is checked like one given to the constructor (once per engine)."""
    from auditor.policy import load_policy
    from auditor.steering import generate
    from tests.unit.pipeline.test_fit import _library, _policy

    _library(tmp_path, d_sae=auditor.sae.cfg.d_sae + 1, hookpoint=HOOKPOINT)
    other = load_policy(_policy(tmp_path, "{feature: deception.fraud, threshold: 1.0}"))
    needle = f"which describes an SAE with {auditor.sae.cfg.d_sae + 1} latents"
    with pytest.raises(ConfigError, match=needle):
        auditor.run([AuditInput(text="hello")], policy=other)
    with pytest.raises(ConfigError, match=needle):
        auditor.stream(AuditInput(text=""), policy=other)
    with pytest.raises(ConfigError, match=needle):
        generate(auditor, AuditInput(prompt="hi"), max_tokens=1, policy=other)
    assert auditor.run([AuditInput(text="hello")], policy=auditor.policy)[0].verdict is not None


def test_an_sae_in_another_dtype_is_refused_with_how_to_load_it(auditor: Auditor) -> None:
    import copy

    half = copy.deepcopy(auditor.sae).half()
    with pytest.raises(ConfigError, match=r"the SAE's weights are float16; .*load_sae\(path, dtype='float32'\)"):
        Auditor(auditor.model, half, hookpoint=HOOKPOINT)
