"""The feature index: merging against a brute-force reference, files, resuming, the corpus reader."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from auditor.errors import FeatureIndexError
from auditor.text import AuditInput
from auditor.viewer.index import (
    SAE_FINGERPRINT,
    FeatureIndex,
    IndexConfig,
    build_index,
    json_path_for,
    load_index,
    read_corpus,
    sae_fingerprint,
)

D = 6
PAD = 2


def _docs(seed: int, n: int, d: int = D) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Random documents: activations ``[T, d]`` (sparse, rounded so equal values occur), ids ``[T]``, content mask."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        t = int(torch.randint(2, 12, (1,), generator=gen))
        feats = (torch.randn(t, d, generator=gen) * 3 - 2).clamp(min=0).round(decimals=1)
        ids = torch.randint(10, 60, (t,), generator=gen)
        mask = torch.ones(t, dtype=torch.bool)
        mask[0] = False  # the sink position is never content
        docs.append((feats, ids, mask))
    return docs


def _batch(docs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad documents into ``[B, T, d]``, ``[B, T]``, ``[B, T]``."""
    t = max(f.shape[0] for f, _, _ in docs)
    d = docs[0][0].shape[1]
    feats = torch.zeros(len(docs), t, d)
    ids = torch.full((len(docs), t), PAD)
    mask = torch.zeros(len(docs), t, dtype=torch.bool)
    for b, (f, i, m) in enumerate(docs):
        feats[b, : f.shape[0]] = f
        ids[b, : i.shape[0]] = i
        mask[b, : m.shape[0]] = m
    return feats, ids, mask


def _index(docs: list, sizes: list[int], cfg: IndexConfig) -> FeatureIndex:
    index = FeatureIndex.empty(D, cfg, {"sae": "test"})
    start = 0
    for size in sizes:
        index.add(*_batch(docs[start : start + size]))
        start += size
    return index


def _reference(docs: list, cfg: IndexConfig) -> dict[str, object]:
    """Top contexts, windows and statistics by plain loops over documents and latents."""
    edges = cfg.edges().numpy()
    out: dict[str, object] = {"top": [], "hist": [], "active": [], "max": [], "sum": [], "tokens": 0}
    masked = [(f * m.unsqueeze(1), i, m) for f, i, m in docs]
    out["tokens"] = sum(int(m.sum()) for _, _, m in docs)
    for lat in range(D):
        cands = []
        for doc, (f, ids, m) in enumerate(masked):
            col = f[:, lat].tolist()
            best = max(col)
            if best > 0:
                peak = col.index(best)
                window = []
                for p in range(peak - cfg.before, peak + cfg.after + 1):
                    inside = 0 <= p < len(col) and bool(m[p])
                    window.append((int(ids[p]) if inside else -1, col[p] if inside else 0.0))
                cands.append((-best, doc, window))
        cands.sort(key=lambda c: (c[0], c[1]))  # strongest first, earlier document on ties
        out["top"].append([(-c[0], c[1], c[2]) for c in cands[: cfg.contexts]])
        vals = np.array([v for f, _, _ in masked for v in f[:, lat].tolist() if v > 0])
        out["hist"].append(np.histogram(np.clip(vals, edges[0], edges[-1]), bins=edges)[0].tolist())
        out["active"].append(len(vals))
        out["max"].append(float(vals.max()) if len(vals) else 0.0)
        out["sum"].append(float(vals.sum()))
    return out


def _check_against_reference(index: FeatureIndex, ref: dict[str, object]) -> None:
    cfg = index.config
    for lat in range(D):
        top = ref["top"][lat]  # type: ignore[index]
        n = len(top)
        assert index.top_doc[lat, :n].tolist() == [doc for _, doc, _ in top]
        assert (index.top_doc[lat, n:] == -1).all() and torch.isinf(index.top_acts[lat, n:]).all()
        torch.testing.assert_close(index.top_acts[lat, :n], torch.tensor([a for a, _, _ in top]))
        for slot, (_, _, window) in enumerate(top):
            assert index.top_tokens[lat, slot].tolist() == [i for i, _ in window]
            torch.testing.assert_close(index.top_token_acts[lat, slot], torch.tensor([a for _, a in window]))
        assert (index.top_tokens[lat, n:] == -1).all()
    assert index.hist.tolist() == ref["hist"]
    assert index.active.tolist() == ref["active"]
    torch.testing.assert_close(index.max_act, torch.tensor(ref["max"]))
    torch.testing.assert_close(index.sum_act, torch.tensor(ref["sum"], dtype=torch.float64))
    assert index.tokens_seen == ref["tokens"]
    assert index.top_tokens.shape[-1] == cfg.window


@pytest.mark.parametrize(
    "sizes",
    [[12], [1] * 12, [5, 7], [3, 3, 3, 3], [11, 1]],
)
def test_merging_batches_matches_the_reference(sizes: list[int]) -> None:
    cfg = IndexConfig(contexts=3, before=2, after=1, bins=12, bin_min=0.1, bin_max=10.0)
    docs = _docs(seed=7, n=12)
    index = _index(docs, sizes, cfg)
    assert index.docs_done == 12
    _check_against_reference(index, _reference(docs, cfg))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(1, 5), min_size=1, max_size=6), contexts=st.integers(1, 5))
def test_any_split_into_batches_gives_the_same_contexts(seed: int, cuts: list[int], contexts: int) -> None:
    cfg = IndexConfig(contexts=contexts, before=3, after=2, bins=8, bin_min=0.05, bin_max=20.0)
    docs = _docs(seed=seed, n=sum(cuts))
    split = _index(docs, cuts, cfg)
    whole = _index(docs, [len(docs)], cfg)
    for name in ("top_doc", "top_tokens", "hist", "active"):
        assert torch.equal(getattr(split, name), getattr(whole, name)), name
    torch.testing.assert_close(split.top_acts, whole.top_acts)
    torch.testing.assert_close(split.top_token_acts, whole.top_token_acts)


def test_latent_summary_and_histogram_range() -> None:
    cfg = IndexConfig(contexts=2, before=2, after=1, bins=12, bin_min=0.1, bin_max=10.0)
    docs = _docs(seed=3, n=8)
    index = _index(docs, [8], cfg)
    index.token_text = {i: f"t{i}" for i in range(100)}
    ref = _reference(docs, cfg)
    lat = max(range(D), key=lambda i: ref["active"][i])  # type: ignore[index]
    s = index.latent(lat)
    assert s.active_tokens == ref["active"][lat]  # type: ignore[index]
    assert s.density == pytest.approx(ref["active"][lat] / ref["tokens"])  # type: ignore[index, operator]
    assert s.mean_activation == pytest.approx(ref["sum"][lat] / ref["active"][lat])  # type: ignore[index, operator]
    counts = [c for _, _, c in s.histogram]
    assert sum(counts) == s.active_tokens and counts[0] > 0 and counts[-1] > 0
    first = s.contexts[0]
    window = ref["top"][lat][0][2]  # type: ignore[index]
    assert first.tokens == [(f"t{i}", round(a, 4)) for i, a in window if i != -1]
    assert first.tokens[first.peak][1] == pytest.approx(first.max_activation)
    with pytest.raises(FeatureIndexError, match="latent 6 is out of range"):
        index.latent(D)


def test_a_latent_that_never_fires_has_no_contexts() -> None:
    index = FeatureIndex.empty(D, IndexConfig(contexts=2), {})
    feats, ids, mask = _batch(_docs(seed=1, n=3))
    feats[..., 4] = 0.0
    index.add(feats, ids, mask)
    s = index.latent(4)
    assert s.contexts == [] and s.histogram == [] and s.density == 0.0 and s.mean_activation == 0.0


def test_add_rejects_another_width() -> None:
    index = FeatureIndex.empty(D, IndexConfig(), {})
    feats, ids, mask = _batch(_docs(seed=1, n=2, d=D + 1))
    with pytest.raises(FeatureIndexError, match="7 latents but the index has 6"):
        index.add(feats, ids, mask)


# ---------------------------------------------------------------- files


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cfg = IndexConfig(contexts=3, before=2, after=2)
    index = _index(_docs(seed=5, n=9), [4, 5], cfg)
    index.token_text = {11: " the", 12: "é"}
    path = tmp_path / "feature_index.safetensors"
    index.save(path)
    back = load_index(path)
    assert back.config == cfg and back.meta == index.meta and back.docs_done == 9
    assert back.tokens_seen == index.tokens_seen and back.token_text == index.token_text
    for name in ("top_doc", "top_tokens", "hist", "active"):
        assert torch.equal(getattr(back, name), getattr(index, name)), name
    # Activations are stored in float16.
    finite = torch.isfinite(index.top_acts)
    assert torch.equal(torch.isfinite(back.top_acts), finite)
    torch.testing.assert_close(back.top_acts[finite], index.top_acts[finite], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(back.top_token_acts, index.top_token_acts, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(back.sum_act, index.sum_act)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_json", "no feature index here"),
        ("bad_format", "unknown index format"),
        ("progress", "disagree on progress"),
        ("not_json", "not a readable feature index"),
        ("missing_key", "the index is incomplete"),
    ],
)
def test_load_reports_damaged_files(tmp_path: Path, damage: str, message: str) -> None:
    path = tmp_path / "idx.safetensors"
    _index(_docs(seed=2, n=4), [4], IndexConfig(contexts=2)).save(path)
    side_path = json_path_for(path)
    side = json.loads(side_path.read_text())
    if damage == "no_json":
        side_path.unlink()
    elif damage == "not_json":
        side_path.write_text("{")
    else:
        if damage == "bad_format":
            side["format"] = "other/9"
        elif damage == "progress":
            side["docs_done"] = 99
        elif damage == "missing_key":
            del side["config"]
        side_path.write_text(json.dumps(side))
    with pytest.raises(FeatureIndexError, match=message):
        load_index(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"contexts": 0}, "contexts must be at least 1"),
        ({"before": -1}, "window sizes must be >= 0"),
        ({"max_tokens": 1}, "max_tokens must be at least 2"),
        ({"bins": 0}, "histogram needs"),
        ({"bin_min": 5.0, "bin_max": 1.0}, "histogram needs"),
    ],
)
def test_config_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(FeatureIndexError, match=message):
        IndexConfig(**kwargs).check()  # type: ignore[arg-type]


def test_histogram_edges_are_log_spaced() -> None:
    edges = IndexConfig(bins=4, bin_min=0.01, bin_max=100.0).edges()
    torch.testing.assert_close(edges, torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0], dtype=torch.float64))
    assert math.isclose(float(edges[0]), 0.01)


# ---------------------------------------------------------------- the corpus


def test_read_corpus_accepts_texts_and_chats(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"text": "hello", "source": "x"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
        + json.dumps({"prompt": "a", "completion": "b", "id": "7"}) + "\n"
    )
    docs = list(read_corpus(path))
    assert [d.text for d in docs] == ["hello", None, None]
    assert docs[1].messages is not None and docs[2].completion == "b"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{not json\n', r"c.jsonl:2: not valid JSON"),
        (
            '{"text": "ok"}\n{"source": "only"}\n',
            r"c.jsonl:2: give exactly one of 'text', 'messages' or 'prompt' \(found none\); other keys are ignored, "
            r"and this line has 'source'$",
        ),
        ('{"txt": "wrong key"}\n', r"c.jsonl:1: give exactly one of .*this line has 'txt'$"),
        ('{"text": "a", "prompt": "b"}\n', r"c.jsonl:1: give exactly one of 'text', 'messages' or 'prompt' \(found \['text', 'prompt'\]\)$"),
        ("[1, 2]\n", r"c.jsonl:1: expected a JSON object"),
    ],
)
def test_read_corpus_names_the_bad_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(FeatureIndexError, match=message) as caught:
        list(read_corpus(path))
    assert str(caught.value).count("c.jsonl:") == 1  # the place once, not doubled


def test_read_corpus_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FeatureIndexError, match="corpus file not found"):
        list(read_corpus(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------- building with a model

TEXTS = [
    "the cat sat on the mat",
    "send the fee today!",
    "a quiet morning by the sea",
    "win a prize, claim it now",
    "numbers 1 2 3 and 42",
    "it's raining again",
    "hello world",
    "the bank called about your account",
    "bread, milk and eggs",
    "fast cars and slow boats",
    "Who wrote this?",
    "ok",
]


def _items() -> list[AuditInput]:
    return [AuditInput(text=t) for t in TEXTS]


def test_build_index_matches_the_pipeline_encoding(tiny_auditor) -> None:  # type: ignore[no-untyped-def]
    cfg = IndexConfig(contexts=3, before=3, after=1)
    index = build_index(tiny_auditor, _items(), config=cfg, batch_docs=5, meta={"sae": "tiny"})
    assert index.docs_done == len(TEXTS) and index.meta["hookpoint"] == "blocks.1.hook_resid_post"
    # Reference: each document alone through the same model and SAE.
    from auditor.text import tokenize_batch

    docs = []
    for item in _items():
        batch = tokenize_batch(tiny_auditor.model.tokenizer, [item], max_tokens=cfg.max_tokens)
        acts = tiny_auditor.activations(batch)[0]  # [T, d_in]
        mask = batch.content_mask[0]
        feats = torch.zeros(acts.shape[0], tiny_auditor.sae.cfg.d_sae)
        feats[mask] = tiny_auditor.sae.encode(acts[mask])
        docs.append((feats, batch.input_ids[0], mask))
    ref = _reference_wide(docs, cfg)
    assert index.tokens_seen == ref["tokens"]
    assert index.active.tolist() == ref["active"]
    assert index.top_doc.tolist() == ref["top_doc"]
    torch.testing.assert_close(index.max_act, torch.tensor(ref["max"]), rtol=1e-4, atol=1e-5)
    # Every kept token id has its text (one character per token here).
    ids = {i for i in index.top_tokens.flatten().tolist() if i != -1}
    assert ids and ids <= set(index.token_text) and all(len(index.token_text[i]) == 1 for i in ids)


def _reference_wide(docs: list, cfg: IndexConfig) -> dict[str, object]:
    d = docs[0][0].shape[1]
    top_doc, active, mx = [], [], []
    for lat in range(d):
        cands = sorted(
            ((-float(f[:, lat].max()), doc) for doc, (f, _, _) in enumerate(docs) if float(f[:, lat].max()) > 0),
        )
        # Near-equal maxima from different documents are not expected with random weights.
        row = [doc for _, doc in cands[: cfg.contexts]]
        top_doc.append(row + [-1] * (cfg.contexts - len(row)))
        active.append(sum(int((f[:, lat] > 0).sum()) for f, _, _ in docs))
        mx.append(max(float(f[:, lat].max()) for f, _, _ in docs))
    return {"top_doc": top_doc, "active": active, "max": mx, "tokens": sum(int(m.sum()) for _, _, m in docs)}


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_corpus_makes_no_index(tiny_auditor, tmp_path: Path, content: str) -> None:  # type: ignore[no-untyped-def]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(content)
    out = tmp_path / "idx.safetensors"
    with pytest.raises(FeatureIndexError, match="no documents to index: the corpus is empty"):
        build_index(tiny_auditor, read_corpus(corpus), out=out)
    assert not out.exists() and not json_path_for(out).exists()


def test_resuming_gives_the_same_index_as_one_pass(tiny_auditor, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = IndexConfig(contexts=3, before=2, after=2)
    one = build_index(tiny_auditor, _items(), out=tmp_path / "one.safetensors", config=cfg, batch_docs=4)
    part = tmp_path / "part.safetensors"
    first = build_index(tiny_auditor, _items(), out=part, max_docs=4, config=cfg, batch_docs=4)
    assert first.docs_done == 4 and load_index(part).docs_done == 4
    seen: list[int] = []
    resumed = build_index(tiny_auditor, _items(), out=part, config=cfg, batch_docs=4, progress=seen.append)
    assert seen == [8, 12]  # only the documents after the checkpoint were run
    a, b = load_index(tmp_path / "one.safetensors"), load_index(part)
    assert resumed.docs_done == one.docs_done == 12
    for name in ("top_doc", "top_tokens", "hist", "active", "top_acts", "top_token_acts", "max_act", "sum_act"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.tokens_seen == b.tokens_seen and a.token_text == b.token_text


def test_checkpoints_are_written_while_indexing(tiny_auditor, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "idx.safetensors"
    progress: list[int] = []

    def record(done: int) -> None:
        progress.append(load_index(out).docs_done if out.is_file() else 0)

    build_index(tiny_auditor, _items(), out=out, config=IndexConfig(contexts=2), batch_docs=3, checkpoint_every=2, progress=record)
    # record() runs before the checkpoint of its batch: saved after batches 2 and 4.
    assert progress == [0, 0, 6, 6]
    assert load_index(out).docs_done == 12


def _retrained(auditor):  # type: ignore[no-untyped-def]
    """The same model with an SAE of the same shape and name but other weights (retrained in place)."""
    from auditor.pipeline import Auditor
    from auditor.sae import SAE

    tensors = {k: v.clone() for k, v in auditor.sae.tensors().items()}
    tensors["b_enc"][0] += 0.01
    return Auditor(auditor.model, SAE.from_tensors(auditor.sae.cfg, tensors), hookpoint=auditor.hookpoint)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"config": IndexConfig(contexts=5)}, "it was built with"),
        ({"retrained": True}, r"it was built from other SAE weights \(sha256 [0-9a-f]{12}, this SAE's is [0-9a-f]{12}\)"),
        ({"meta": {"sae": "tiny", "corpus": "other.jsonl"}}, "its corpus is 'c.jsonl', this run's is 'other.jsonl'"),
    ],
)
def test_resume_refuses_a_different_index(tiny_auditor, tmp_path: Path, change: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "idx.safetensors"
    meta = {"sae": "tiny", "corpus": "c.jsonl"}
    build_index(tiny_auditor, _items()[:2], out=out, config=IndexConfig(contexts=2), meta=meta, batch_docs=2)
    auditor = _retrained(tiny_auditor) if "retrained" in change else tiny_auditor
    kwargs = {"config": IndexConfig(contexts=2), "meta": meta, **{k: v for k, v in change.items() if k != "retrained"}}
    with pytest.raises(FeatureIndexError, match=message):
        build_index(auditor, _items(), out=out, batch_docs=2, **kwargs)
    # --restart (resume=False) starts over.
    again = build_index(auditor, _items(), out=out, batch_docs=2, resume=False, **kwargs)
    assert again.docs_done == len(TEXTS) and again.meta[SAE_FINGERPRINT] == sae_fingerprint(auditor.sae)


def test_resume_checks_the_weights_not_the_path(tiny_auditor, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "idx.safetensors"
    build_index(tiny_auditor, _items()[:4], out=out, meta={"sae": "my-sae"}, batch_docs=2)
    # The same SAE named by another path (absolute instead of relative) continues the index.
    resumed = build_index(tiny_auditor, _items(), out=out, meta={"sae": str(tmp_path / "my-sae")}, batch_docs=2)
    assert resumed.docs_done == len(TEXTS) and resumed.meta["sae"] == "my-sae"
    assert load_index(out).meta[SAE_FINGERPRINT] == sae_fingerprint(tiny_auditor.sae)


def test_resume_of_an_index_without_fingerprint_checks_the_name(tiny_auditor, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "idx.safetensors"
    build_index(tiny_auditor, _items()[:4], out=out, meta={"sae": "tiny"}, batch_docs=2)
    # As written before fingerprints: the same files without the sae_sha256 meta key.
    side = json_path_for(out)
    data = json.loads(side.read_text())
    del data["meta"][SAE_FINGERPRINT]
    side.write_text(json.dumps(data))
    assert SAE_FINGERPRINT not in load_index(out).meta
    with pytest.raises(FeatureIndexError, match="its sae is 'tiny', this run's is 'other'"):
        build_index(tiny_auditor, _items(), out=out, meta={"sae": "other"}, batch_docs=2)
    resumed = build_index(_retrained(tiny_auditor), _items(), out=out, meta={"sae": "tiny"}, batch_docs=2)
    assert resumed.docs_done == len(TEXTS)
    # Its first documents came from unknown weights: it is not stamped with this SAE's fingerprint.
    assert SAE_FINGERPRINT not in load_index(out).meta


def test_sae_fingerprint_names_the_weights(tiny_auditor, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from auditor.sae import load_sae

    sae = tiny_auditor.sae
    fp = sae_fingerprint(sae)
    assert len(fp) == 64 and int(fp, 16) >= 0
    folder = sae.save(tmp_path / "saved")
    # The same weights read back from disk, by a relative or an absolute path, in another dtype.
    assert sae_fingerprint(load_sae(str(folder))) == fp
    assert sae_fingerprint(load_sae(os.path.relpath(folder))) == fp
    assert sae_fingerprint(load_sae(str(folder), dtype="float64")) == fp
    assert sae_fingerprint(_retrained(tiny_auditor).sae) != fp


def test_the_shipped_index_names_the_shipped_sae() -> None:
    from auditor.features import load_library
    from auditor.sae import load_sae
    from auditor.viewer.index import index_path_for

    lib = load_library("smollm2-135m-instruct")
    index = load_index(index_path_for(lib))
    sae = load_sae(str(lib.resolve_path(lib.sae.path or "")), dtype="float32")
    assert index.d_sae == sae.cfg.d_sae and index.meta["sae"] == lib.sae.id
    assert index.meta[SAE_FINGERPRINT] == sae_fingerprint(sae)
