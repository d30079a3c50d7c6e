"""``auditor policy validate`` / ``auditor policy schema`` and the shipped example policies."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from auditor.cli import main
from auditor.policy.loader import parse_policy_file, validate_files
from auditor.policy.schema import CONDITION_KINDS, iter_conditions

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "policies" / "examples").glob("*.yaml"))
TINY = REPO / "feature_libraries" / "examples" / "tiny" / "library.yaml"

BAD = f"""\
apiVersion: auditor/v1
kind: Policy
metadata: {{name: bad}}
library: {TINY}
rules:
  - id: r1
    severity: urgent
    category: deception
    condition: {{feature: deception.frad, threshold: 1.0}}
"""


def test_examples_exist_and_validate() -> None:
    assert len(EXAMPLES) >= 3
    assert validate_files(EXAMPLES) == []


def test_the_readme_policy_example_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The README's example names the default library: its features must be that library's.
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    policies = [b for b in blocks if re.search(r"^kind: Policy$", b, re.M)]
    assert policies, "README.md has no ```yaml block with kind: Policy"
    for i, text in enumerate(policies):
        path = tmp_path / f"readme-{i}.yaml"
        path.write_text(text, encoding="utf-8")
        assert main(["policy", "validate", str(path)]) == 0, capsys.readouterr().out
        assert capsys.readouterr().out.startswith(f"{path}: ok")


def test_examples_exercise_every_language_feature() -> None:
    aggs: set[str] = set()
    keys: set[str] = set()
    actions: set[str] = set()
    modes: set[str] = set()
    scopes: set[str] = set()
    probe_refs: set[str] = set()
    anomaly_refs: set[str] = set()
    has = {"lists": False, "macros": False, "for_tokens": False, "exceptions": False, "disabled": False, "labels": False}
    for path in EXAMPLES:
        policy, _ = parse_policy_file(path)
        has["lists"] |= bool(policy.lists)
        has["macros"] |= bool(policy.macros)
        for rule in policy.rules:
            scopes.add(rule.scope)
            has["for_tokens"] |= rule.for_tokens is not None
            has["exceptions"] |= bool(rule.exceptions)
            has["disabled"] |= not rule.enabled
            has["labels"] |= bool(rule.labels) and bool(rule.annotations)
            actions.update(rule.action_names)
            modes.update(s.mode for s in rule.steering)
        data = policy.model_dump(by_alias=True, exclude_none=True)
        roots = list(data.get("macros", {}).values()) + [r["condition"] for r in data["rules"]]
        for root in roots:
            for _, node in iter_conditions(root, ()):
                keys.update(k for k in CONDITION_KINDS if k in node)
                if "agg" in node:
                    aggs.add(node["agg"])
                if "probe" in node:
                    probe_refs.update(k for k in ("path", "name") if k in node["probe"])
                if "anomaly" in node:
                    anomaly_refs.update(k for k in ("quantile", "threshold") if k in node["anomaly"])
    assert aggs == {"max", "mean", "count_above", "fraction_above"}
    assert keys == set(CONDITION_KINDS)
    assert actions == {"alert", "block", "annotate", "steer"}
    assert modes == {"clamp", "scale", "add"}
    assert scopes == {"prompt", "completion", "any"}
    assert probe_refs == {"path", "name"} and anomaly_refs == {"quantile", "threshold"}
    assert all(has.values()), has


def test_cli_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["policy", "validate", *map(str, EXAMPLES)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == len(EXAMPLES)
    for path, line in zip(EXAMPLES, lines):
        n = len(parse_policy_file(path)[0].rules)
        assert line == f"{path}: ok ({n} rules)"


def test_cli_validate_reports_each_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD, encoding="utf-8")
    code = main(["policy", "validate", str(EXAMPLES[0]), str(bad)])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == f"{EXAMPLES[0]}: ok ({len(parse_policy_file(EXAMPLES[0])[0].rules)} rules)\n"
    lines = err.splitlines()
    assert lines[0].startswith(f"{bad}:7:15: rules[0].severity: Input should be")
    assert lines[1].startswith(f"{bad}:9:26: rules[0].condition.feature: unknown feature 'deception.frad'")
    assert len(lines) == 2


def test_cli_validate_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    assert main(["policy", "validate", str(empty)]) == 1
    assert capsys.readouterr().err == f"{empty}:1:1: file is empty; expected a policy (apiVersion: auditor/v1, kind: Policy, metadata, library, rules)\n"


def test_cli_validate_control_character(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD.replace("category: deception", 'category: deception\n    description: "\x07"'), encoding="utf-8")
    assert main(["policy", "validate", str(bad)]) == 1
    assert capsys.readouterr().err == (
        f"{bad}:9:19: control character U+0007 is not allowed in YAML; "
        "remove it or write it as the escape \\a inside a double-quoted string\n"
    )


def test_cli_schema_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"id", "severity", "condition", "actions", "for_tokens"} <= set(schema["$defs"]["Rule"]["properties"])


def test_cli_subprocess(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD.replace("severity: urgent", "severity: high"), encoding="utf-8")
    good = subprocess.run(
        [sys.executable, "-m", "auditor.cli", "policy", "validate", str(EXAMPLES[0])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f"{EXAMPLES[0]}: ok (")
    failed = subprocess.run(
        [sys.executable, "-m", "auditor.cli", "policy", "validate", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert "Traceback" not in failed.stderr
    assert failed.stderr.splitlines() == [
        f"{bad}:9:26: rules[0].condition.feature: unknown feature 'deception.frad' in library 'tiny'; "
        "did you mean 'deception.fraud'?"
    ]


def test_cli_validate_rejects_two_files_with_one_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = EXAMPLES[0].read_text(encoding="utf-8").replace("../../feature_libraries/examples/tiny/library.yaml", str(TINY))
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(text, encoding="utf-8")
    b.write_text(text, encoding="utf-8")
    assert main(["policy", "validate", str(a), str(b)]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"{a}: ok (")
    assert err.startswith(f"{b}: policy name ") and f"is also used by {a}" in err


def test_cli_validate_macros_that_double_finishes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """40 macros that each use the one before twice stand for 2**40 conditions; validate must not expand them."""
    macros = "macros:\n  m0: {feature: deception.fraud, threshold: 1}\n"
    macros += "".join(f"  m{i}: {{any: [{{macro: m{i - 1}}}, {{not: {{macro: m{i - 1}}}}}]}}\n" for i in range(1, 40))
    rule = "rules:\n  - {id: r1, severity: high, category: deception, condition: {macro: m39}}\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD[: BAD.index("rules:")] + macros + rule, encoding="utf-8")
    assert main(["policy", "validate", str(bad)]) == 1
    # m{i} stands for 4 + 2 * size(m{i-1}) conditions: m11 is the first past 10,000 (line 5 + 1 + 11)
    assert capsys.readouterr().err == (
        f"{bad}:17:3: macros.m11: stands for 10,236 conditions with its macros expanded "
        "(every use of a macro is a full copy); the most is 10,000: use the largest macros fewer times\n"
    )
