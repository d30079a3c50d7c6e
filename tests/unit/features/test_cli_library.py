"""``auditor library validate | show | import-neuronpedia``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from auditor.cli import main
from auditor.features import load_library

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "feature_libraries" / "examples" / "tiny" / "library.yaml"


def test_validate_ok_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["library", "validate", str(TINY)]) == 0
    n = len(load_library(TINY).features)
    assert capsys.readouterr().out == f"{TINY}: ok ({n} features)\n"

    bad = tmp_path / "library.yaml"
    bad.write_text(TINY.read_text(encoding="utf-8").replace("index: 12", "index: 3"), encoding="utf-8")
    assert main(["library", "validate", str(bad), str(TINY)]) == 1
    out, err = capsys.readouterr()
    assert out == f"{TINY}: ok ({n} features)\n"
    lines = err.splitlines()
    assert len(lines) == 2  # the duplicate index, and the probe file that was not copied
    line_no = next(i for i, l in enumerate(bad.read_text().splitlines(), 1) if "name: deception.fraud" in l) + 1
    assert lines[0] == f"{bad}:{line_no}:12: duplicate feature index 3 (already used by 'bias.gender_stereotype')"
    assert "probe file not found" in lines[1]


def test_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["library", "show", str(TINY), "--category", "deception"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("library tiny: SAE tiny-random-64 on HuggingFaceTB/SmolLM2-135M-Instruct at blocks.5.hook_resid_post, 13 features")
    assert [line.split()[:3] for line in out[1:]] == [
        ["12", "deception.fraud", "deception"],
        ["19", "deception.phishing", "deception"],
        ["23", "deception.lying", "deception"],
    ]
    assert main(["library", "show", str(TINY), "--search", "zzz"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "no matching features"


def test_show_unknown_id_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["library", "show", "no-such-lib"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: feature library 'no-such-lib' not found; looked in:")
    assert len(err.splitlines()) == 1


def test_import_neuronpedia(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "export.jsonl"
    rows = [
        {"modelId": "gpt2-small", "layer": "6-res-jb", "index": "3", "description": "credit card fraud"},
        {"modelId": "gpt2-small", "layer": "6-res-jb", "index": 9, "description": "kitten pictures"},
        {"modelId": "gpt2-small", "layer": "6-res-jb", "index": 9, "description": "cats again"},
    ]
    export.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "lib" / "library.yaml"
    code = main(
        [
            "library", "import-neuronpedia", str(export),
            "--sae-id", "gpt2-res-6", "--model", "openai-community/gpt2", "--hookpoint", "blocks.6.hook_resid_pre",
            "--category", "deception=fraud,scam", "--category", "animals=kitten", "--d-sae", "16", "-o", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out == f"{out}: wrote 2 features from 3 rows; skipped 1 extra explanation(s) of an already-named latent\n"
    assert out.read_text().startswith("# Imported from Neuronpedia explanations: export.jsonl\n")
    lib = load_library(out)
    assert [(f.index, f.name) for f in lib.features] == [(3, "deception.credit_card_fraud"), (9, "animals.kitten_pictures")]
    assert main(["library", "validate", str(out)]) == 0


def test_import_bad_category_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "e.jsonl"
    export.write_text('{"modelId": "m", "layer": "l", "index": 1, "description": "d"}\n', encoding="utf-8")
    code = main(
        ["library", "import-neuronpedia", str(export), "--sae-id", "s", "--model", "m", "--hookpoint", "h",
         "--category", "nokeywords", "-o", str(tmp_path / "o.yaml")]
    )  # fmt: skip
    assert code == 2
    assert "must look like CATEGORY=KEYWORD" in capsys.readouterr().err
    assert not (tmp_path / "o.yaml").exists()


def test_validate_control_character_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "library.yaml"
    bad.write_text("\x00" + TINY.read_text(encoding="utf-8"), encoding="utf-8")
    assert main(["library", "validate", str(bad)]) == 1
    assert capsys.readouterr().err == (
        f"{bad}:1:1: control character U+0000 is not allowed in YAML; "
        "remove it or write it as the escape \\0 inside a double-quoted string\n"
    )
