"""parse_yaml: whatever the text holds, problems come back located, never as an exception."""

from __future__ import annotations

from typing import Any

import pytest

from auditor.features.yamlsource import MAX_ALIAS_NODES, MAX_DEPTH, YamlProblem, parse_yaml


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        (
            "a: 1\nb: \"x\x07y\"\n",
            2,
            6,
            "control character U+0007 is not allowed in YAML; "
            "remove it or write it as the escape \\a inside a double-quoted string",
        ),
        (
            "\x00a: 1\n",
            1,
            1,
            "control character U+0000 is not allowed in YAML; "
            "remove it or write it as the escape \\0 inside a double-quoted string",
        ),
        (
            # CRLF is one line break, as in PyYAML's own positions
            "a: 1\r\nb: 2\r\nc: x\x1fy\r\n",
            3,
            5,
            "control character U+001F is not allowed in YAML; "
            "remove it or write it as the escape \\x1f inside a double-quoted string",
        ),
        (
            "a: \x7f\n",
            1,
            4,
            "control character U+007F is not allowed in YAML; "
            "remove it or write it as the escape \\x7f inside a double-quoted string",
        ),
        (
            "a: [1, 2]\nb: \ufffe\n",
            2,
            4,
            "character U+FFFE is not allowed in YAML; "
            "remove it or write it as the escape \\ufffe inside a double-quoted string",
        ),
        (
            "a: \x1b\nb: \x00\x00\n",
            1,
            4,
            "control character U+001B is not allowed in YAML (2 more in this file); "
            "remove it or write it as the escape \\e inside a double-quoted string",
        ),
    ],
    ids=["bel-in-quotes", "nul-first", "unit-separator-after-crlf", "del", "noncharacter", "counts-the-rest"],
)
def test_a_character_yaml_refuses_is_a_located_problem(text: str, line: int, column: int, message: str) -> None:
    data, smap, problems = parse_yaml(text)
    assert data is None and smap.values == {}
    assert problems == [YamlProblem(line, column, message)]


def test_allowed_characters_still_parse() -> None:
    text = 'a: "tab\\there, bell \\a, nul \\0"\nb: "\tliteral tab"\nc: caf\u00e9 \u2603 \U0001f600\n'
    data, _, problems = parse_yaml(text)
    assert problems == []
    assert data == {"a": "tab\there, bell \a, nul \0", "b": "\tliteral tab", "c": "caf\u00e9 \u2603 \U0001f600"}


def test_a_bad_merge_value_is_a_located_problem_and_the_own_keys_stay() -> None:
    data, _, problems = parse_yaml("a: 1\nb: {<<: 5, x: 1}\n")
    assert data == {"a": 1, "b": {"x": 1}}
    assert problems == [
        YamlProblem(
            2,
            9,
            "YAML merge key error: expected a mapping or list of mappings for merging, but found scalar; "
            "write '<<: *anchor' or '<<: [*a, *b]'",
        )
    ]


def _laughs(levels: int) -> str:
    """The 'billion laughs' bomb: each level is ten aliases of the one before."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_the_alias_that_crosses_the_limit() -> None:
    data, _, problems = parse_yaml(_laughs(10))  # 10**10 nodes if expanded
    assert data is None
    # l0..l3 expand to 11, 111, 1111, 11111 nodes: the aliases on lines 2-4 add 12,330, and the
    # eighth *l3 on line 5 (column 10 + 5 * 7) crosses 100,000.
    assert problems == [
        YamlProblem(
            5,
            45,
            "too many aliased nodes: the aliases up to here expand to more than 100,000 nodes; "
            "YAML aliases are expanded into full copies, so aliases of aliases grow exponentially "
            "(a 'billion laughs' bomb); write the values out or use fewer levels of aliases",
        )
    ]


def test_aliases_up_to_the_limit_expand() -> None:
    anchor = "a: &a [" + ", ".join(["x"] * (MAX_ALIAS_NODES // 100 - 1)) + "]\n"  # one list node + its items
    data, _, problems = parse_yaml(anchor + "b: [" + ", ".join(["*a"] * 100) + "]\n")
    assert problems == [] and len(data["b"]) == 100 and data["b"][99] == data["a"]
    _, _, problems = parse_yaml(anchor + "b: [" + ", ".join(["*a"] * 101) + "]\n")
    assert len(problems) == 1 and problems[0].message.startswith("too many aliased nodes")
    assert (problems[0].line, problems[0].column) == (2, 5 + 4 * 100)


def test_ordinary_anchors_aliases_and_merge_keys_still_work() -> None:
    text = (
        "base: &base {agg: max, threshold: 2.0}\n"
        "names: &names [a.one, b.two]\n"
        "one: *base\n"
        "merged: {<<: *base, feature: a.one}\n"
        "lists: {g: *names, h: [*names, *names]}\n"
    )
    data, smap, problems = parse_yaml(text)
    assert problems == []
    assert data["one"] == data["base"] == {"agg": "max", "threshold": 2.0}
    assert data["merged"] == {"agg": "max", "threshold": 2.0, "feature": "a.one"}
    assert data["lists"] == {"g": ["a.one", "b.two"], "h": [["a.one", "b.two"], ["a.one", "b.two"]]}
    assert data["one"] is not data["base"]  # copies, not shared objects
    assert smap.value(("lists", "h", 1)) == (2, 8)  # an aliased value points at its anchor


def _too_deep(where: str = "") -> str:
    return (
        f"lists and mappings nested more than {MAX_DEPTH} levels deep{where}; "
        "no policy, feature library or config needs that many, so flatten the structure"
    )


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 2000, 10000])
def test_deep_flow_nesting_is_refused_at_the_first_level_too_many(levels: int) -> None:
    data, _, problems = parse_yaml("a: " + "[" * levels + "]" * levels + "\n")
    # the mapping is level 1, so the list opened at column 4 + MAX_DEPTH - 1 is level MAX_DEPTH + 1
    assert data is None and problems == [YamlProblem(1, 4 + MAX_DEPTH - 1, _too_deep())]


def test_deep_block_nesting_is_refused() -> None:
    text = "".join("  " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 5))
    _, _, problems = parse_yaml(text)
    # mapping i (0-based) starts at key k{i}; mapping MAX_DEPTH is one too many
    assert problems == [YamlProblem(MAX_DEPTH + 1, 2 * MAX_DEPTH + 1, _too_deep())]


def test_nesting_up_to_the_limit_is_read() -> None:
    data, _, problems = parse_yaml("[" * MAX_DEPTH + "1" + "]" * MAX_DEPTH)
    assert problems == []
    for _ in range(MAX_DEPTH):
        assert isinstance(data, list) and len(data) == 1
        data = data[0]
    assert data == 1


def test_an_alias_that_expands_past_the_limit_is_refused_at_the_alias() -> None:
    half = MAX_DEPTH // 2 + 10
    text = "a: &a " + "[" * half + "]" * half + "\nb: " + "[" * half + "*a" + "]" * half + "\n"
    _, _, problems = parse_yaml(text)
    assert problems == [YamlProblem(2, 4 + half, _too_deep(" once this alias is expanded"))]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("base: &b {a: 1, b: 2}\nc: {<<: *b, b: 3}\n", {"a": 1, "b": 3}),
        ("base: &b {a: 1, b: 2}\nc: {b: 3, <<: *b}\n", {"b": 3, "a": 1}),
        ("x: &x {a: 1, b: 1}\ny: &y {b: 2, c: 2}\nc: {<<: [*x, *y], c: 3}\n", {"a": 1, "b": 1, "c": 3}),
        ("base: &b {a: 1}\nc: [{<<: *b, a: 2}, *b, {<<: *b}]\n", [{"a": 2}, {"a": 1}, {"a": 1}]),
    ],
    ids=["own-key-overrides", "own-key-first", "earlier-merge-wins", "anchor-unchanged"],
)
def test_merge_keys_are_overridden_by_the_mappings_own_keys(text: str, expected: Any) -> None:
    data, _, problems = parse_yaml(text)
    assert problems == [] and data["c"] == expected


def test_a_mappings_own_keys_must_still_be_unique_next_to_a_merge() -> None:
    data, _, problems = parse_yaml("base: &b {a: 1}\nc: {<<: *b, a: 2, a: 3}\n")
    assert data["c"] == {"a": 2}
    assert problems == [YamlProblem(2, 19, "duplicate key 'a' (a key may appear once per mapping)")]
