"""The detection report, and the four commands end to end on a tiny model."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from auditor.errors import ConfigError
from auditor.features import discover_cli
from auditor.features.evaluate import (
    CategoryResult,
    DetectionReport,
    Detector,
    best_single_feature,
    evaluate_detection,
    render_report,
)
from auditor.features.labelled import BENIGN, HELDOUT, assign_split
from auditor.features.library import load_library
from auditor.policy import load_policy
from tests.conftest import make_random_sae
from tests.unit.features._synthetic import SIGNAL, WORDS, planted_latent, synthetic, tiny_model_dir


def test_evaluate_detection_on_planted_data() -> None:
    rows, pooled = synthetic(categories=("bias", "deception", "dangerous"))
    split = assign_split(rows)
    report = evaluate_detection(rows, split, pooled, ["bias", "dangerous"], dataset="synth")
    for res in report.categories:
        i, train_auc = best_single_feature(pooled, rows, split, res.category)
        assert i == planted_latent(res.category) and train_auc > 0.85
        pos = [j for j, r in enumerate(rows) if r.category == res.category and split[r.id] == HELDOUT]
        neg = [j for j, r in enumerate(rows) if r.category == BENIGN and split[r.id] == HELDOUT]
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        want = roc_auc_score(y, np.r_[pooled.max[pos, i].numpy(), pooled.max[neg, i].numpy()])
        assert res.single.auroc == pytest.approx(want, abs=1e-12)
        assert (res.n_pos, res.n_neg) == (len(pos), len(neg))
        assert res.raw.auroc > 0.9  # resid_mean carries a planted direction per category
        assert res.policy is None and res.policy_tpr_at_1 is None
    assert report.counts["bias"]["heldout"] == sum(1 for r in rows if r.category == "bias" and split[r.id] == HELDOUT)
    text = render_report(report, commands=["auditor evaluate-detection"], notes="Some notes.")
    assert "| bias | " in text and "## Notes\n\nSome notes." in text and "auditor evaluate-detection" in text


@pytest.mark.parametrize(
    ("policy", "raw", "verdict"),
    [(0.95, 0.97, "met"), (0.89, 0.90, "missed"), (0.92, 0.98, "missed"), (0.93, 0.98, "met")],
)
def test_report_goal_column(policy: float, raw: float, verdict: str) -> None:
    res = CategoryResult("bias", 30, 60, Detector(0.8, 0.5), Detector(policy, 0.7), Detector(raw, 0.9))
    text = render_report(DetectionReport("d", 0.05, {}, [res]))
    row = next(line for line in text.splitlines() if line.startswith("| bias |"))
    assert row.endswith(f"| {verdict} |")


def test_report_warns_when_the_sample_cannot_support_it() -> None:
    rows, pooled = synthetic(categories=("bias",), n_per=8)  # 2-3 held-out positives, 5 held-out negatives
    report = evaluate_detection(rows, assign_split(rows), pooled, ["bias"], dataset="synth")
    r = report.categories[0]
    assert r.n_pos < 20 and r.n_neg < 20
    assert report.warnings == [
        f"bias: only {r.n_neg} held-out benign texts; a false-positive rate of 5% needs at least 20 to be measured "
        "(with fewer, the threshold sits above all of them and the rate reached is 0%)",
        f"bias: only {r.n_pos} positive texts (fewer than 20); each moves the true-positive rate by "
        f"{100 / r.n_pos:.0f} points, so treat the numbers as rough",
    ]
    r.policy = Detector(0.99, 1.0)
    text = render_report(report)
    assert f"- Warning: {report.warnings[0]}" in text
    row = next(line for line in text.splitlines() if line.startswith("| bias |"))
    assert row.endswith("| met (too few texts to tell) |")


def test_enough_held_out_texts_give_no_warning() -> None:
    rows, pooled = synthetic(categories=("bias",), n_per=80)
    report = evaluate_detection(rows, assign_split(rows), pooled, ["bias"], dataset="synth")
    assert report.warnings == [] and "Warning" not in render_report(report)


@pytest.mark.parametrize("fpr", [float("nan"), 0.0, 1.0, 2.0, -1.0])
def test_evaluate_detection_refuses_a_bad_target_fpr(fpr: float) -> None:
    rows, pooled = synthetic(categories=("bias",), n_per=8)
    with pytest.raises(ConfigError, match="--target-fpr must be a rate between 0 and 1"):
        evaluate_detection(rows, assign_split(rows), pooled, ["bias"], target_fpr=fpr)


# ---------------------------------------------------------------- the commands, end to end


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    discover_cli.register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def _dataset(folder: Path) -> None:
    g = np.random.default_rng(0)
    folder.mkdir()
    for cat in ("bias", "dangerous", "benign"):
        lines = []
        for i in range(40 if cat == "benign" else 24):
            words = list(g.choice(WORDS, size=6))
            if cat != "benign":
                words[1] = words[4] = SIGNAL[cat]
            row = {"id": f"{cat}-{i}", "category": cat, "kind": "prompt" if i % 2 else "completion", "text": " ".join(words), "near_miss": i % 4 == 0, "topic": "t"}
            lines.append(json.dumps(row))
        (folder / f"{cat}.jsonl").write_text("\n".join(lines) + "\n")


def test_commands_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    _dataset(data)
    model = tiny_model_dir(tmp_path / "model")
    lib_dir = tmp_path / "feature_libraries" / "tiny-lib"
    make_random_sae(lib_dir / "sae", d_in=32, d_sae=64, hookpoint="blocks.1.hook_resid_post", architecture="topk")
    make_random_sae(tmp_path / "sae-b", d_in=32, d_sae=64, hookpoint="blocks.2.hook_resid_post", architecture="topk", seed=3)
    (lib_dir / "library.yaml").write_text(
        "apiVersion: auditor/v1\nkind: FeatureLibrary\nid: tiny-lib\n"
        "sae: {id: tiny, model: tiny, hookpoint: blocks.1.hook_resid_post, path: sae, d_sae: 64}\nfeatures: []\n"
    )
    common = ["--data", str(data), "--model", str(model), "--cache-dir", str(tmp_path / "cache")]

    assert _cli("split-data", str(data)) == 0
    split = json.loads((data / "split.json").read_text())
    assert len(split["heldout"]) == 12 + 8 + 8  # per (category, kind): round(0.3 * 20) = 6, round(0.3 * 12) = 4

    assert _cli("discover", *common, "--library", str(lib_dir), "--sae", f"b={tmp_path / 'sae-b'}", "--top", "3",
                "--json", str(tmp_path / "d.json"), "--markdown", str(tmp_path / "d.md")) == 0
    found = json.loads((tmp_path / "d.json").read_text())
    assert set(found) == {"b"} and set(found["b"]) == {"bias", "dangerous"}
    assert "### bias" in (tmp_path / "d.md").read_text()
    # The width of an SAE given by path is known once its features are computed (cached by now).
    with pytest.raises(ConfigError, match=re.escape("--exclude-latent 64: out of range; the SAE has 64 latents")):
        _cli("discover", *common, "--sae", f"b={tmp_path / 'sae-b'}", "--propose", "2", "--labels-out",
             str(tmp_path / "l.yaml"), "--exclude-latent", "64")
    assert not (tmp_path / "l.yaml").exists()

    policy = tmp_path / "policies" / "default.yaml"
    capsys.readouterr()
    assert _cli("calibrate", *common, "--library", str(lib_dir), "--per-category", "3", "--write-policy", str(policy)) == 0
    # 28 benign training texts resolve 5% but not 1%; 16 or 17 training texts per category are few.
    err = capsys.readouterr().err
    assert "warning: benign training split: only 28 benign training texts; a false-positive rate of 1% needs at least 100" in err
    assert "warning: dangerous: only 16 training texts (fewer than 20)" in err
    lib = load_library(lib_dir / "library.yaml")
    assert lib.features and {f.category for f in lib.features} <= {"bias", "dangerous"}
    assert [p.name for p in lib.probes] == ["bias.probe", "dangerous.probe"]
    assert (lib_dir / "calibration.json").is_file() and (lib_dir / "labels.auto.yaml").is_file()
    engine = load_policy(policy)
    assert {"bias", "dangerous"} <= set(engine.categories)

    report = tmp_path / "REPORT.md"
    notes = tmp_path / "notes.md"
    notes.write_text("Hand-written notes.")
    assert _cli("evaluate-detection", *common, "--policy", str(policy), "--compare-sae", f"b={tmp_path / 'sae-b'}",
                "--notes", str(notes), "-o", str(report), "--json", str(tmp_path / "r.json")) == 0
    text = report.read_text()
    assert "- Warning: bias: only 12 held-out benign texts" in text and "warning: bias: only 12 held-out" in capsys.readouterr().err
    assert "| bias | " in text and "| dangerous | " in text and "Hand-written notes." in text
    assert "`blocks.2.hook_resid_post`" in text  # the hookpoint comparison
    numbers = json.loads((tmp_path / "r.json").read_text())
    for cat in numbers["categories"]:
        assert 0.0 <= cat["policy"]["auroc"] <= 1.0 and cat["by_kind"].keys() == {"prompt", "completion"}
    capsys.readouterr()
