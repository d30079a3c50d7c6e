"""What ``split-data``, ``discover``, ``calibrate`` and ``evaluate-detection`` refuse before any model runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from auditor.cli import main
from auditor.features.labelled import BENIGN
from tests.conftest import make_random_sae


def _write_data(folder: Path, counts: dict[str, int]) -> Path:
    folder.mkdir(parents=True)
    for cat, n in counts.items():
        rows = [{"id": f"{cat}-{i}", "category": cat, "kind": "prompt", "text": f"{cat} text {i}"} for i in range(n)]
        (folder / f"{cat}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A data folder, a library with a 64-latent SAE, a labels file, a notes file; no model."""
    _write_data(tmp_path / "data", {"bias": 10, BENIGN: 20})
    _write_data(tmp_path / "oneclass", {BENIGN: 12})
    lib = tmp_path / "lib"
    make_random_sae(lib / "sae", d_in=8, d_sae=64, hookpoint="blocks.1.hook_resid_post")
    (lib / "library.yaml").write_text(
        "apiVersion: auditor/v1\nkind: FeatureLibrary\nid: cli-test\n"
        "sae: {id: t, model: t, hookpoint: blocks.1.hook_resid_post, path: sae, d_sae: 64}\nfeatures: []\n",
        encoding="utf-8",
    )
    (tmp_path / "nosuchcat.yaml").write_text("- {index: 5, name: nosuchcat.a, description: x}\n", encoding="utf-8")
    (tmp_path / "far.yaml").write_text("- {index: 64, name: bias.far, description: x}\n", encoding="utf-8")
    return tmp_path


DISCOVER = ["discover", "--data", "{w}/data", "--library", "{w}/lib/library.yaml"]
CALIBRATE = ["calibrate", "--data", "{w}/data", "--library", "{w}/lib/library.yaml"]
EVALUATE = ["evaluate-detection", "--data", "{w}/data", "--policy", "{w}/no-policy.yaml"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["split-data", "{w}/data/bias.jsonl"], "this is a file; give the data set's folder"),
        (["split-data", "{w}/data", "--heldout", "0.0001"], "holds out no row of benign, bias; use --heldout 0.05 or more"),
        (["split-data", "{w}/data", "--heldout", "0.97"], "leaves no training row of bias; use --heldout below 0.95"),
        ([*DISCOVER, "--top", "0"], "--top is how many latents"),
        ([*DISCOVER, "--top", "-1"], "--top is how many latents"),
        ([*DISCOVER, "--contexts", "-2"], "--contexts is how many contexts"),
        ([*DISCOVER, "--propose", "0", "--labels-out", "{w}/l.yaml"], "--propose is how many latents to propose"),
        ([*DISCOVER, "--propose", "-1", "--labels-out", "{w}/l.yaml"], "--propose is how many latents to propose"),
        ([*DISCOVER, "--labels-out", "{w}/l.yaml"], "--labels-out is where --propose writes"),
        ([*DISCOVER, "--propose", "2"], "--propose needs --labels-out FILE"),
        ([*DISCOVER, "--exclude-latent", "3"], "--exclude-latent only keeps latents out of --propose"),
        ([*DISCOVER, "--propose", "2", "--labels-out", "{w}/l.yaml", "--exclude-latent", "64"],
         "--exclude-latent 64: out of range; the SAE has 64 latents, numbered 0 to 63"),
        ([*DISCOVER, "--propose", "2", "--labels-out", "{w}/l.yaml", "--exclude-latent", "-3"],
         "--exclude-latent -3: out of range; the SAE has 64 latents"),
        ([*DISCOVER, "--propose", "2", "--labels-out", "{w}/l.yaml", "--exclude-latent", "-3", "--sae", "x={w}/lib/sae"],
         "--exclude-latent -3: out of range; latents are numbered from 0"),
        ([*DISCOVER, "--sae", "foo={w}/nope"], "--sae foo={w}/nope: no such file or folder"),
        (["discover", "--data", "{w}/oneclass", "--library", "{w}/lib/library.yaml"], "every row is 'benign'"),
        ([*CALIBRATE, "--target-fpr", "nan"], "--target-fpr must be a rate between 0 and 1"),
        ([*CALIBRATE, "--strict-fpr", "0.2"], "--strict-fpr must be a rate above 0 and at most --target-fpr (0.05)"),
        ([*CALIBRATE, "--per-category", "0"], "--per-category is how many latents"),
        ([*CALIBRATE, "--labels", "{w}/nosuchcat.yaml"],
         "labels of categories with no rows in the data: nosuchcat (nosuchcat.a); the data has benign, bias"),
        ([*CALIBRATE, "--labels", "{w}/far.yaml"], "far.yaml: latent 64: out of range; the SAE has 64 latents"),
        (["calibrate", "--data", "{w}/oneclass", "--library", "{w}/lib/library.yaml"], "every row is 'benign'"),
        ([*EVALUATE, "--target-fpr", "nan"], "--target-fpr must be a rate between 0 and 1"),
        ([*EVALUATE, "--target-fpr", "2"], "--target-fpr must be a rate between 0 and 1"),
        ([*EVALUATE, "--target-fpr", "-1"], "--target-fpr must be a rate between 0 and 1"),
        ([*EVALUATE, "--compare-sae", "x={w}/nope"], "--compare-sae x={w}/nope: no such file or folder"),
        ([*EVALUATE, "--notes", "{w}/nonotes.md"], "--notes {w}/nonotes.md: no such file"),
        ([*EVALUATE, "--heldout", "0.01"], "holds out no row of benign, bias"),
    ],
)
def test_refused_before_any_work(
    workspace: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    w = str(workspace)
    assert main([a.replace("{w}", w) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.startswith("error: ") and message.replace("{w}", w) in err, err
    assert not (workspace / "l.yaml").exists() and not (workspace / "lib" / "calibration.json").exists()


def test_split_data_warns_of_kind_groups_without_heldout_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_data(tmp_path / "data", {"bias": 10, BENIGN: 20})
    (data / "extra.jsonl").write_text(json.dumps({"id": "c1", "category": "bias", "kind": "completion", "text": "x"}) + "\n")
    assert main(["split-data", str(data), "-o", "-"]) == 0
    err = capsys.readouterr().err
    assert "warning: no held-out completion of bias (1 rows; --heldout 0.3 rounds to 0 of them)" in err
