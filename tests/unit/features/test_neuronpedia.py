"""Neuronpedia explanation exports -> feature libraries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from auditor.errors import LibraryError, LibraryFileError
from auditor.features import library_to_yaml, load_library
from auditor.features.neuronpedia import categorize, import_neuronpedia, parse_category_rule, read_export, slugify


def _row(index: Any, description: str, layer: str = "6-res-jb", **extra: Any) -> dict[str, Any]:
    return {"modelId": "gpt2-small", "layer": layer, "index": index, "description": description, **extra}


ROWS = [
    _row("1234", " references to fraud and scams", explanationModelName="gpt-4o-mini", typeName="oai_token-act-pair"),
    _row(7, "Phishing emails asking for passwords"),
    _row("7", "a second explanation of latent 7"),  # duplicate latent: the first wins
    _row(99, "References to fraud and scams"),  # same slug as 1234, same category -> renamed
    _row(5, "   "),  # empty description: skipped
    _row(3, "!!!"),  # no words: latent_<index>
    _row(12, "Medical terminology, e.g. 'diagnosis'"),
]


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_slugify() -> None:
    assert slugify("Fake prizes!  Advance-fee requests") == "fake_prizes_advance_fee_requests"
    assert slugify("one two three four five six seven eight") == "one_two_three_four_five_six"
    assert slugify("x" * 100, max_chars=10) == "x" * 10
    assert slugify("...") == ""


def test_category_rules() -> None:
    assert parse_category_rule("deception=fraud, scam,phish") == ("deception", ["fraud", "scam", "phish"])
    rules = [("deception", ["fraud", "phish"]), ("medical", ["medical"])]
    assert categorize("PHISHING attempt", rules) == "deception"
    assert categorize("medical fraud", rules) == "deception"  # first rule wins
    assert categorize("poetry", rules) == "uncategorized"
    for bad in ("deception", "deception=", "Deception=x", "=x"):
        with pytest.raises(LibraryError, match="category"):
            parse_category_rule(bad)


def test_import(tmp_path: Path) -> None:
    export = _write_jsonl(tmp_path / "export.jsonl", ROWS)
    report = import_neuronpedia(
        export,
        sae_id="gpt2-small-res-jb-6",
        model="openai-community/gpt2",
        hookpoint="blocks.6.hook_resid_pre",
        d_sae=24576,
        categories=[parse_category_rule("deception=fraud,phish")],
    )
    lib = report.library
    assert (report.rows, report.duplicates, report.empty, report.renamed) == (7, 1, 1, 1)
    assert lib.id == "gpt2-small-res-jb-6"
    assert lib.sae.hookpoint == "blocks.6.hook_resid_pre" and lib.sae.d_sae == 24576
    assert [(f.index, f.name, f.category) for f in lib.features] == [
        (3, "uncategorized.latent_3", "uncategorized"),
        (7, "deception.phishing_emails_asking_for_passwords", "deception"),
        (12, "uncategorized.medical_terminology_e_g_diagnosis", "uncategorized"),
        (99, "deception.references_to_fraud_and_scams", "deception"),
        (1234, "deception.references_to_fraud_and_scams_1234", "deception"),
    ]
    assert all(f.source == "neuronpedia" for f in lib.features)
    assert lib.feature("deception.phishing_emails_asking_for_passwords").description == "Phishing emails asking for passwords"
    assert lib.feature("deception.references_to_fraud_and_scams_1234").description == "references to fraud and scams"
    # What it writes loads back as the same library.
    out = tmp_path / "library.yaml"
    out.write_text(library_to_yaml(lib), encoding="utf-8")
    assert load_library(out).model_dump() == lib.model_dump()


def test_a_clash_suffix_that_is_taken_counts_up_until_the_name_is_free(tmp_path: Path) -> None:
    rows = [_row(3, "fraud 7"), _row(5, "fraud"), _row(7, "fraud"), _row(8, "fraud 7 2"), _row(9, "fraud")]
    report = import_neuronpedia(_write_jsonl(tmp_path / "e.jsonl", rows), sae_id="s", model="m", hookpoint="h")
    assert [(f.index, f.name) for f in report.library.features] == [
        (3, "uncategorized.fraud_7"),
        (5, "uncategorized.fraud"),
        (7, "uncategorized.fraud_7_2"),  # fraud_7 is latent 3's
        (8, "uncategorized.fraud_7_2_8"),  # its own slug is latent 7's name
        (9, "uncategorized.fraud_9"),
    ]
    assert report.renamed == 3
    out = tmp_path / "library.yaml"
    out.write_text(library_to_yaml(report.library), encoding="utf-8")
    assert load_library(out).names == report.library.names


def test_json_array_export(tmp_path: Path) -> None:
    export = tmp_path / "export.json"
    export.write_text(json.dumps(ROWS[:2]), encoding="utf-8")
    lib = import_neuronpedia(export, sae_id="s", model="m", hookpoint="h").library
    assert lib.names == ["uncategorized.phishing_emails_asking_for_passwords", "uncategorized.references_to_fraud_and_scams"]


def test_several_layers_need_a_choice(tmp_path: Path) -> None:
    export = _write_jsonl(tmp_path / "e.jsonl", [_row(1, "alpha"), _row(2, "beta", layer="7-res-jb")])
    with pytest.raises(LibraryError, match=r"several SAEs \(layer ids: 6-res-jb, 7-res-jb\); choose one with --layer"):
        import_neuronpedia(export, sae_id="s", model="m", hookpoint="h")
    lib = import_neuronpedia(export, sae_id="s", model="m", hookpoint="h", layer="7-res-jb").library
    assert [(f.index, f.name) for f in lib.features] == [(2, "uncategorized.beta")]
    with pytest.raises(LibraryError, match="no rows with layer '8-res-jb'; the export has: 6-res-jb, 7-res-jb"):
        import_neuronpedia(export, sae_id="s", model="m", hookpoint="h", layer="8-res-jb")


def test_bad_rows_are_located(tmp_path: Path) -> None:
    export = tmp_path / "e.jsonl"
    export.write_text(
        "\n".join(
            [
                json.dumps(_row(1, "fine")),
                "{not json",
                json.dumps({"modelId": "m", "layer": "l", "description": "no index"}),
                "",
                json.dumps(_row("x12", "bad index")),
                json.dumps(_row(-4, "negative")),
                json.dumps(_row(2, 17)),
                json.dumps([1, 2]),
            ]
        ),
        encoding="utf-8",
    )
    with pytest.raises(LibraryFileError) as info:
        read_export(export)
    problems = [(line, msg.split(" (")[0]) for line, _, msg in info.value.problems]
    assert problems == [
        (2, "invalid JSON: Expecting property name enclosed in double quotes"),
        (3, "missing key(s) index"),
        (5, "index must be an integer or a string of digits, got 'x12'"),
        (6, "index must be >= 0, got -4"),
        (7, "description must be a string, got int"),
        (8, "expected a JSON object, got list"),
    ]
    assert info.value.message.splitlines()[0].startswith(f"{export}:2:2: invalid JSON")


def test_index_beyond_d_sae(tmp_path: Path) -> None:
    export = _write_jsonl(tmp_path / "e.jsonl", [_row(40, "alpha")])
    with pytest.raises(LibraryError, match="latent index 40 is out of range for --d-sae 32"):
        import_neuronpedia(export, sae_id="s", model="m", hookpoint="h", d_sae=32)


def test_empty_export(tmp_path: Path) -> None:
    export = tmp_path / "e.jsonl"
    export.write_text("\n\n", encoding="utf-8")
    with pytest.raises(LibraryError, match="holds no explanation rows"):
        read_export(export)


def test_invalid_library_id_is_an_error(tmp_path: Path) -> None:
    export = _write_jsonl(tmp_path / "e.jsonl", [_row(1, "alpha")])
    with pytest.raises(LibraryError, match="the converted library is invalid: id: String should match pattern"):
        import_neuronpedia(export, sae_id="Bad ID", model="m", hookpoint="h")
