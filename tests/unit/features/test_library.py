"""Feature libraries: loading, lookups, and located validation errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from auditor.errors import LibraryError, LibraryFileError
from auditor.features import FeatureLibrary, library_to_yaml, load_library
from auditor.features.library import find_library, library_search_dirs

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "feature_libraries" / "examples" / "tiny" / "library.yaml"

HEAD = """\
apiVersion: auditor/v1
kind: FeatureLibrary
id: t
sae:
  id: s
  model: m
  hookpoint: blocks.0.hook_resid_post
  d_sae: 16
features:
"""
FEAT = "  - {name: a.one, index: 1, category: a}\n"  # line 10


def test_tiny_library_loads() -> None:
    lib = load_library(TINY)
    assert lib.id == "tiny"
    assert lib.path == TINY.resolve()
    assert lib.sae.d_sae == 64
    assert len(lib.names) == len(set(lib.names)) >= 10
    assert {"bias", "deception", "dangerous", "self_harm", "privacy"} <= set(lib.categories)
    assert all(0 <= f.index < 64 for f in lib.features)
    fraud = lib.feature("deception.fraud")
    assert fraud.index == 12 and fraud.source == "contrastive"
    assert fraud.stats is not None and fraud.stats.benign_quantiles["0.99"] == 1.2
    assert lib.name_for_index(12) == "deception.fraud"
    assert lib.name_for_index(13) is None
    assert lib.indices(["deception.fraud", "bias.ethnic_slur"]) == [12, 7]
    assert lib.recon_error_quantile("0.999") == 0.55
    assert lib.recon_error_quantile("0.9") is None
    assert lib.resolve_path("sae") == TINY.parent / "sae"
    assert lib.probe("deception.probe").path == "probes/deception.json"


def test_unknown_feature_names_close_matches() -> None:
    lib = load_library(TINY)
    with pytest.raises(LibraryError, match=r"unknown feature 'deception.frud' in library 'tiny'; did you mean 'deception.fraud'"):
        lib.feature("deception.frud")
    with pytest.raises(LibraryError, match="unknown probe"):
        lib.probe("nope")


def test_search() -> None:
    lib = load_library(TINY)
    assert [f.name for f in lib.search("PHISH")] == ["deception.phishing"]
    assert [f.name for f in lib.search(None, "self_harm")] == ["self_harm.suicide", "self_harm.eating_disorder"]
    assert [f.name for f in lib.search("scam", "deception")] == ["deception.fraud"]
    assert lib.search("scam", "bias") == []


def test_resolve_path_rejects_uris() -> None:
    lib = load_library(TINY)
    with pytest.raises(LibraryError, match="not a local path"):
        lib.resolve_path("hf://org/repo/sae")


def test_lookup_by_id(tmp_path: Path) -> None:
    root = tmp_path / "libs"
    (root / "t").mkdir(parents=True)
    (root / "t" / "library.yaml").write_text(HEAD + FEAT, encoding="utf-8")
    assert load_library("t", search_dirs=[root], env={}).id == "t"
    assert load_library("t", env={"AUDITOR_LIBRARY_PATH": str(root)}).id == "t"
    assert load_library(root / "t").id == "t"  # a folder means its library.yaml
    with pytest.raises(LibraryError, match=r"feature library 'u' not found; looked in: .*libs/u/library.yaml"):
        load_library("u", search_dirs=[root], env={})
    assert library_search_dirs([root], env={})[0] == root
    assert find_library("tiny", search_dirs=[TINY.parent.parent], env={}) == TINY


def test_id_must_match_the_name_it_was_loaded_by(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "library.yaml").write_text(HEAD + FEAT, encoding="utf-8")
    with pytest.raises(LibraryFileError, match=r"library.yaml:3:5: library id is 't' but it was loaded as 'other'"):
        load_library("other", search_dirs=[tmp_path], env={})


def test_roundtrip_through_yaml(tmp_path: Path) -> None:
    lib = load_library(TINY)
    shutil.copytree(TINY.parent / "probes", tmp_path / "probes")
    out = tmp_path / "library.yaml"
    out.write_text(library_to_yaml(lib, header="copy\nof tiny"), encoding="utf-8")
    assert out.read_text().startswith("# copy\n# of tiny\n")
    again = load_library(out)
    assert again.model_dump() == lib.model_dump()


# (case id, body after HEAD (starts on line 10), line, token the error points at, message substring)
BAD = [
    ("duplicate-name", FEAT + "  - {name: a.one, index: 2, category: a}\n", 11, "a.one", "duplicate feature name 'a.one'"),
    ("duplicate-index", FEAT + "  - {name: a.two, index: 1, category: a}\n", 11, "1,", "duplicate feature index 1 (already used by 'a.one')"),
    ("index-out-of-range", "  - {name: a.one, index: 16, category: a}\n", 10, "16", "out of range: sae.d_sae is 16"),
    ("negative-index", "  - {name: a.one, index: -1, category: a}\n", 10, "-1", "greater than or equal to 0"),
    ("string-index", "  - {name: a.one, index: '3', category: a}\n", 10, "'3'", "valid integer"),
    ("name-not-dotted", "  - {name: fraud, index: 1, category: a}\n", 10, "fraud", "should match pattern"),
    ("name-uppercase", "  - {name: A.One, index: 1, category: a}\n", 10, "A.One", "should match pattern"),
    ("unknown-feature-key", "  - {name: a.one, index: 1, category: a, colour: red}\n", 10, "colour", "unknown key 'colour'"),
    ("misspelt-key", "  - {name: a.one, index: 1, categry: a}\n", 10, "categry", "did you mean 'category'"),
    ("bad-source", "  - {name: a.one, index: 1, category: a, source: guess}\n", 10, "guess", "(got 'guess')"),
    ("auroc-above-one", "  - {name: a.one, index: 1, category: a, stats: {auroc: 1.5}}\n", 10, "1.5", "less than or equal to 1"),
    ("bad-quantile-key", "  - {name: a.one, index: 1, category: a, stats: {benign_quantiles: {p99: 1.0}}}\n", 10, "p99", "quantile keys are probabilities in (0, 1) such as \"0.99\" (got 'p99')"),
    ("quantile-key-one", "  - {name: a.one, index: 1, category: a, stats: {benign_quantiles: {'1.0': 1.0}}}\n", 10, "'1.0'", "quantile keys are probabilities"),
    ("nan-quantile", "  - {name: a.one, index: 1, category: a, stats: {benign_quantiles: {0.99: .nan}}}\n", 10, ".nan", "finite number"),
    ("missing-index", "  - {name: a.one, category: a}\n", 10, "{", "missing required key 'index'"),
    ("yaml-error", "  - {name: a.one, index: 1\n", 11, None, "YAML syntax error"),
]


@pytest.mark.parametrize(("body", "line", "token", "needle"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_invalid_library_is_located(tmp_path: Path, body: str, line: int, token: str | None, needle: str) -> None:
    path = tmp_path / "library.yaml"
    text = HEAD + body
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LibraryFileError) as info:
        load_library(path)
    err = info.value
    matches = [(ln, col, m) for ln, col, m in err.problems if needle in m]
    assert matches, err.message
    column = text.splitlines()[line - 1].index(token) + 1 if token is not None else 1
    assert matches[0][:2] == (line, column), err.message
    assert f"{path}:{line}:{column}: " in err.message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "1:1: file is empty"),
        ("kind: Policy\n", "1:7: kind must be 'FeatureLibrary' (got 'Policy')"),
        ("kind: FeatureLibrary\napiVersion: v0\n", "2:13: apiVersion must be 'auditor/v1'"),
        ("[1, 2]\n", "1:1: expected a mapping"),
    ],
)
def test_wrong_document(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "library.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LibraryFileError, match=re.escape(needle)):
        load_library(path)


def test_missing_probe_file_is_located(tmp_path: Path) -> None:
    path = tmp_path / "library.yaml"
    path.write_text(HEAD + FEAT + "probes:\n  - name: p\n    path: probes/p.json\n", encoding="utf-8")
    with pytest.raises(LibraryFileError, match=r"library.yaml:13:11: probe file not found"):
        load_library(path)


def test_missing_file() -> None:
    with pytest.raises(LibraryError, match="feature library file not found"):
        load_library("does/not/exist.yaml")


def test_in_memory_library_has_no_path() -> None:
    lib = FeatureLibrary.model_validate(
        {
            "apiVersion": "auditor/v1",
            "kind": "FeatureLibrary",
            "id": "m",
            "sae": {"id": "s", "model": "m", "hookpoint": "h"},
            "features": [{"name": "a.b", "index": 0, "category": "a"}],
        }
    )
    assert lib.path is None and lib.has("a.b") and not lib.has("a.c")


def test_control_character_is_located_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "library.yaml"
    path.write_text(HEAD + '  - {name: a.one, index: 1, category: a, description: "ring \x07"}\n', encoding="utf-8")
    with pytest.raises(LibraryFileError) as info:
        load_library(path)
    assert info.value.message == (
        f"{path}:10:61: control character U+0007 is not allowed in YAML; "
        "remove it or write it as the escape \\a inside a double-quoted string"
    )


def test_alias_bomb_is_refused_and_located(tmp_path: Path) -> None:
    bomb = "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}' if i else '1'] * 10)}]\n" for i in range(9))
    path = tmp_path / "library.yaml"
    path.write_text(bomb + HEAD + FEAT, encoding="utf-8")  # x4, the 5th line, crosses the limit
    with pytest.raises(LibraryFileError) as info:
        load_library(path)
    assert info.value.message == (
        f"{path}:5:45: too many aliased nodes: the aliases up to here expand to more than 100,000 nodes; "
        "YAML aliases are expanded into full copies, so aliases of aliases grow exponentially "
        "(a 'billion laughs' bomb); write the values out or use fewer levels of aliases"
    )


def test_deep_nesting_is_located_not_a_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "library.yaml"
    path.write_text(HEAD + "  - {name: a.one, index: 1, category: a, stats: " + "[" * 5000 + "]" * 5000 + "}\n", encoding="utf-8")
    with pytest.raises(LibraryFileError) as info:
        load_library(path)
    # the library, its features, the feature are levels 1-3: the 198th "[" (column 49 + 197) is level 201
    assert info.value.message == (
        f"{path}:10:246: lists and mappings nested more than 200 levels deep; "
        "no policy, feature library or config needs that many, so flatten the structure"
    )
