"""Policy validation: every malformed policy is reported at FILE:LINE:COLUMN with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from auditor.errors import PolicyError, PolicyErrors
from auditor.policy.loader import check_policy, parse_policy_file, validate_files
from auditor.policy.schema import Policy

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "feature_libraries" / "examples" / "tiny" / "library.yaml"

# Lines 1-4 of every case; the case body starts on line 5.
HEADER = """\
apiVersion: auditor/v1
kind: Policy
metadata: {name: t}
library: @LIB@
"""

# A valid rule: "rules:" on line 5, condition on lines 9-11.
RULE = """\
rules:
  - id: r1
    severity: high
    category: deception
    condition:
      feature: deception.fraud
      threshold: 4.0
"""


def _case(body: str, *, header: bool = True) -> str:
    return (HEADER + body if header else body).replace("@LIB@", str(TINY))


# (case id, YAML text, expected line, expected column or None, message substring)
CASES: list[tuple[str, str, int | None, int | None, str]] = [
    ("unknown-top-level-key", _case("colour: red\n" + RULE), 5, 1, "unknown key 'colour'"),
    (
        "unknown-rule-key",
        _case(RULE.replace("    category: deception\n", "    category: deception\n    priority: 3\n")),
        9,
        5,
        "unknown key 'priority'",
    ),
    (
        "misspelt-key-suggestion",
        _case(RULE.replace("    severity: high", "    severty: high")),
        7,
        5,
        "did you mean 'severity'",
    ),
    ("missing-required-key", _case(RULE.replace("    severity: high\n", "")), 6, 5, "missing required key 'severity'"),
    ("severity-not-in-set", _case(RULE.replace("severity: high", "severity: urgent")), 7, 15, "'info', 'low', 'medium', 'high' or 'critical' (got 'urgent')"),
    ("threshold-nan", _case(RULE.replace("threshold: 4.0", "threshold: .nan")), 11, 18, "finite number"),
    ("threshold-inf", _case(RULE.replace("threshold: 4.0", "threshold: -.inf")), 11, 18, "finite number"),
    ("threshold-string", _case(RULE.replace("threshold: 4.0", 'threshold: "4.0"')), 11, 18, "valid number (got '4.0')"),
    ("threshold-bool", _case(RULE.replace("threshold: 4.0", "threshold: true")), 11, 18, "valid number"),
    ("threshold-missing", _case(RULE.replace("      threshold: 4.0\n", "")), 9, 5, "missing required key 'threshold'"),
    (
        "unknown-feature-suggests",
        _case(RULE.replace("feature: deception.fraud", "feature: deception.frad")),
        10,
        16,
        "unknown feature 'deception.frad' in library 'tiny'; did you mean 'deception.fraud'",
    ),
    (
        "unknown-feature-in-group",
        _case(RULE.replace("feature: deception.fraud", "features: [deception.fraud, privacy.doxing]")),
        10,
        35,
        "did you mean 'privacy.doxxing'",
    ),
    (
        "unknown-feature-in-list-definition",
        _case("lists:\n  g: [bias.ethnic_slur, bias.sexism]\n" + RULE.replace("feature: deception.fraud", "list: g")),
        6,
        25,
        "unknown feature 'bias.sexism'",
    ),
    ("unknown-list", _case(RULE.replace("feature: deception.fraud", "list: nolist")), 10, 13, "unknown list 'nolist'"),
    (
        "unknown-list-suggests",
        _case("lists:\n  fraud_feats: [deception.fraud]\n" + RULE.replace("feature: deception.fraud", "list: fraud_feat")),
        12,
        13,
        "did you mean 'fraud_feats'",
    ),
    (
        "unknown-macro",
        _case(RULE.replace("      feature: deception.fraud\n      threshold: 4.0\n", "      macro: nomacro\n")),
        10,
        14,
        "unknown macro 'nomacro'",
    ),
    (
        "macro-cycle",
        _case(
            "macros:\n"
            "  a: {any: [{macro: b}, {feature: deception.fraud, threshold: 1}]}\n"
            "  b: {not: {macro: a}}\n"
            + RULE.replace("      feature: deception.fraud\n      threshold: 4.0\n", "      macro: a\n")
        ),
        7,
        20,
        "macro cycle: a -> b -> a",
    ),
    (
        "macro-self-reference",
        _case("macros:\n  loop:\n    all:\n      - macro: loop\n" + RULE),
        8,
        16,
        "macro cycle: loop -> loop",
    ),
    (
        "duplicate-rule-id",
        _case(RULE + RULE.replace("rules:\n", "")),
        12,
        9,
        "duplicate rule id 'r1' (first used by rules[0])",
    ),
    ("empty-all", _case(RULE.replace("      feature: deception.fraud\n      threshold: 4.0\n", "      all: []\n")), 10, 7, "at least 1 item"),
    ("empty-any", _case(RULE.replace("      feature: deception.fraud\n      threshold: 4.0\n", "      any: []\n")), 10, 7, "at least 1 item"),
    (
        "leaf-with-two-kinds",
        _case(RULE.replace("      threshold: 4.0\n", "      threshold: 4.0\n      probe: {path: p.json, threshold: 0.5}\n")),
        9,
        5,
        "exactly one kind, found several: feature, probe",
    ),
    (
        "leaf-with-two-targets",
        _case(RULE.replace("      threshold: 4.0\n", "      threshold: 4.0\n      list: g\n")),
        9,
        5,
        "found several: feature, list",
    ),
    (
        "leaf-with-no-kind",
        _case(RULE.replace("      feature: deception.fraud\n", "      agg: max\n")),
        9,
        5,
        "needs exactly one of: all, any, not, macro, feature",
    ),
    ("condition-not-a-mapping", _case(RULE.replace("    condition:\n      feature: deception.fraud\n      threshold: 4.0\n", "    condition: deception.fraud\n")), 9, 16, "must be a mapping"),
    ("missing-library-id", _case(RULE).replace(str(TINY), "no-such-library"), 4, 10, "feature library 'no-such-library' not found; looked in:"),
    ("missing-library-path", _case(RULE).replace(str(TINY), "./nowhere/library.yaml"), 4, 10, "feature library file not found"),
    (
        "count-above-without-above",
        _case(RULE.replace("      threshold: 4.0\n", "      agg: count_above\n      threshold: 4.0\n")),
        9,
        5,
        "agg 'count_above' needs 'above'",
    ),
    (
        "above-with-max",
        _case(RULE.replace("      threshold: 4.0\n", "      above: 1.0\n      threshold: 4.0\n")),
        9,
        5,
        "'above' only applies to agg count_above / fraction_above",
    ),
    (
        "fraction-threshold-above-one",
        _case(RULE.replace("      threshold: 4.0\n", "      agg: fraction_above\n      above: 1.0\n      threshold: 4.0\n")),
        9,
        5,
        "threshold must be in [0, 1]",
    ),
    ("bad-agg", _case(RULE.replace("      threshold: 4.0\n", "      agg: median\n      threshold: 4.0\n")), 11, 12, "(got 'median')"),
    ("bad-scope", _case(RULE.replace("    category: deception\n", "    category: deception\n    scope: everything\n")), 9, 12, "'prompt', 'completion' or 'any' (got 'everything')"),
    ("bad-rule-id", _case(RULE.replace("id: r1", "id: Bad Rule")), 6, 9, "should match pattern"),
    ("for-tokens-zero", _case(RULE + "    for_tokens: 0\n"), 12, 17, "greater than or equal to 1"),
    ("for-tokens-float", _case(RULE + "    for_tokens: 1.5\n"), 12, 17, "valid integer"),
    (
        "bad-steer-mode",
        _case(RULE + "    actions:\n      - steer: {feature: deception.fraud, mode: zero, value: 0}\n"),
        13,
        49,
        "'clamp', 'scale' or 'add' (got 'zero')",
    ),
    (
        "steer-unknown-feature",
        _case(RULE + "    actions:\n      - steer: {feature: deception.scam, mode: clamp}\n"),
        13,
        26,
        "steer target: unknown feature 'deception.scam'",
    ),
    (
        "steer-scale-needs-value",
        _case(RULE + "    actions:\n      - steer: {feature: deception.fraud, mode: scale}\n"),
        13,
        9,
        "steer mode 'scale' needs 'value' (the factor alpha)",
    ),
    ("steer-value-nan", _case(RULE + "    actions:\n      - steer: {feature: deception.fraud, mode: add, value: .nan}\n"), 13, 61, "finite number"),
    ("unknown-action", _case(RULE + "    actions: [alert, page]\n"), 12, 22, "'alert', 'block' or 'annotate' (got 'page')"),
    ("duplicate-action", _case(RULE + "    actions: [alert, alert]\n"), 12, 5, "action 'alert' is listed twice"),
    ("yaml-syntax-error", _case(RULE + "    actions: [alert\n"), 13, 1, "YAML syntax error"),
    ("yaml-bad-indent", _case("rules:\n  - id: r1\n   severity: high\n"), 7, 4, "YAML syntax error"),
    ("yaml-duplicate-key", _case(RULE + "    severity: low\n"), 12, 5, "duplicate key 'severity'"),
    ("empty-file", "", 1, 1, "file is empty"),
    ("comments-only-file", "# nothing here\n", 1, 1, "file is empty"),
    ("top-level-list", "- a\n- b\n", 1, 1, "expected a mapping at the top level"),
    ("wrong-kind", _case(RULE).replace("kind: Policy", "kind: FeatureLibrary"), 2, 7, "kind must be 'Policy' (got 'FeatureLibrary')"),
    ("wrong-api-version", _case(RULE).replace("apiVersion: auditor/v1", "apiVersion: auditor/v2"), 1, 13, "apiVersion must be 'auditor/v1' (got 'auditor/v2')"),
    (
        "missing-probe-file",
        _case(RULE.replace("      feature: deception.fraud\n      threshold: 4.0\n", "      probe: {path: probes/none.json, threshold: 0.5}\n")),
        10,
        21,
        "probe file not found",
    ),
    (
        "unknown-library-probe",
        _case(RULE.replace("      feature: deception.fraud\n      threshold: 4.0\n", "      probe: {name: fraud.probe, threshold: 0.5}\n")),
        10,
        21,
        "unknown probe 'fraud.probe' in library 'tiny'",
    ),
    (
        "probe-threshold-above-one",
        _case(RULE.replace("      feature: deception.fraud\n      threshold: 4.0\n", "      probe: {name: deception.probe, threshold: 5}\n")),
        10,
        49,
        "less than or equal to 1",
    ),
    (
        "unknown-anomaly-quantile",
        _case(RULE.replace("      feature: deception.fraud\n      threshold: 4.0\n", "      anomaly: {quantile: \"0.95\"}\n")),
        10,
        27,
        "quantile '0.95' is not in library 'tiny' reconstruction-error statistics (measured: 0.5, 0.99, 0.999)",
    ),
    (
        "anomaly-quantile-and-threshold",
        _case(RULE.replace("      feature: deception.fraud\n      threshold: 4.0\n", "      anomaly: {quantile: \"0.99\", threshold: 0.3}\n")),
        10,
        7,
        "exactly one of 'quantile'",
    ),
    (
        "anomaly-count-needs-threshold",
        _case(RULE.replace("      feature: deception.fraud\n      threshold: 4.0\n", "      anomaly: {threshold: 0.3}\n      agg: count_above\n")),
        9,
        5,
        "agg 'count_above' needs 'threshold'",
    ),
    ("bad-label-name", _case(RULE + "    labels: {bad-name: x}\n"), 12, 14, "key String should match pattern"),
    ("empty-rules", _case("rules: []\n"), 5, 1, "at least 1 item"),
    ("missing-metadata", _case(RULE).replace("metadata: {name: t}\n", ""), 1, 1, "missing required key 'metadata'"),
    (
        "exception-unknown-feature",
        _case(RULE + "    exceptions:\n      - name: x\n        condition: {feature: fiction.narative, threshold: 1}\n"),
        14,
        30,
        "did you mean 'fiction.narrative'",
    ),
    (
        "not-with-list",
        _case(RULE.replace("      feature: deception.fraud\n      threshold: 4.0\n", "      not: [{feature: deception.fraud, threshold: 1}]\n")),
        10,
        7,
        "must be a mapping",
    ),
    ("yaml-bad-tag-value", _case(RULE.replace("threshold: 4.0", "threshold: !!float abc")), 11, 18, "YAML value error"),
]


@pytest.mark.parametrize(("text", "line", "column", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_policy_is_located(tmp_path: Path, text: str, line: int, column: int | None, needle: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    result = check_policy(path)
    assert result.errors, "expected a problem"
    assert result.policy is None
    found = [e for e in result.errors if needle in e.reason]
    summary = "\n".join(e.message for e in result.errors)
    assert found, f"no error mentions {needle!r}:\n{summary}"
    err = found[0]
    assert err.path == str(path)
    assert (err.line, err.column if column is not None else None) == (line, column), summary
    assert err.message.startswith(f"{path}:{line}:")


def test_case_table_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


def test_valid_base_case_passes(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(_case(RULE), encoding="utf-8")
    policy, library = parse_policy_file(path)
    assert policy.rules[0].id == "r1"
    assert library.id == "tiny"


def test_all_problems_reported_in_one_pass_in_line_order(tmp_path: Path) -> None:
    text = _case(
        "rules:\n"
        "  - id: r1\n"
        "    severity: urgent\n"  # 7: schema
        "    category: deception\n"
        "    condition:\n"
        "      feature: deception.frad\n"  # 10: library
        "      threshold: 4.0\n"
        "  - id: r1\n"  # 12: duplicate id
        "    severity: low\n"
        "    category: deception\n"
        "    condition: {list: nope, threshold: .inf}\n"  # 15: unknown list + non-finite threshold
    )
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyErrors) as info:
        parse_policy_file(path)
    errors = info.value.errors
    assert [e.line for e in errors] == sorted(e.line or 0 for e in errors)
    reasons = " | ".join(e.reason for e in errors)
    for needle in ("got 'urgent'", "unknown feature 'deception.frad'", "duplicate rule id 'r1'", "unknown list 'nope'", "finite number"):
        assert needle in reasons
    assert {e.line for e in errors} >= {7, 10, 12, 15}
    # Problems inside a rule name the rule.
    assert all(e.rule == "r1" for e in errors)
    # PolicyErrors' message is one located line per problem.
    assert info.value.message.splitlines() == [e.message for e in errors]


def test_problems_in_the_library_point_into_the_library_file(tmp_path: Path) -> None:
    lib = tmp_path / "lib" / "library.yaml"
    lib.parent.mkdir()
    lib.write_text(
        "apiVersion: auditor/v1\nkind: FeatureLibrary\nid: broken\n"
        "sae: {id: s, model: m, hookpoint: blocks.0.hook_resid_post}\n"
        "features:\n  - {name: a.b, index: 1, category: a}\n  - {name: a.b, index: 2, category: a}\n",
        encoding="utf-8",
    )
    path = tmp_path / "p.yaml"
    path.write_text(_case(RULE).replace(str(TINY), "lib/library.yaml"), encoding="utf-8")
    errors = validate_files([path])
    assert errors[0].path == str(path) and errors[0].line == 4
    assert "feature library 'lib/library.yaml' is invalid" in errors[0].reason
    assert any(e.path == str(lib.resolve()) and e.line == 7 and "duplicate feature name 'a.b'" in e.reason for e in errors)


def test_library_found_by_id_through_search_dirs(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(_case(RULE).replace(str(TINY), "tiny"), encoding="utf-8")
    assert validate_files([path], search_dirs=[TINY.parent.parent]) == []
    assert validate_files([path], env={"AUDITOR_LIBRARY_PATH": str(TINY.parent.parent)}) == []
    missing = validate_files([path], env={})
    assert len(missing) == 1 and "not found; looked in:" in missing[0].reason
    assert str(REPO / "feature_libraries" / "tiny" / "library.yaml") in missing[0].reason


def test_invalid_probe_content_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "logistic", "inputs": "features", "coef": [1.0]}), encoding="utf-8")
    (tmp_path / "stranger.json").write_text(
        json.dumps({"kind": "logistic", "inputs": "features", "features": ["deception.frod"], "pool": "max", "coef": [1.0], "intercept": 0.0}),
        encoding="utf-8",
    )
    body = RULE.replace(
        "      feature: deception.fraud\n      threshold: 4.0\n",
        "      any:\n        - probe: {path: bad.json, threshold: 0.5}\n        - probe: {path: stranger.json, threshold: 0.5}\n",
    )
    path = tmp_path / "p.yaml"
    path.write_text(_case(body), encoding="utf-8")
    errors = validate_files([path])
    assert [(e.line, e.column) for e in errors] == [(11, 25), (12, 25)]
    assert "invalid probe" in errors[0].reason and "'intercept'" in errors[0].reason
    assert "lacks: unknown feature 'deception.frod'" in errors[1].reason


def test_a_binary_probe_file_is_reported_at_its_reference(tmp_path: Path) -> None:
    (tmp_path / "probe.json").write_bytes(bytes([0xC2, 0x2F, 0x68, 0x4E, 0xD8, 0x57, 0xD1, 0xA8]))
    body = RULE.replace(
        "      feature: deception.fraud\n      threshold: 4.0\n", "      probe: {path: probe.json, threshold: 0.5}\n"
    )
    path = tmp_path / "p.yaml"
    path.write_text(_case(body), encoding="utf-8")
    [error] = validate_files([path])
    assert (error.path, error.line, error.column) == (str(path), 10, 21)
    assert f"invalid probe: {tmp_path / 'probe.json'}: not a probe file (not UTF-8 JSON" in error.reason


def test_duplicate_policy_names_across_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for p in (a, b):
        p.write_text(_case(RULE), encoding="utf-8")
    errors = validate_files([a, b])
    assert len(errors) == 1
    assert (errors[0].path, errors[0].line, errors[0].column) == (str(b), 3, 18)
    assert "policy name 't' is also used by" in errors[0].reason


def test_unreadable_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    errors = validate_files([tmp_path / "missing.yaml"])
    assert len(errors) == 1 and errors[0].line is None
    assert "cannot read policy file" in errors[0].reason


def test_cross_references_checked_without_the_loader() -> None:
    """The schema alone rejects what needs the whole file but no library."""
    from pydantic import ValidationError

    data = {
        "apiVersion": "auditor/v1",
        "kind": "Policy",
        "metadata": {"name": "t"},
        "library": "tiny",
        "macros": {"a": {"macro": "b"}, "b": {"macro": "a"}},
        "rules": [
            {"id": "r", "severity": "low", "category": "c", "condition": {"macro": "a"}},
            {"id": "r", "severity": "low", "category": "c", "condition": {"list": "x", "threshold": 1}},
        ],
    }
    with pytest.raises(ValidationError) as info:
        Policy.model_validate(data)
    text = str(info.value)
    assert "macro cycle: a -> b -> a" in text
    assert "duplicate rule id 'r'" in text
    assert "unknown list 'x'" in text


def test_policy_error_is_an_auditor_error() -> None:
    err = PolicyError("f.yaml", 3, 7, "boom", "r1")
    assert err.message == "f.yaml:3:7: boom"


@pytest.mark.parametrize(
    ("char", "line", "column", "escape"),
    [("\x00", 5, 1, "\\0"), ("\x07", 9, 23, "\\a")],
    ids=["nul-starts-a-line", "bel-in-a-quoted-string"],
)
def test_control_character_is_located_not_a_traceback(
    tmp_path: Path, char: str, line: int, column: int, escape: str
) -> None:
    text = _case(RULE.replace("    category: deception\n", '    category: deception\n    description: "bad @ here"\n'))
    text = text.replace("rules:", char + "rules:") if char == "\x00" else text.replace("@", char)
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    result = check_policy(path)
    assert result.policy is None
    assert [e.message for e in result.errors] == [
        f"{path}:{line}:{column}: control character U+{ord(char):04X} is not allowed in YAML; "
        f"remove it or write it as the escape {escape} inside a double-quoted string"
    ]
    with pytest.raises(PolicyErrors) as info:
        parse_policy_file(path)
    assert info.value.errors[0].message == result.errors[0].message


def test_control_character_in_the_library_points_into_the_library(tmp_path: Path) -> None:
    lib = tmp_path / "library.yaml"
    lib.write_text(TINY.read_text(encoding="utf-8").replace("kind: FeatureLibrary", "kind: FeatureLibrary\x00"), encoding="utf-8")
    line = next(i for i, t in enumerate(lib.read_text(encoding="utf-8").splitlines(), 1) if "\x00" in t)
    path = tmp_path / "policy.yaml"
    path.write_text(_case(RULE).replace(str(TINY), str(lib)), encoding="utf-8")
    result = check_policy(path)
    messages = [e.message for e in result.errors]
    assert messages == [
        f"{path}:4:10: library: feature library '{lib}' is invalid (1 problem(s) in {lib})",
        f"{lib}:{line}:21: control character U+0000 is not allowed in YAML; "
        "remove it or write it as the escape \\0 inside a double-quoted string",
    ]


def test_alias_bomb_is_refused_quickly_and_located(tmp_path: Path) -> None:
    """A few hundred bytes of nested aliases ('billion laughs') must not expand to 10**9 values."""
    bomb = "".join(
        f"x{i}: &a{i} [{', '.join([f'*a{i - 1}' if i else '1'] * 10)}]\n" for i in range(9)
    )  # lines 5-13
    path = tmp_path / "policy.yaml"
    path.write_text(_case(bomb + RULE), encoding="utf-8")
    result = check_policy(path)
    # a0..a3 stand for 11, 111, 1111 and 11111 nodes; the 8th alias on line 9 ("x4: &a4 [" + 7 * "*a3, ") crosses 100,000
    assert [e.message for e in result.errors] == [
        f"{path}:9:45: too many aliased nodes: the aliases up to here expand to more than 100,000 nodes; "
        "YAML aliases are expanded into full copies, so aliases of aliases grow exponentially "
        "(a 'billion laughs' bomb); write the values out or use fewer levels of aliases"
    ]


def test_aliases_reuse_conditions_and_lists(tmp_path: Path) -> None:
    text = _case(
        "lists:\n  g: &feats [deception.fraud, bias.ethnic_slur]\n"
        + RULE.replace("    condition:\n", "    condition: &fraud\n")
        + "  - id: r2\n    severity: low\n    category: deception\n    condition: {not: *fraud}\n"
        + "  - id: r3\n    severity: low\n    category: deception\n    condition: {features: *feats, threshold: 1}\n"
    )
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    policy, _ = parse_policy_file(path)
    assert [r.id for r in policy.rules] == ["r1", "r2", "r3"]
    dumped = [r.model_dump(by_alias=True, exclude_none=True)["condition"] for r in policy.rules]
    assert dumped[1]["not"] == dumped[0]
    assert dumped[2]["features"] == ["deception.fraud", "bias.ethnic_slur"]


@pytest.mark.parametrize("levels", [300, 500, 2000])
def test_deeply_nested_condition_is_located_not_a_recursion_error(tmp_path: Path, levels: int) -> None:
    leaf = "{feature: deception.fraud, threshold: 1}"
    condition = "    condition: " + "{not: " * levels + leaf + "}" * levels + "\n"
    path = tmp_path / "policy.yaml"
    path.write_text(_case(RULE.split("    condition:")[0] + condition), encoding="utf-8")
    result = check_policy(path)
    # The policy, rules and the rule are levels 1-3: the 198th "{not:" (column 16 + 6 * 197) is level 201.
    assert [e.message for e in result.errors] == [
        f"{path}:9:1198: lists and mappings nested more than 200 levels deep; "
        "no policy, feature library or config needs that many, so flatten the structure"
    ]


def test_macros_nested_too_deep_are_located_at_the_first_macro_past_the_limit(tmp_path: Path) -> None:
    """Shallow YAML, deep condition: m{i} wraps m{i-1} in a 'not', so m50 is 101 levels deep once expanded."""
    macros = "macros:\n  m0: {feature: deception.fraud, threshold: 1}\n"  # lines 5-6
    macros += "".join(f"  m{i}: {{not: {{macro: m{i - 1}}}}}\n" for i in range(1, 1500))  # m{i} on line 6 + i
    path = tmp_path / "policy.yaml"
    path.write_text(_case(macros + RULE.replace("      feature: deception.fraud\n      threshold: 4.0\n", "      macro: m1499\n")), encoding="utf-8")
    result = check_policy(path)
    assert [e.message for e in result.errors] == [
        f"{path}:56:3: macros.m50: nests 101 levels deep with its macros expanded "
        "(each all, any, not and macro reference is one level); the most is 100: use fewer levels"
    ]


def test_rules_may_share_fields_through_a_merge_key(tmp_path: Path) -> None:
    rules = (
        "rules:\n"
        "  - &base {id: r1, severity: high, category: deception, condition: {feature: deception.fraud, threshold: 4.0}}\n"
        "  - {<<: *base, id: r2, severity: low}\n"
    )
    path = tmp_path / "policy.yaml"
    path.write_text(_case(rules), encoding="utf-8")
    policy, _ = parse_policy_file(path)
    assert [(r.id, r.severity, r.category) for r in policy.rules] == [("r1", "high", "deception"), ("r2", "low", "deception")]
