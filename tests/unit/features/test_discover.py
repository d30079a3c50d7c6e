"""Labelled data, the split, pooled features and contrastive discovery."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from auditor.errors import DatasetError
from auditor.features.discover import auroc_columns, context_snippet, discover, tpr_at_fpr
from auditor.features.labelled import (
    BENIGN,
    HELDOUT,
    TRAIN,
    LabelledRow,
    assign_split,
    cached_pooled,
    check_split,
    extract_pooled,
    load_labelled,
    split_counts,
)
from tests.conftest import make_random_sae
from tests.unit.features._synthetic import SIGNAL, planted_latent, synthetic, tiny_model_dir

# ---------------------------------------------------------------- AUROC and TPR at a fixed FPR


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_columns_match_sklearn_with_ties(seed: int) -> None:
    g = np.random.default_rng(seed)
    pos = np.round(g.normal(0.5, 1.0, (40, 6)), 1)  # rounding makes ties
    neg = np.round(g.normal(0.0, 1.0, (55, 6)), 1)
    pos[:, 5] = neg[0, 5] = 0.0
    neg[:, 5] = 0.0  # a constant column
    got = auroc_columns(pos, neg)
    y = np.r_[np.ones(40), np.zeros(55)]
    want = [roc_auc_score(y, np.r_[pos[:, j], neg[:, j]]) for j in range(6)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got[5] == 0.5


@pytest.mark.parametrize(
    ("pos", "neg"),
    [(np.zeros((0, 2)), np.zeros((3, 2))), (np.zeros((3, 2)), np.zeros((3, 1))), (np.zeros(3), np.zeros(3))],
)
def test_auroc_columns_rejects_bad_shapes(pos: np.ndarray, neg: np.ndarray) -> None:
    with pytest.raises(ValueError):
        auroc_columns(pos, neg)


@settings(max_examples=60, deadline=None)
@given(
    pos=st.lists(st.integers(0, 20), min_size=1, max_size=30),
    neg=st.lists(st.integers(0, 20), min_size=1, max_size=60),
    fpr=st.sampled_from([0.0, 0.05, 0.1, 0.5]),
)
def test_tpr_at_fpr_is_the_best_allowed_threshold(pos: list[int], neg: list[int], fpr: float) -> None:
    p, n = np.array(pos, float), np.array(neg, float)
    tpr, thr = tpr_at_fpr(p, n, fpr)
    assert (n >= thr).mean() <= fpr + 1e-12
    assert tpr == (p >= thr).mean()
    # Brute force over every threshold that keeps the FPR within budget.
    cands = [t for t in np.r_[p, n, np.inf] if (n >= t).mean() <= fpr + 1e-12]
    assert tpr == max((p >= t).mean() for t in cands)


# ---------------------------------------------------------------- loading and splitting


def _write(folder: Path, name: str, rows: list[dict[str, object]] | str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = rows if isinstance(rows, str) else "\n".join(json.dumps(r) for r in rows) + "\n"
    (folder / name).write_text(text, encoding="utf-8")


BENIGN_ROW = {"id": "b1", "category": "benign", "kind": "prompt", "text": "hello"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "must be a JSON object"),
        ('{"id": "x1", "category": "bias"}', "missing or empty string field(s): text"),
        ('{"id": "x1", "category": "bias", "text": ""}', "missing or empty"),
        ('{"id": "x1", "category": "bias", "text": "t", "kind": "answer"}', "kind must be one of"),
        ('{"id": "b1", "category": "bias", "text": "t"}', "duplicate id 'b1'"),
    ],
)
def test_load_labelled_reports_bad_rows(tmp_path: Path, content: str, message: str) -> None:
    _write(tmp_path, "a.jsonl", [BENIGN_ROW])
    _write(tmp_path, "b.jsonl", content + "\n")
    with pytest.raises(DatasetError, match="b.jsonl:1") as exc:
        load_labelled(tmp_path)
    assert message in exc.value.message


def test_load_labelled_needs_benign_rows_and_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder"):
        load_labelled(tmp_path / "missing")
    _write(tmp_path, "bias.jsonl", [{"id": "x", "category": "bias", "text": "t"}])
    with pytest.raises(DatasetError, match="no rows with category 'benign'"):
        load_labelled(tmp_path)


def test_load_labelled_reads_fields(tmp_path: Path) -> None:
    _write(tmp_path, "b.jsonl", [BENIGN_ROW, {"id": "x", "category": "bias", "kind": "completion", "text": "t", "near_miss": True, "topic": "jobs"}])
    rows = load_labelled(tmp_path)
    assert rows[1] == LabelledRow("x", "bias", "completion", "t", True, "jobs", f"{tmp_path / 'b.jsonl'}:2")


def _rows(n: int, category: str, kind: str = "prompt") -> list[LabelledRow]:
    return [LabelledRow(f"{category}-{kind}-{i}", category, kind, "t") for i in range(n)]


def test_split_is_stratified_deterministic_and_stable() -> None:
    rows = _rows(50, "bias") + _rows(21, "bias", "completion") + _rows(100, "benign") + _rows(3, "privacy")
    split = assign_split(rows)
    assert split == assign_split(list(reversed(rows)))
    counts = {(r.category, r.kind): 0 for r in rows}
    for r in rows:
        counts[(r.category, r.kind)] += split[r.id] == HELDOUT
    assert counts == {("bias", "prompt"): 15, ("bias", "completion"): 6, ("benign", "prompt"): 30, ("privacy", "prompt"): 1}
    # Adding a group leaves every other row where it was.
    more = assign_split(rows + _rows(40, "deception"))
    assert all(more[r.id] == split[r.id] for r in rows)
    assert assign_split(rows, salt="other") != split
    c = split_counts(rows, split)
    assert c["bias"] == {"train": 50, "heldout": 21, "prompt": 50, "completion": 21, "near_miss": 0}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2])
def test_split_rejects_bad_fractions(fraction: float) -> None:
    with pytest.raises(DatasetError, match="held-out fraction"):
        assign_split(_rows(3, "benign"), heldout=fraction)


# ---------------------------------------------------------------- discovery on planted data


@pytest.mark.parametrize("category", ["bias", "deception"])
def test_discover_finds_the_planted_latent(category: str) -> None:
    rows, pooled = synthetic()
    split = assign_split(rows)
    cands = discover(pooled, rows, split, category, top=5, n_contexts=3)
    best = cands[0]
    assert best.index == planted_latent(category) and best.auroc > 0.85
    assert best.top_tokens[0][0] == SIGNAL[category]
    assert all(f"[[ {SIGNAL[category]}]]" in c for c in best.contexts)
    # Latent 1 separates perfectly but by being silent on the category: never proposed.
    assert 1 not in [c.index for c in cands]
    # The other category's planted latent is less specific than this one's.
    assert best.auroc_other is not None and best.auroc_other > 0.8
    assert [c.auroc for c in cands] == sorted((c.auroc for c in cands), reverse=True)
    assert planted_latent(category) not in [c.index for c in discover(pooled, rows, split, category, exclude=[best.index])]


def test_discover_needs_rows_of_the_category() -> None:
    rows, pooled = synthetic()
    with pytest.raises(DatasetError, match="no train rows of category 'privacy'"):
        discover(pooled, rows, assign_split(rows), "privacy")


def test_context_snippet_marks_the_token() -> None:
    toks = ["<s>", "A", " quick", " brown\n", " fox", " jumps"]
    assert context_snippet(toks, 3, before=1, after=1) == "quick[[ brown ]] fox"
    assert context_snippet(toks, 1) == "[[A]] quick brown fox jumps"


# ---------------------------------------------------------------- pooled features from a real (tiny) model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    model_dir = tiny_model_dir(root / "model")
    sae_dir = make_random_sae(root / "sae", d_in=32, d_sae=48, hookpoint="blocks.1.hook_resid_post", architecture="topk")
    make_random_sae(root / "sae2", d_in=32, d_sae=40, hookpoint="blocks.2.hook_resid_post", seed=1)
    return model_dir, sae_dir


TEXTS = ["the cat sat on a bomb", "lovely weather today", "scam", "the cat sat on the mat and then ran home fast today ."]


def test_extract_pooled_matches_per_text_encoding(tiny: tuple[Path, Path]) -> None:
    from auditor.models import load_model
    from auditor.pipeline import Auditor
    from auditor.sae import load_sae
    from auditor.text import AuditInput, tokenize_batch

    model_dir, sae_dir = tiny
    model = load_model(str(model_dir))
    sae = load_sae(str(sae_dir), dtype=torch.float32)
    sae2 = load_sae(str(sae_dir.parent / "sae2"), dtype=torch.float32)
    # A small token budget forces several length buckets with padding.
    got = extract_pooled(model, {"a": sae, "b": sae2}, TEXTS, ["0", "1", "2", "3"], batch_tokens=16)
    for name, s in (("a", sae), ("b", sae2)):
        aud = Auditor(model, s)
        p = got[name]
        assert p.hookpoint == s.cfg.metadata.hook_name
        for i, text in enumerate(TEXTS):
            batch = tokenize_batch(model.tokenizer, [AuditInput(text=text)])
            x = aud.activations(batch)[0][batch.content_mask[0]]  # [n, d_in]
            f = s.encode(x)  # [n, d_sae]
            # Padded batches and a lone row differ by float32 rounding in attention.
            tol = {"rtol": 1e-4, "atol": 1e-4}
            torch.testing.assert_close(p.max[i], f.amax(0), **tol)
            torch.testing.assert_close(p.mean[i], f.mean(0), **tol)
            torch.testing.assert_close(p.resid_mean[i], x.mean(0), **tol)
            torch.testing.assert_close(p.recon_of([i]), s.reconstruction_error(x), **tol)
            assert p.tokens[i] == batch.tokens[0]
            on = f.amax(0) > 0
            first = int(batch.content_mask[0].nonzero()[0])
            torch.testing.assert_close(p.argmax[i][on].long(), f.argmax(0)[on] + first)
            assert bool((p.argmax[i][~on] == -1).all())


def test_cached_pooled_reads_back_without_the_model(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    from auditor.errors import ModelError

    model_dir, sae_dir = tiny
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    cache = tmp_path / "cache"
    rows = [LabelledRow(str(i), "benign", "prompt", t) for i, t in enumerate(TEXTS)]
    first = cached_pooled(rows, [("a", sae_dir)], model_name=str(copy), cache_dir=cache)["a"]
    assert len(list(cache.glob("*.pt"))) == 1
    # With the model gone, only the cache can answer.
    shutil.rmtree(copy)
    again = cached_pooled(rows, [("a", sae_dir)], model_name=str(copy), cache_dir=cache)["a"]
    torch.testing.assert_close(again.max, first.max)
    torch.testing.assert_close(again.recon, first.recon)
    assert again.tokens == first.tokens and again.ids == first.ids
    # Changed data is a different cache entry, so the missing model is needed (and missed) again.
    changed = [*rows[:-1], LabelledRow("3", "benign", "prompt", "scam scam")]
    with pytest.raises(ModelError):
        cached_pooled(changed, [("a", sae_dir)], model_name=str(copy), cache_dir=cache)
    # So is another model dtype: bfloat16 features are not the float32 ones.
    with pytest.raises(ModelError):
        cached_pooled(rows, [("a", sae_dir)], model_name=str(copy), cache_dir=cache, dtype="bfloat16")


def test_cached_pooled_in_bfloat16_is_its_own_entry(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, sae_dir = tiny
    cache = tmp_path / "cache"
    rows = [LabelledRow(str(i), "benign", "prompt", t) for i, t in enumerate(TEXTS)]
    full = cached_pooled(rows, [("a", sae_dir)], model_name=str(model_dir), cache_dir=cache)["a"]
    low = cached_pooled(rows, [("a", sae_dir)], model_name=str(model_dir), cache_dir=cache, dtype="bfloat16")["a"]
    assert len(list(cache.glob("*.pt"))) == 2
    assert low.tokens == full.tokens and not torch.equal(low.max, full.max)
    # Close, not equal: a latent near the top-k boundary may swap in or out in bfloat16.
    close = (low.max - full.max).abs() <= 0.1 + 0.1 * full.max.abs()
    assert close.float().mean() > 0.9


def test_load_labelled_says_a_file_is_not_the_folder(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text(json.dumps({"id": "a", "category": "benign", "text": "x"}) + "\n")
    with pytest.raises(DatasetError, match=f"this is a file; give the data set's folder.*here {tmp_path}"):
        load_labelled(tmp_path / "rows.jsonl")


def test_check_split_only_looks_at_the_categories_in_use() -> None:
    rows = [LabelledRow(f"{c}-{i}", c, "prompt", "t") for c, n in (("bias", 10), ("rare", 1), (BENIGN, 10)) for i in range(n)]
    split = assign_split(rows)
    with pytest.raises(DatasetError, match=re.escape("categories rare have a single row")):
        check_split(rows, split, 0.3)
    assert check_split(rows, split, 0.3, categories=["bias"]) == []
    assert check_split(rows, split, 0.3, need=(TRAIN,)) == []
    with pytest.raises(DatasetError, match="holds out no row of rare"):
        check_split(rows, split, 0.3, need=(HELDOUT,))


@pytest.mark.parametrize("bad", [-3, 24, 99999])
def test_latents_outside_the_sae_are_refused_not_wrapped(bad: int) -> None:
    from auditor.errors import ConfigError
    from auditor.features.calibrate import auto_labels

    rows, pooled = synthetic()  # d_sae 24
    split = assign_split(rows)
    with pytest.raises(ConfigError, match=re.escape(f"latent {bad}: out of range; the SAE has 24 latents, numbered 0 to 23")):
        discover(pooled, rows, split, "bias", exclude=[bad])
    with pytest.raises(ConfigError, match=re.escape(f"excluded latent {bad}: out of range")):
        auto_labels(pooled, rows, split, ["bias"], per_category=2, exclude=[bad])
