"""Probe JSON files reproduce the scikit-learn models they were saved from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from auditor.errors import ProbeError
from auditor.policy.probes import load_probe, save_probe


def data(seed: int, n: int = 200, d: int = 5) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d)) * g.uniform(0.5, 3.0, size=d) + g.normal(size=d)
    y = (x @ g.normal(size=d) + g.normal(size=n) > 0).astype(int)
    return x, y


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scaled", [False, True])
def test_logistic_probe_matches_predict_proba(tmp_path: Path, seed: int, scaled: bool) -> None:
    x, y = data(seed)
    scaler = StandardScaler().fit(x) if scaled else None
    clf = LogisticRegression(C=0.7).fit(scaler.transform(x) if scaler is not None else x, y)
    names = [f"f.x{i}" for i in range(x.shape[1])]
    save_probe(clf, tmp_path / "p.json", features=names, pool="max", scaler=scaler)
    probe = load_probe(tmp_path / "p.json")
    assert probe.features == tuple(names) and probe.pool == "max" and probe.kind == "logistic"
    want = clf.predict_proba(scaler.transform(x) if scaler is not None else x)[:, 1]
    torch.testing.assert_close(probe.decision(torch.from_numpy(x)), torch.from_numpy(want))


def test_linear_svm_probe_keeps_the_decision(tmp_path: Path) -> None:
    x, y = data(3)
    svm = LinearSVC(C=0.5).fit(x, y)
    save_probe(svm, tmp_path / "svm.json", inputs="hookpoint", pool="mean")
    probe = load_probe(tmp_path / "svm.json")
    assert probe.kind == "linear_svm" and probe.inputs == "hookpoint" and probe.features is None
    xt = torch.from_numpy(x)
    torch.testing.assert_close(probe.logit(xt), torch.from_numpy(svm.decision_function(x)))
    assert torch.equal(probe.decision(xt) >= 0.5, torch.from_numpy(svm.predict(x) == 1))


def test_pooling_over_masked_tokens() -> None:
    from auditor.policy.probes import Probe

    probe = Probe(kind="logistic", inputs="hookpoint", features=None, pool="max", coef=(1.0, 1.0), intercept=0.0)
    x = torch.tensor([[[1.0, 5.0], [3.0, -1.0], [9.0, 9.0]]])  # [1, 3, 2]
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(probe.pool_inputs(x, mask), torch.tensor([[3.0, 5.0]]))
    mean = Probe(kind="logistic", inputs="hookpoint", features=None, pool="mean", coef=(1.0, 1.0), intercept=0.0)
    torch.testing.assert_close(mean.pool_inputs(x, mask), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(mean.pool_inputs(x, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 2))


GOOD: dict[str, Any] = {
    "kind": "logistic",
    "inputs": "features",
    "features": ["a.b", "c.d"],
    "pool": "mean",
    "coef": [1.0, 2.0],
    "intercept": 0.5,
    "scaler": None,
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "tree"}, "kind must be one of"),
        ({"pool": "sum"}, "pool must be one of"),
        ({"coef": [1.0]}, "2 features but 1 coefficients"),
        ({"coef": "x"}, "'coef' must be a list of numbers"),
        ({"intercept": "1"}, "'intercept' must be a number"),
        ({"features": None}, "needs 'features'"),
        ({"scaler": {"mean": [0.0, 0.0], "scale": [1.0, 0.0]}}, "scale entries must be > 0"),
        ({"scaler": {"mean": [0.0]}}, "'scaler' must be null"),
        ({"bias": 1.0}, "unknown keys ['bias']"),
    ],
)
def test_invalid_probe_files(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(ProbeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_probe(path)


def test_unreadable_and_unsupported(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="cannot read probe file"):
        load_probe(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ProbeError, match="not valid JSON"):
        load_probe(tmp_path / "bad.json")
    (tmp_path / "binary.json").write_bytes(bytes([0xC2, 0x2F, 0x68, 0x4E, 0xD8, 0x57]))
    with pytest.raises(ProbeError, match=r"binary\.json: not a probe file \(not UTF-8 JSON"):
        load_probe(tmp_path / "binary.json")
    x, y = data(0)
    with pytest.raises(ProbeError, match="needs features="):
        save_probe(LogisticRegression().fit(x, y), tmp_path / "p.json")
    with pytest.raises(ProbeError, match="not fitted"):
        save_probe(LogisticRegression(), tmp_path / "p.json", features=["a.b"])
    y3 = np.arange(len(y)) % 3
    with pytest.raises(ProbeError, match="binary"):
        save_probe(LogisticRegression().fit(x, y3), tmp_path / "p.json", inputs="hookpoint")
    with pytest.raises(ProbeError, match="cannot save a StandardScaler"):
        save_probe(StandardScaler().fit(x), tmp_path / "p.json", inputs="hookpoint")
