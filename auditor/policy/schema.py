"""The policy file format: pydantic models that are the single source of truth.

A policy file (``policies/*.yaml``) is one :class:`Policy`. The JSON Schema that
``auditor policy schema`` prints is generated from these models, and every
per-field docstring below becomes that schema's ``description``.

Conditions form a tree. Each node is exactly one of:

- ``all: [...]`` / ``any: [...]`` / ``not: {...}`` (:class:`AllNode`, :class:`AnyNode`, :class:`NotNode`)
- ``macro: NAME`` (:class:`MacroRef`)
- a feature leaf: ``feature: NAME`` or ``features: [...]`` or ``list: NAME`` (:class:`FeatureLeaf`)
- a probe leaf: ``probe: {path|name, threshold}`` (:class:`ProbeLeaf`)
- an anomaly leaf: ``anomaly: {quantile|threshold}`` (:class:`AnomalyLeaf`)

Python field names that clash with keywords or builtins carry a trailing
underscore (``AllNode.all_``, ``AnyNode.any_``, ``NotNode.not_``,
``FeatureLeaf.list_``); the YAML keys are the plain words.

Example:
    >>> policy = Policy.model_validate({
    ...     "apiVersion": "auditor/v1", "kind": "Policy",
    ...     "metadata": {"name": "demo"}, "library": "tiny",
    ...     "rules": [{"id": "r1", "severity": "high", "category": "deception",
    ...                "condition": {"feature": "deception.fraud", "threshold": 4.0}}],
    ... })
    >>> policy.rules[0].actions
    ['alert']
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from auditor.features.yamlsource import format_path

__all__ = [
    "API_VERSION",
    "RULE_ID_PATTERN",
    "NAME_PATTERN",
    "LABEL_NAME_PATTERN",
    "CONDITION_KINDS",
    "Severity",
    "Scope",
    "Agg",
    "SteerMode",
    "SimpleAction",
    "FiniteFloat",
    "Metadata",
    "FeatureLeaf",
    "ProbeRef",
    "ProbeLeaf",
    "AnomalyLevel",
    "AnomalyLeaf",
    "MacroRef",
    "AllNode",
    "AnyNode",
    "NotNode",
    "Condition",
    "Leaf",
    "SteerParams",
    "SteerAction",
    "Action",
    "RuleException",
    "Rule",
    "Policy",
    "condition_kind",
    "iter_conditions",
    "policy_conditions",
    "DataPath",
    "reference_problems",
    "policy_json_schema",
    "MAX_CONDITION_DEPTH",
    "MAX_CONDITION_NODES",
]

API_VERSION = "auditor/v1"
"""The only ``apiVersion`` this code reads."""

RULE_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
"""Rule ids and policy names: lowercase, start with a letter or digit."""

NAME_PATTERN = r"^[a-z_][a-z0-9_.-]*$"
"""List and macro names."""

LABEL_NAME_PATTERN = r"^[a-zA-Z_][a-zA-Z0-9_]*$"
"""Alert label names follow the Prometheus / Alertmanager rule."""

MAX_CONDITION_DEPTH = 100
"""Most levels in one condition with its macros expanded (each all, any, not and macro reference is one).

The compiler recurses once or twice per level; a chain of macros that each
wrap the next is shallow YAML but a deep condition. Hand-written conditions
are under 10 levels deep."""

MAX_CONDITION_NODES = 10_000
"""Most condition nodes one condition (rule, exception or macro) stands for with its macros expanded.

Every use of a macro is a full copy, so macros that use the one before twice
double at each step: 30 lines could stand for 10**9 nodes and stall the
compiler (and a server's reload). Hand-written rules expand to a few dozen."""

Severity = Literal["info", "low", "medium", "high", "critical"]
Scope = Literal["prompt", "completion", "any"]
Agg = Literal["max", "mean", "count_above", "fraction_above"]
SteerMode = Literal["clamp", "scale", "add"]
SimpleAction = Literal["alert", "block", "annotate"]

# Strict: a quoted "4.0" is a mistake worth reporting, not coercing; ints are
# still accepted for floats. NaN and +-inf never make a sensible threshold.
FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]

_AGGS_WITH_LEVEL = ("count_above", "fraction_above")


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        use_attribute_docstrings=True,
    )


class Metadata(_Model):
    """Who the policy is and what it is for."""

    name: str = Field(pattern=RULE_ID_PATTERN)
    """Policy name, unique among loaded policies (the store and metrics key)."""
    description: str = ""
    """One line on what the policy guards against."""
    version: str = ""
    """Free-form version string (quote it in YAML: ``version: "1"``)."""


# ---------------------------------------------------------------- leaves


class FeatureLeaf(_Model):
    """Aggregate SAE feature activations over the rule's scoped tokens and compare to a threshold.

    Exactly one of ``feature``, ``features``, ``list`` is set. With a group
    (``features`` or ``list``) the per-token value is the max over the group.
    """

    feature: str | None = None
    """One feature name from the library (e.g. ``deception.fraud``)."""
    features: list[str] | None = Field(default=None, min_length=1)
    """Several feature names; the per-token value is their max."""
    list_: str | None = Field(default=None, alias="list")
    """Name of a policy ``lists`` entry; the per-token value is the max over its features."""
    agg: Agg = "max"
    """Aggregation over tokens: max, mean, count_above (tokens above ``above``), fraction_above (share of tokens above ``above``)."""
    above: FiniteFloat | None = None
    """Per-token activation level; required for count_above / fraction_above, forbidden otherwise."""
    threshold: FiniteFloat
    """The leaf fires when the aggregated value is >= threshold (a count for count_above, a fraction in [0, 1] for fraction_above)."""

    @model_validator(mode="after")
    def _check(self) -> FeatureLeaf:
        targets = (("feature", self.feature), ("features", self.features), ("list", self.list_))
        given = [k for k, v in targets if v is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "feature_leaf_target",
                "a feature leaf needs exactly one of 'feature', 'features', 'list' (got {given})",
                {"given": ", ".join(given) or "none"},
            )
        _check_agg_level(self.agg, self.above, "above")
        if self.agg == "fraction_above" and not 0.0 <= self.threshold <= 1.0:
            raise PydanticCustomError(
                "fraction_threshold",
                "agg 'fraction_above' compares a fraction: threshold must be in [0, 1] (got {threshold})",
                {"threshold": self.threshold},
            )
        return self

    @property
    def target(self) -> tuple[Literal["feature", "features", "list"], str | list[str]]:
        """Which of feature / features / list is set, and its value."""
        if self.feature is not None:
            return "feature", self.feature
        if self.features is not None:
            return "features", self.features
        return "list", self.list_  # type: ignore[return-value]


class ProbeRef(_Model):
    """A saved linear probe and the probability at which it fires."""

    path: str | None = None
    """Probe JSON file, relative to the policy file."""
    name: str | None = None
    """Name of a probe listed in the feature library's ``probes``."""
    threshold: FiniteFloat = Field(ge=0.0, le=1.0)
    """The leaf fires when the probe's probability is >= threshold."""

    @model_validator(mode="after")
    def _check(self) -> ProbeRef:
        if (self.path is None) == (self.name is None):
            raise PydanticCustomError(
                "probe_target", "a probe needs exactly one of 'path' (a probe JSON file) or 'name' (a library probe)"
            )
        return self


class ProbeLeaf(_Model):
    """Pool the scoped tokens' inputs, apply a linear probe, fire on its probability."""

    probe: ProbeRef
    """Which probe and its probability threshold."""


class AnomalyLevel(_Model):
    """The per-token reconstruction-error level of an anomaly leaf."""

    quantile: str | None = None
    """Key of the library's ``sae.stats.recon_error_quantiles`` (e.g. "0.999"); its value is the level."""
    threshold: FiniteFloat | None = Field(default=None, ge=0.0)
    """An explicit relative reconstruction-error level."""

    @field_validator("quantile", mode="before")
    @classmethod
    def _quantile_as_text(cls, value: Any) -> Any:
        # An unquoted ``quantile: 0.999`` is a float in YAML; the library keys are strings.
        if isinstance(value, float):
            return repr(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> AnomalyLevel:
        if (self.quantile is None) == (self.threshold is None):
            raise PydanticCustomError(
                "anomaly_level", "an anomaly needs exactly one of 'quantile' (a library quantile key) or 'threshold'"
            )
        return self


class AnomalyLeaf(_Model):
    """Aggregate per-token relative SAE reconstruction error over the scoped tokens.

    With agg max / mean the aggregated error is compared to the anomaly level.
    With count_above / fraction_above the anomaly level is the per-token level
    and ``threshold`` (required then, forbidden otherwise) is the count or fraction.
    """

    anomaly: AnomalyLevel
    """The reconstruction-error level (a library quantile or an explicit value)."""
    agg: Agg = "max"
    """Aggregation over tokens, as for feature leaves."""
    threshold: FiniteFloat | None = None
    """For count_above / fraction_above only: the token count (or fraction in [0, 1]) at which the leaf fires."""

    @model_validator(mode="after")
    def _check(self) -> AnomalyLeaf:
        _check_agg_level(self.agg, self.threshold, "threshold")
        if self.agg == "fraction_above" and self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise PydanticCustomError(
                "fraction_threshold",
                "agg 'fraction_above' compares a fraction: threshold must be in [0, 1] (got {threshold})",
                {"threshold": self.threshold},
            )
        return self


def _check_agg_level(agg: str, value: float | None, field: str) -> None:
    if agg in _AGGS_WITH_LEVEL and value is None:
        raise PydanticCustomError("agg_level_missing", "agg '{agg}' needs '{field}'", {"agg": agg, "field": field})
    if agg not in _AGGS_WITH_LEVEL and value is not None:
        raise PydanticCustomError(
            "agg_level_forbidden",
            "'{field}' only applies to agg count_above / fraction_above (agg is '{agg}')",
            {"agg": agg, "field": field},
        )


# ---------------------------------------------------------------- tree nodes


class MacroRef(_Model):
    """Use a named condition from the policy's ``macros``."""

    macro: str
    """Name of a macro defined in this policy."""


class AllNode(_Model):
    """True when every child is true; score = min of the children's scores."""

    all_: list[Condition] = Field(alias="all", min_length=1)
    """Child conditions (at least one)."""


class AnyNode(_Model):
    """True when some child is true; score = max of the children's scores."""

    any_: list[Condition] = Field(alias="any", min_length=1)
    """Child conditions (at least one)."""


class NotNode(_Model):
    """True when the child is false; score = 1 / child score (clipped)."""

    not_: Condition = Field(alias="not")
    """The negated condition."""


# Keys that select a node kind; feature/features/list all mean "feature leaf".
_KIND_OF_KEY: dict[str, str] = {
    "all": "all",
    "any": "any",
    "not": "not",
    "macro": "macro",
    "feature": "feature",
    "features": "feature",
    "list": "feature",
    "probe": "probe",
    "anomaly": "anomaly",
}
CONDITION_KINDS = tuple(_KIND_OF_KEY)
"""Keys that decide what a condition node is."""

_NODE_TYPES: dict[str, type[_Model]] = {
    "all": AllNode,
    "any": AnyNode,
    "not": NotNode,
    "macro": MacroRef,
    "feature": FeatureLeaf,
    "probe": ProbeLeaf,
    "anomaly": AnomalyLeaf,
}


def condition_kind(value: Any) -> str | None:
    """The node kind of a raw mapping or a model ("all", "feature", ...); None when undecidable."""
    if isinstance(value, BaseModel):
        for kind, cls in _NODE_TYPES.items():
            if isinstance(value, cls):
                return kind
        return None
    if not isinstance(value, Mapping):
        return None
    kinds = {_KIND_OF_KEY[k] for k in value if k in _KIND_OF_KEY}
    return kinds.pop() if len(kinds) == 1 else None


def _condition_tag(value: Any) -> str | None:
    # Tags are class names, not YAML keys, so they never look like a data key
    # in an error's ``loc`` (the loader walks ``loc`` through the data).
    kind = condition_kind(value)
    return _NODE_TYPES[kind].__name__ if kind is not None else None


def _check_condition_shape(value: Any) -> Any:
    """Explain a node that is none or several kinds before the union tries each member."""
    if isinstance(value, BaseModel):
        return value
    if not isinstance(value, Mapping):
        raise PydanticCustomError(
            "condition_not_mapping",
            "a condition must be a mapping with one of: {kinds} (got {got})",
            {"kinds": ", ".join(CONDITION_KINDS), "got": type(value).__name__},
        )
    keys = [k for k in value if k in _KIND_OF_KEY]
    kinds = sorted({_KIND_OF_KEY[k] for k in keys})
    if not kinds:
        raise PydanticCustomError(
            "condition_kind_missing",
            "a condition needs exactly one of: {kinds} (found keys: {found})",
            {"kinds": ", ".join(CONDITION_KINDS), "found": ", ".join(map(str, value)) or "none"},
        )
    if len(kinds) > 1 or len(keys) > 1 and kinds == ["feature"]:
        raise PydanticCustomError(
            "condition_kind_ambiguous",
            "a condition must be exactly one kind, found several: {found}; split it with all/any",
            {"found": ", ".join(keys)},
        )
    return value


_ConditionUnion = Annotated[
        Union[
            Annotated[AllNode, Tag("AllNode")],
            Annotated[AnyNode, Tag("AnyNode")],
            Annotated[NotNode, Tag("NotNode")],
            Annotated[MacroRef, Tag("MacroRef")],
            Annotated[FeatureLeaf, Tag("FeatureLeaf")],
            Annotated[ProbeLeaf, Tag("ProbeLeaf")],
            Annotated[AnomalyLeaf, Tag("AnomalyLeaf")],
        ],
        Discriminator(_condition_tag),
]

# The shape check runs before the discriminator so a node that is none or
# several kinds gets one clear message instead of one error per union member.
Condition = Annotated[_ConditionUnion, BeforeValidator(_check_condition_shape)]
"""One node of a condition tree (the union of the node models)."""

Leaf = Union[FeatureLeaf, ProbeLeaf, AnomalyLeaf]
"""A condition node that reads the model's activations."""


# ---------------------------------------------------------------- actions


class SteerParams(_Model):
    """Steer one library feature while the model generates (serve / library modes)."""

    feature: str
    """Feature name from the library."""
    mode: SteerMode
    """clamp: set the feature to ``value``; scale: multiply it by ``value`` (alpha); add: add ``value`` times its decoder direction."""
    value: FiniteFloat | None = None
    """Clamp target (default 0.0), scale factor alpha (required), or add coefficient (required). Always set after validation."""

    @model_validator(mode="before")
    @classmethod
    def _default_value(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("value") is None and data.get("mode") == "clamp":
            return {**data, "value": 0.0}
        return data

    @model_validator(mode="after")
    def _check(self) -> SteerParams:
        if self.value is None:
            meaning = "the factor alpha" if self.mode == "scale" else "the coefficient"
            raise PydanticCustomError(
                "steer_value_missing",
                "steer mode '{mode}' needs 'value' ({meaning})",
                {"mode": self.mode, "meaning": meaning},
            )
        return self


class SteerAction(_Model):
    """``steer: {feature, mode, value}``."""

    steer: SteerParams
    """What to steer and how."""


def _action_kind(value: Any) -> str:
    return "SimpleAction" if isinstance(value, str) else "SteerAction"


Action = Annotated[
    Union[Annotated[SimpleAction, Tag("SimpleAction")], Annotated[SteerAction, Tag("SteerAction")]],
    Discriminator(_action_kind),
]
"""``alert`` | ``block`` | ``annotate`` | ``{steer: {...}}``."""


# ---------------------------------------------------------------- rules


class RuleException(_Model):
    """A named condition that suppresses its rule when it holds."""

    name: str = Field(min_length=1)
    """Why the exception exists (shown when it suppresses a match)."""
    condition: Condition
    """When this holds, the rule does not match (its score is still reported)."""


class Rule(_Model):
    """One detection rule: a condition over scoped tokens plus what to do when it fires."""

    id: str = Field(pattern=RULE_ID_PATTERN, max_length=128)
    """Unique id: lowercase letters, digits, ``_ . -``; starts with a letter or digit."""
    description: str = ""
    """What the rule detects, one line."""
    enabled: bool = True
    """Disabled rules are validated but compiled out."""
    severity: Severity
    """info | low | medium | high | critical."""
    category: str = Field(min_length=1)
    """Category for ``category_scores`` (bias, deception, dangerous, ...)."""
    scope: Scope = "any"
    """Tokens the rule reads: prompt, completion, or any (all content tokens)."""
    condition: Condition
    """The condition tree."""
    for_tokens: StrictInt | None = Field(default=None, ge=1)
    """Fire only when the per-token condition holds on at least this many consecutive scoped tokens."""
    exceptions: list[RuleException] = Field(default_factory=list)
    """The rule is suppressed when any exception's condition holds."""
    labels: dict[Annotated[str, Field(pattern=LABEL_NAME_PATTERN)], str] = Field(default_factory=dict)
    """Labels copied onto alerts (Alertmanager labels)."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations copied onto alerts (summary, runbook_url, ...)."""
    actions: list[Action] = Field(default_factory=lambda: ["alert"], min_length=1)
    """What a match does: alert, block, annotate, steer. Default: [alert]."""

    @field_validator("actions")
    @classmethod
    def _unique_simple_actions(cls, actions: list[Action]) -> list[Action]:
        names = [a for a in actions if isinstance(a, str)]
        for name in names:
            if names.count(name) > 1:
                raise PydanticCustomError("duplicate_action", "action '{name}' is listed twice", {"name": name})
        return actions

    @property
    def action_names(self) -> list[str]:
        """Action kinds in order: "alert", "block", "annotate", "steer"."""
        return [a if isinstance(a, str) else "steer" for a in self.actions]

    @property
    def steering(self) -> list[SteerParams]:
        """The rule's steer actions."""
        return [a.steer for a in self.actions if isinstance(a, SteerAction)]


class Policy(_Model):
    """A policy file: metadata, the library it reads, reusable lists/macros, and rules."""

    api_version: Literal["auditor/v1"] = Field(alias="apiVersion")
    """Format version; must be ``auditor/v1``."""
    kind: Literal["Policy"]
    """Must be ``Policy``."""
    metadata: Metadata
    """Name and description."""
    library: str = Field(min_length=1)
    """Feature library id, or a path to a library.yaml relative to this file."""
    lists: dict[Annotated[str, Field(pattern=NAME_PATTERN)], Annotated[list[str], Field(min_length=1)]] = Field(
        default_factory=dict
    )
    """Named feature groups, usable as ``list: NAME`` in feature leaves."""
    macros: dict[Annotated[str, Field(pattern=NAME_PATTERN)], Condition] = Field(default_factory=dict)
    """Named conditions, usable as ``macro: NAME``; may use other macros, without cycles."""
    rules: list[Rule] = Field(min_length=1)
    """The rules (at least one)."""

    @model_validator(mode="after")
    def _check_references(self) -> Policy:
        problems = reference_problems(self.model_dump(by_alias=True, exclude_none=True))
        if problems:
            raise PydanticCustomError(
                "policy_references",
                "{problems}",
                {"problems": "; ".join(f"{format_path(path)}: {msg}" for path, msg in problems)},
            )
        return self

    def rule(self, rule_id: str) -> Rule:
        """The rule with this id (KeyError when absent)."""
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)


AllNode.model_rebuild()
AnyNode.model_rebuild()
NotNode.model_rebuild()
RuleException.model_rebuild()
Rule.model_rebuild()
Policy.model_rebuild()


# ---------------------------------------------------------------- cross-references

DataPath = tuple[Union[str, int], ...]
"""A location in raw policy data: keys and list indices from the root."""


def iter_conditions(node: Any, path: DataPath) -> Iterator[tuple[DataPath, Mapping[str, Any]]]:
    """Yield ``(path, mapping)`` for every condition mapping under ``node`` (raw data, tolerant of bad shapes)."""
    if not isinstance(node, Mapping):
        return
    yield path, node
    for key in ("all", "any"):
        children = node.get(key)
        if isinstance(children, list):
            for i, child in enumerate(children):
                yield from iter_conditions(child, (*path, key, i))
    if "not" in node:
        yield from iter_conditions(node["not"], (*path, "not"))


def policy_conditions(data: Mapping[str, Any]) -> Iterator[tuple[DataPath, Mapping[str, Any]]]:
    """Every condition mapping in raw policy data: macros, rule conditions, exception conditions."""
    macros = data.get("macros")
    if isinstance(macros, Mapping):
        for name, cond in macros.items():
            yield from iter_conditions(cond, ("macros", name))
    rules = data.get("rules")
    if isinstance(rules, list):
        for i, rule in enumerate(rules):
            if not isinstance(rule, Mapping):
                continue
            yield from iter_conditions(rule.get("condition"), ("rules", i, "condition"))
            exceptions = rule.get("exceptions")
            if isinstance(exceptions, list):
                for j, exc in enumerate(exceptions):
                    if isinstance(exc, Mapping):
                        yield from iter_conditions(exc.get("condition"), ("rules", i, "exceptions", j, "condition"))


def reference_problems(data: Mapping[str, Any]) -> list[tuple[DataPath, str]]:
    """Checks that need the whole file but not the library, on raw (or dumped) policy data.

    Returns ``(path, message)`` pairs, path pointing at the offending value:
    duplicate rule ids (at the second), unknown list and macro names, macro cycles,
    conditions too deep or too large once their macros are expanded.
    Shapes that are wrong in other ways are skipped (pydantic reports those).
    """
    problems: list[tuple[DataPath, str]] = []
    lists = data.get("lists") if isinstance(data.get("lists"), Mapping) else {}
    macros = data.get("macros") if isinstance(data.get("macros"), Mapping) else {}

    rules = data.get("rules")
    if isinstance(rules, list):
        first_seen: dict[str, int] = {}
        for i, rule in enumerate(rules):
            rid = rule.get("id") if isinstance(rule, Mapping) else None
            if not isinstance(rid, str):
                continue
            if rid in first_seen:
                problems.append(
                    (("rules", i, "id"), f"duplicate rule id {rid!r} (first used by rules[{first_seen[rid]}])")
                )
            else:
                first_seen[rid] = i

    for path, node in policy_conditions(data):
        ref = node.get("list")
        if isinstance(ref, str) and ref not in lists:
            problems.append(((*path, "list"), _unknown("list", ref, lists)))
        ref = node.get("macro")
        if isinstance(ref, str) and ref not in macros:
            problems.append(((*path, "macro"), _unknown("macro", ref, macros)))

    problems.extend(_macro_cycles(macros))
    problems.extend(_expansion_problems(data, macros))
    return problems


def _unknown(kind: str, name: str, known: Mapping[str, Any]) -> str:
    msg = f"unknown {kind} {name!r}"
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    if close:
        msg += f"; did you mean {' or '.join(repr(c) for c in close)}?"
    elif known:
        msg += f"; defined {kind}s: {', '.join(sorted(known))}"
    else:
        msg += f"; this policy defines no {kind}s"
    return msg


def _macro_uses(macros: Mapping[str, Any]) -> dict[str, list[tuple[str, DataPath]]]:
    """For each macro, the defined macros it references and where."""
    return {
        name: [
            (node["macro"], (*path, "macro"))
            for path, node in iter_conditions(cond, ("macros", name))
            if isinstance(node.get("macro"), str) and node["macro"] in macros
        ]
        for name, cond in macros.items()
    }


def _macro_cycles(macros: Mapping[str, Any]) -> list[tuple[DataPath, str]]:
    """Each cycle once, reported at the macro reference that closes it."""
    uses = _macro_uses(macros)
    problems: list[tuple[DataPath, str]] = []
    reported: set[frozenset[str]] = set()
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    for root in macros:
        if root in state:
            continue
        # Depth-first with explicit stacks: a chain of macros may be longer than Python's recursion limit.
        state[root] = 1
        stack = [root]
        pending = [iter(uses[root])]
        while pending:
            for target, path in pending[-1]:
                if state.get(target) == 1:
                    cycle = stack[stack.index(target) :] + [target]
                    key = frozenset(cycle)
                    if key not in reported:
                        reported.add(key)
                        problems.append((path, f"macro cycle: {' -> '.join(cycle)}"))
                elif target not in state:
                    state[target] = 1
                    stack.append(target)
                    pending.append(iter(uses[target]))
                    break
            else:
                pending.pop()
                state[stack.pop()] = 2
    return problems


def _expansion_problems(data: Mapping[str, Any], macros: Mapping[str, Any]) -> list[tuple[DataPath, str]]:
    """Conditions that, with their macros expanded, nest deeper than :data:`MAX_CONDITION_DEPTH` or stand
    for more than :data:`MAX_CONDITION_NODES` nodes; each reported where it first crosses the limit."""
    uses = {name: {target for target, _ in refs} for name, refs in _macro_uses(macros).items()}
    size: dict[str, tuple[int, int]] = {}  # macro -> (nodes, levels) with macros expanded
    over: set[str] = set()  # macros past a limit (reported at the first one; others use it)

    def measure(cond: Any) -> tuple[int, int, bool]:
        """(nodes, levels, uses a macro past a limit) of raw condition data; recurses only within ``cond``."""
        if not isinstance(cond, Mapping):
            return 1, 1, False
        ref = cond.get("macro")
        if isinstance(ref, str):
            nodes, levels = size.get(ref, (0, 0))  # unknown or on a cycle: reported elsewhere
            return 1 + nodes, 1 + levels, ref in over
        children = [c for key in ("all", "any") if isinstance(cond.get(key), list) for c in cond[key]]
        if "not" in cond:
            children.append(cond["not"])
        measured = [measure(c) for c in children]
        nodes = 1 + sum(m[0] for m in measured)
        levels = 1 + max((m[1] for m in measured), default=0)
        return nodes, levels, any(m[2] for m in measured)

    def problem(nodes: int, levels: int) -> str | None:
        if levels > MAX_CONDITION_DEPTH:
            return (
                f"nests {levels} levels deep with its macros expanded (each all, any, not and macro "
                f"reference is one level); the most is {MAX_CONDITION_DEPTH}: use fewer levels"
            )
        if nodes > MAX_CONDITION_NODES:
            return (
                f"stands for {nodes:,} conditions with its macros expanded (every use of a macro is a "
                f"full copy); the most is {MAX_CONDITION_NODES:,}: use the largest macros fewer times"
            )
        return None

    problems: list[tuple[DataPath, str]] = []
    for name in _dependency_order(uses):
        nodes, levels, uses_over = measure(macros[name])
        size[name] = (nodes, levels)
        message = None if uses_over else problem(nodes, levels)
        if uses_over or message is not None:
            over.add(name)
        if message is not None:
            problems.append((("macros", name), message))
    rules = data.get("rules")
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        if not isinstance(rule, Mapping):
            continue
        roots: list[tuple[DataPath, Any]] = [(("rules", i, "condition"), rule.get("condition"))]
        exceptions = rule.get("exceptions")
        for j, exc in enumerate(exceptions if isinstance(exceptions, list) else []):
            if isinstance(exc, Mapping):
                roots.append((("rules", i, "exceptions", j, "condition"), exc.get("condition")))
        for path, cond in roots:
            nodes, levels, uses_over = measure(cond)
            message = None if uses_over else problem(nodes, levels)
            if message is not None:
                problems.append((path, message))
    return problems


def _dependency_order(uses: Mapping[str, set[str]]) -> list[str]:
    """Macros ordered so each comes after every macro it uses; macros on or behind a cycle are left out."""
    waiting = {name: len(targets) for name, targets in uses.items()}
    users: dict[str, list[str]] = {}
    for name, targets in uses.items():
        for target in targets:
            users.setdefault(target, []).append(name)
    order = [name for name, n in waiting.items() if n == 0]
    for name in order:  # grows while it is walked
        for user in users.get(name, []):
            waiting[user] -= 1
            if waiting[user] == 0:
                order.append(user)
    return order


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema of a policy file (what ``auditor policy schema`` prints)."""
    schema = Policy.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema.setdefault("title", "Policy")
    return schema
