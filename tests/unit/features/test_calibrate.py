"""Calibration: feature statistics, sparse probes, thresholds at a target FPR, the generated policy."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from auditor.errors import ConfigError, DatasetError, LibraryError
from auditor.features.calibrate import (
    EVIDENCE_LEVEL,
    Calibration,
    FeatureLabel,
    auto_labels,
    calibrate,
    fit_sparse_probe,
    labels_to_yaml,
    load_labels,
    policy_from_calibration,
)
from auditor.features.discover import auroc_columns
from auditor.features.labelled import BENIGN, TRAIN, assign_split
from auditor.features.library import FEATURE_NAME_PATTERN, FeatureLibrary, library_to_yaml, load_library
from auditor.policy import AuditBatch, load_policy
from auditor.policy.probes import load_probe
from tests.unit.features._synthetic import planted_latent, synthetic

LABELS = [
    FeatureLabel(planted_latent("bias"), "bias.stereotype", "Stereotype words"),
    FeatureLabel(planted_latent("deception"), "deception.scam", "Scam words"),
    FeatureLabel(12, "bias.noise", "A latent with no signal"),
]


def _library(folder: Path, d_sae: int = 24) -> FeatureLibrary:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "library.yaml").write_text(
        "apiVersion: auditor/v1\nkind: FeatureLibrary\nid: synth\n"
        f"sae: {{id: synth-sae, model: test, hookpoint: blocks.1.hook_resid_post, d_sae: {d_sae}}}\nfeatures: []\n",
        encoding="utf-8",
    )
    return load_library(folder / "library.yaml")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FeatureLibrary, Calibration, object, object, dict[str, str]]:
    folder = tmp_path_factory.mktemp("lib")
    rows, pooled = synthetic()
    split = assign_split(rows)
    lib, cal = calibrate(_library(folder), pooled, rows, split, LABELS, probe_dir=folder / "probes", dataset="synth")
    (folder / "library.yaml").write_text(library_to_yaml(lib), encoding="utf-8")
    return folder, lib, cal, rows, pooled, split  # type: ignore[return-value]


def test_feature_statistics_and_thresholds(calibrated: tuple) -> None:  # type: ignore[type-arg]
    folder, lib, cal, rows, pooled, split = calibrated
    benign = [i for i, r in enumerate(rows) if r.category == BENIGN and split[r.id] == TRAIN]
    for label in LABELS:
        f = lib.feature(label.name)
        assert (f.index, f.category, f.description, f.source) == (label.index, label.category, label.description, "contrastive")
        col = pooled.max[:, label.index].numpy()
        assert f.stats is not None and f.stats.max_activation == pytest.approx(col.max(), abs=1e-5)
        assert f.stats.benign_quantiles["0.99"] == pytest.approx(np.quantile(col[benign], 0.99), abs=1e-5)
        fc = next(c for c in cal.features if c.name == label.name)
        assert (col[benign] >= fc.threshold).mean() <= 0.05
        assert f.stats.auroc == pytest.approx(fc.auroc, abs=1e-5)
    assert lib.feature("bias.stereotype").stats.auroc > 0.85  # type: ignore[union-attr]
    assert cal.best_feature("bias").name == "bias.stereotype"  # type: ignore[union-attr]
    recon = pooled.recon_of(benign).numpy()
    assert cal.recon_error_quantiles["0.999"] == pytest.approx(np.quantile(recon, 0.999), abs=1e-5)
    assert lib.recon_error_quantile("0.5") == cal.recon_error_quantiles["0.5"]
    assert cal.n_train == {c: sum(1 for r in rows if r.category == c and split[r.id] == TRAIN) for c in ("benign", "bias", "deception")}


def test_probes_are_saved_and_separate(calibrated: tuple) -> None:  # type: ignore[type-arg]
    folder, lib, cal, rows, pooled, split = calibrated
    assert [p.name for p in lib.probes] == ["bias.probe", "deception.probe"]
    for pc in cal.probes:
        probe = load_probe(folder / pc.path)
        assert probe.features == tuple(lb.name for lb in LABELS) and probe.pool == pc.pool
        assert 0 < pc.threshold <= pc.strict_threshold <= 1 and pc.cv_auroc > 0.85
        x = (pooled.max if pc.pool == "max" else pooled.mean)[:, [lb.index for lb in LABELS]]
        p = probe.decision(x.double()).numpy()
        pos = [i for i, r in enumerate(rows) if r.category == pc.category and split[r.id] == TRAIN]
        neg = [i for i, r in enumerate(rows) if r.category == BENIGN and split[r.id] == TRAIN]
        assert auroc_columns(p[pos, None], p[neg, None])[0] > 0.85
    # The round trip through YAML keeps everything, and the probe files resolve.
    again = load_library(folder / "library.yaml")
    assert again.names == lib.names and again.probe("bias.probe").path == "probes/bias.json"
    assert Calibration.from_json(cal.to_json()) == cal


@pytest.mark.parametrize("feature_rules", [False, True])
def test_generated_policy_scores_are_probe_over_threshold(calibrated: tuple, tmp_path: Path, feature_rules: bool) -> None:  # type: ignore[type-arg]
    folder, lib, cal, rows, pooled, split = calibrated
    policy = tmp_path / "default.yaml"
    policy.write_text(policy_from_calibration(cal, library_ref=str(folder / "library.yaml"), feature_rules=feature_rules))
    engine = load_policy(policy)
    assert set(engine.categories) == {"bias", "deception", "anomaly"}
    strict = {r.id: r for r in engine.policy.rules}["bias-probe-strict"]
    assert strict.severity == "high" and strict.actions == ["alert"]
    # One token per text: max and mean pooling both see the pooled vector itself.
    rows_used = list(range(0, len(rows), 7))
    feats = pooled.max[rows_used][:, engine.watched].unsqueeze(1)  # [B, 1, F]
    b = feats.shape[0]
    ones = torch.ones(b, 1, dtype=torch.bool)
    verdicts = engine.evaluate(AuditBatch(feats, ones, ones, recon_error=torch.zeros(b, 1)))
    names = [lb.name for lb in LABELS]
    x = pooled.max[rows_used][:, [lb.index for lb in LABELS]].double()
    for pc in cal.probes:
        probe = load_probe(folder / pc.path)
        # Reference formula: sigmoid(((x - mean) / scale) . coef + intercept) / threshold.
        z = (x - torch.tensor(probe.scaler_mean)) / torch.tensor(probe.scaler_scale)
        want = torch.sigmoid(z @ torch.tensor(probe.coef, dtype=torch.float64) + probe.intercept) / pc.threshold
        # ... and (all = min) one of the probe's positively weighted features is present.
        assert pc.drivers and set(pc.drivers) <= set(names)
        evidence = x[:, [names.index(d) for d in pc.drivers]].amax(1) / EVIDENCE_LEVEL
        want = torch.minimum(want, evidence)
        if feature_rules:
            best = cal.best_feature(pc.category)
            assert best is not None
            want = torch.maximum(want, x[:, names.index(best.name)] / best.threshold)
        got = torch.tensor([v.category_scores[pc.category] for v in verdicts], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        fired = [any(m.category == pc.category for m in v.matches) for v in verdicts]
        assert fired == (got >= 1.0).tolist()
        probe_matches = [m for v in verdicts for m in v.matches if m.rule_id == f"{pc.category}-probe"]
        assert probe_matches
        for m in probe_matches:
            named = {leaf.name for leaf in m.explanation if leaf.fired}
            assert pc.name in named and named & set(pc.drivers)


def test_dangerous_strict_rule_blocks(calibrated: tuple) -> None:  # type: ignore[type-arg]
    _, _, cal, *_ = calibrated
    text = policy_from_calibration(
        Calibration(**{**cal.__dict__, "probes": [type(cal.probes[0])(**{**cal.probes[0].__dict__, "category": "dangerous"})]}),
        library_ref="x",
        anomaly_quantile=None,
    )
    assert "severity: critical" in text and "- block" in text and "sae-anomaly" not in text


def test_fit_sparse_probe_zeroes_noise_columns() -> None:
    g = np.random.default_rng(0)
    x = g.normal(size=(300, 8))
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * g.normal(size=300) > 0).astype(int)
    scaler, clf, c, oof = fit_sparse_probe(x, y, cs=(0.01, 0.05, 0.3))
    assert c in (0.01, 0.05, 0.3) and oof.shape == (300,)
    assert abs(clf.coef_[0, 0]) > abs(clf.coef_[0, 1]) > 0
    assert np.count_nonzero(clf.coef_) < 8
    with pytest.raises(DatasetError, match="at least 2 positive"):
        fit_sparse_probe(x[:3], np.array([1, 0, 0]))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\n", "labels.yaml: a labels file is a YAML list"),
        ("- {name: bias.x}\n", "labels.yaml:1:3: entry 0: needs an integer 'index'"),
        ("- {index: 1, name: bias.a}\n- {index: true, name: bias.x}\n", "labels.yaml:2:3: entry 1: needs an integer 'index'"),
        ("- {index: 3, name: Bias}\n", "labels.yaml:1:3: entry 0: name 'Bias' is not dotted lowercase"),
        ("- {index: 3, name: bias.a}\n- {index: 3, name: bias.b}\n", "repeated: 3"),
        ("- {index: 3, name: bias.a}\n- {index: 4, name: bias.a}\n", "repeated: bias.a"),
        ("- {index: 3, index: 4, name: bias.a}\n", "labels.yaml:1:14: duplicate key 'index'"),
        ("- {index: 3, name: \"bias.a\x07\"}\n", "labels.yaml:1:27: control character U+0007 is not allowed in YAML"),
        ("- [" * 300 + "]" * 300 + "\n", "labels.yaml:1:"),
        ("- [unclosed\n", "labels.yaml:2:1: YAML syntax error"),
    ],
)
def test_load_labels_rejects(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "labels.yaml").write_text(text)
    with pytest.raises(DatasetError) as info:
        load_labels(tmp_path / "labels.yaml")
    assert message in info.value.message
    assert info.value.message.startswith(str(tmp_path / "labels.yaml"))


def test_labels_round_trip_and_auto_labels(tmp_path: Path) -> None:
    rows, pooled = synthetic()
    labels = auto_labels(pooled, rows, assign_split(rows), ["bias", "deception"], per_category=3)
    assert len({lb.index for lb in labels}) == len(labels)
    assert all(re.match(FEATURE_NAME_PATTERN, lb.name) for lb in labels)
    assert labels[0].index == planted_latent("bias") and labels[0].name == "bias.stereotype"
    assert "stereotype" in labels[0].description
    assert len(labels) == 6 and {lb.category for lb in labels} == {"bias", "deception"}
    by_auroc = auto_labels(pooled, rows, assign_split(rows), ["bias"], per_category=2, method="auroc", exclude=[planted_latent("bias")])
    assert planted_latent("bias") not in [lb.index for lb in by_auroc] and len(by_auroc) <= 2
    (tmp_path / "l.yaml").write_text(labels_to_yaml(labels))
    assert load_labels(tmp_path / "l.yaml") == labels


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"strict_fpr": 0.1}, ConfigError, "at most --target-fpr (0.05)"),
        ({"target_fpr": float("nan")}, ConfigError, "--target-fpr must be a rate between 0 and 1"),
        ({"labels": [FeatureLabel(3, "nosuchcat.a", "")]}, DatasetError, "labels of categories with no rows in the data: nosuchcat"),
        ({"strict_fpr": 0.0}, ConfigError, "--strict-fpr"),
        ({"labels": []}, DatasetError, "no features to calibrate"),
        ({"labels": [FeatureLabel(99, "bias.far", "")]}, LibraryError, "out of range"),
        ({"categories": ["privacy"]}, DatasetError, "no rows of categories ['privacy']"),
    ],
)
def test_calibrate_rejects(tmp_path: Path, kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    rows, pooled = synthetic(n_per=20)
    args: dict[str, object] = {"labels": LABELS, "probe_dir": tmp_path / "probes", "dataset": "synth", **kwargs}
    labels = args.pop("labels")
    with pytest.raises(error, match=re.escape(message)):
        calibrate(_library(tmp_path / "lib"), pooled, rows, assign_split(rows), labels, **args)  # type: ignore[arg-type]


def test_calibrate_refuses_benign_only_data(tmp_path: Path) -> None:
    rows, pooled = synthetic(n_per=20)
    benign = [r for r in rows if r.category == BENIGN]
    with pytest.raises(DatasetError, match="only benign rows"):
        calibrate(_library(tmp_path / "lib"), pooled, benign, assign_split(benign), LABELS[:1], probe_dir=tmp_path / "p", dataset="s")


def test_calibrate_allows_benign_labels_and_warns_on_small_data(tmp_path: Path) -> None:
    rows, pooled = synthetic(n_per=6)
    labels = [*LABELS, FeatureLabel(1, "benign.everyday", "Fires on benign text")]
    _, cal = calibrate(_library(tmp_path / "lib"), pooled, rows, assign_split(rows), labels, probe_dir=tmp_path / "p", dataset="s")
    n_benign = cal.n_train[BENIGN]
    assert n_benign < 20
    first = f"benign training split: only {n_benign} benign training texts"
    assert any(w.startswith(first) and "5% needs at least 20" in w for w in cal.warnings)
    assert any(w.startswith("bias: only") and "fewer than 20" in w for w in cal.warnings)
    assert Calibration.from_json(cal.to_json()).warnings == cal.warnings


def test_calibrate_without_warnings_on_enough_data(calibrated: tuple) -> None:  # type: ignore[type-arg]
    cal = calibrated[2]
    # 120 benign rows, 84 in training: the 1% target cannot be measured, the 5% one can.
    assert len(cal.warnings) == 1 and "only 84 benign training texts" in cal.warnings[0]
    assert "1% needs at least 100" in cal.warnings[0] and "5%" not in cal.warnings[0]
