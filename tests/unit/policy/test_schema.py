"""The policy schema models: defaults, the condition tree, actions, and the generated JSON Schema."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from auditor.policy.schema import (
    AllNode,
    AnomalyLeaf,
    AnyNode,
    FeatureLeaf,
    MacroRef,
    NotNode,
    Policy,
    ProbeLeaf,
    MAX_CONDITION_DEPTH,
    MAX_CONDITION_NODES,
    Rule,
    SteerAction,
    condition_kind,
    policy_json_schema,
    reference_problems,
)


def _rule(condition: Any, **extra: Any) -> dict[str, Any]:
    return {"id": "r1", "severity": "high", "category": "deception", "condition": condition, **extra}


def _policy(*rules: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "auditor/v1",
        "kind": "Policy",
        "metadata": {"name": "demo"},
        "library": "tiny",
        "rules": list(rules),
        **extra,
    }


def test_rule_defaults() -> None:
    rule = Rule.model_validate(_rule({"feature": "deception.fraud", "threshold": 4}))
    assert rule.enabled is True
    assert rule.scope == "any"
    assert rule.actions == ["alert"]
    assert rule.for_tokens is None
    assert rule.exceptions == [] and rule.labels == {} and rule.annotations == {}
    leaf = rule.condition
    assert isinstance(leaf, FeatureLeaf)
    assert leaf.agg == "max" and leaf.above is None
    assert leaf.threshold == 4.0 and isinstance(leaf.threshold, float)
    assert leaf.target == ("feature", "deception.fraud")


@pytest.mark.parametrize(
    ("condition", "cls"),
    [
        ({"all": [{"macro": "m"}]}, AllNode),
        ({"any": [{"macro": "m"}]}, AnyNode),
        ({"not": {"macro": "m"}}, NotNode),
        ({"macro": "m"}, MacroRef),
        ({"feature": "a.b", "threshold": 1}, FeatureLeaf),
        ({"features": ["a.b", "a.c"], "threshold": 1}, FeatureLeaf),
        ({"list": "g", "threshold": 1}, FeatureLeaf),
        ({"probe": {"path": "p.json", "threshold": 0.5}}, ProbeLeaf),
        ({"probe": {"name": "x.probe", "threshold": 0.5}}, ProbeLeaf),
        ({"anomaly": {"quantile": "0.999"}}, AnomalyLeaf),
        ({"anomaly": {"threshold": 0.6}, "agg": "count_above", "threshold": 3}, AnomalyLeaf),
    ],
)
def test_each_node_kind_parses_to_its_model(condition: dict[str, Any], cls: type) -> None:
    rule = Rule.model_validate(_rule(condition))
    assert type(rule.condition) is cls
    assert condition_kind(condition) == condition_kind(rule.condition)


def test_nested_tree_and_aliases() -> None:
    cond = {"all": [{"any": [{"feature": "a.b", "threshold": 1}, {"not": {"list": "g", "threshold": 2}}]}]}
    rule = Rule.model_validate(_rule(cond))
    assert isinstance(rule.condition, AllNode)
    inner = rule.condition.all_[0]
    assert isinstance(inner, AnyNode)
    negated = inner.any_[1]
    assert isinstance(negated, NotNode) and isinstance(negated.not_, FeatureLeaf)
    assert negated.not_.list_ == "g"
    # Dumping by alias gives back the YAML keys.
    assert rule.model_dump(by_alias=True, exclude_none=True)["condition"]["all"][0]["any"][1] == {
        "not": {"list": "g", "agg": "max", "threshold": 2.0}
    }


def test_unquoted_anomaly_quantile_becomes_text() -> None:
    rule = Rule.model_validate(_rule({"anomaly": {"quantile": 0.999}}))
    assert isinstance(rule.condition, AnomalyLeaf)
    assert rule.condition.anomaly.quantile == "0.999"


@pytest.mark.parametrize(
    ("action", "mode", "value"),
    [
        ({"steer": {"feature": "a.b", "mode": "clamp"}}, "clamp", 0.0),
        ({"steer": {"feature": "a.b", "mode": "clamp", "value": 2}}, "clamp", 2.0),
        ({"steer": {"feature": "a.b", "mode": "scale", "value": 0.5}}, "scale", 0.5),
        ({"steer": {"feature": "a.b", "mode": "add", "value": -3.0}}, "add", -3.0),
    ],
)
def test_steer_actions(action: dict[str, Any], mode: str, value: float) -> None:
    rule = Rule.model_validate(_rule({"macro": "m"}, actions=["block", action]))
    assert rule.action_names == ["block", "steer"]
    steer = rule.actions[1]
    assert isinstance(steer, SteerAction)
    assert (steer.steer.mode, steer.steer.value) == (mode, value)
    assert rule.steering == [steer.steer]


@pytest.mark.parametrize(
    ("value", "ok"),
    [(1, True), (2.5, True), (-0.0, True), (float("nan"), False), (float("inf"), False), ("1.0", False), (True, False), (None, False)],
)
def test_thresholds_are_finite_numbers(value: Any, ok: bool) -> None:
    data = _rule({"feature": "a.b", "threshold": value})
    if ok:
        assert Rule.model_validate(data).condition.threshold == float(value)  # type: ignore[union-attr]
    else:
        with pytest.raises(ValidationError):
            Rule.model_validate(data)


def test_models_are_immutable() -> None:
    rule = Rule.model_validate(_rule({"macro": "m"}))
    with pytest.raises(ValidationError):
        rule.severity = "low"  # type: ignore[misc]


def test_policy_lookup_and_valid_references() -> None:
    policy = Policy.model_validate(
        _policy(
            _rule({"macro": "strong"}),
            {**_rule({"list": "g", "threshold": 1}), "id": "r2"},
            lists={"g": ["a.b"]},
            macros={"strong": {"all": [{"macro": "weak"}]}, "weak": {"feature": "a.b", "threshold": 1}},
        )
    )
    assert policy.rule("r2").id == "r2"
    with pytest.raises(KeyError):
        policy.rule("nope")


def test_reference_problems_on_raw_data() -> None:
    data = _policy(
        _rule({"any": [{"macro": "a"}, {"list": "missing", "threshold": 1}]}),
        _rule({"macro": "zzz"}),
        macros={"a": {"macro": "b"}, "b": {"all": [{"macro": "c"}]}, "c": {"macro": "a"}},
    )
    problems = dict(reference_problems(data))
    assert problems[("rules", 1, "id")] == "duplicate rule id 'r1' (first used by rules[0])"
    assert problems[("rules", 0, "condition", "any", 1, "list")].startswith("unknown list 'missing'")
    assert problems[("rules", 1, "condition", "macro")].startswith("unknown macro 'zzz'")
    cycles = [msg for msg in problems.values() if msg.startswith("macro cycle")]
    assert cycles == ["macro cycle: a -> b -> c -> a"]


def test_reference_problems_tolerate_bad_shapes() -> None:
    assert reference_problems({"rules": "nope", "macros": [1], "lists": 3}) == []
    assert reference_problems({"rules": [None, {"condition": 5}, {"id": 3}]}) == []


LEAF = {"feature": "a.b", "threshold": 1}


def _too_deep(levels: int) -> str:
    return (
        f"nests {levels} levels deep with its macros expanded (each all, any, not and macro reference is one level); "
        f"the most is {MAX_CONDITION_DEPTH}: use fewer levels"
    )


def _chain(n: int, *, reverse: bool = False) -> dict[str, Any]:
    """m0 is a leaf; m{i} is ``not: {macro: m{i-1}}``: shallow YAML, 2 * i + 1 levels once expanded."""
    macros = {"m0": LEAF, **{f"m{i}": {"not": {"macro": f"m{i - 1}"}} for i in range(1, n)}}
    return dict(reversed(macros.items())) if reverse else macros


@pytest.mark.parametrize("reverse", [False, True], ids=["defined-in-use-order", "defined-in-reverse"])
def test_a_macro_chain_too_deep_is_reported_once_at_the_first_macro_past_the_limit(reverse: bool) -> None:
    first = MAX_CONDITION_DEPTH // 2  # m{first} is 2 * first + 1 levels deep
    data = _policy(_rule({"macro": "m2999"}), macros=_chain(3000, reverse=reverse))
    assert reference_problems(data) == [(("macros", f"m{first}"), _too_deep(2 * first + 1))]
    with pytest.raises(ValidationError, match=f"macros.m{first}: nests {2 * first + 1} levels deep"):
        Policy.model_validate(data)


def test_a_macro_chain_up_to_the_limit_is_accepted() -> None:
    n = MAX_CONDITION_DEPTH // 2  # the rule's {macro: m{n-1}} is 1 + (2 * (n - 1) + 1) = 2 * n levels
    policy = Policy.model_validate(_policy(_rule({"macro": f"m{n - 1}"}), macros=_chain(n)))
    assert len(policy.macros) == n


def test_a_deep_condition_without_macros_is_reported_at_the_rule() -> None:
    cond: dict[str, Any] = LEAF
    for _ in range(MAX_CONDITION_DEPTH):
        cond = {"not": cond}
    data = _policy(_rule({"all": [LEAF]}), {**_rule(cond), "id": "r2"})
    assert reference_problems(data) == [(("rules", 1, "condition"), _too_deep(MAX_CONDITION_DEPTH + 1))]


def test_macros_that_double_are_refused_before_they_are_expanded() -> None:
    """m{i} uses m{i-1} twice: 40 macros would stand for 2**40 nodes."""
    macros = {"m0": LEAF, **{f"m{i}": {"any": [{"macro": f"m{i - 1}"}, {"not": {"macro": f"m{i - 1}"}}]} for i in range(1, 40)}}
    exception = {"name": "e", "condition": {"macro": "m39"}}
    data = _policy({**_rule(LEAF), "exceptions": [exception]}, macros=macros)
    # m{i} stands for 1 + 2 + 3 * size(m{i-1}) ... computed the same way as the check:
    nodes = 1
    for i in range(1, 40):
        nodes = 1 + (1 + nodes) + (2 + nodes)
        if nodes > MAX_CONDITION_NODES:
            break
    assert reference_problems(data) == [
        (
            ("macros", f"m{i}"),
            f"stands for {nodes:,} conditions with its macros expanded (every use of a macro is a full copy); "
            f"the most is {MAX_CONDITION_NODES:,}: use the largest macros fewer times",
        )
    ]


def test_a_long_macro_cycle_is_reported_without_recursing() -> None:
    macros = {f"m{i}": {"macro": f"m{(i + 1) % 3000}"} for i in range(3000)}
    problems = reference_problems(_policy(_rule({"macro": "m0"}), macros=macros))
    assert problems == [(("macros", "m2999", "macro"), "macro cycle: " + " -> ".join([*(f"m{i}" for i in range(3000)), "m0"]))]


def test_json_schema_is_generated_from_the_models() -> None:
    schema = policy_json_schema()
    text = json.dumps(schema)
    assert json.loads(text) == schema
    rule = schema["$defs"]["Rule"]
    assert rule["additionalProperties"] is False
    for prop in ("id", "severity", "scope", "condition", "for_tokens", "exceptions", "labels", "annotations", "actions"):
        assert prop in rule["properties"]
        assert rule["properties"][prop].get("description")
    assert rule["properties"]["severity"]["enum"] == ["info", "low", "medium", "high", "critical"]
    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "library", "lists", "macros", "rules"}
    leaf = schema["$defs"]["FeatureLeaf"]
    assert set(leaf["properties"]) == {"feature", "features", "list", "agg", "above", "threshold"}
    assert leaf["properties"]["agg"]["enum"] == ["max", "mean", "count_above", "fraction_above"]
    steer = schema["$defs"]["SteerParams"]["properties"]["mode"]
    assert steer["enum"] == ["clamp", "scale", "add"]
