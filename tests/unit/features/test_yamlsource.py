"""parse_yaml: whatever the text holds, problems come back located, never as an exception."""

from __future__ import annotations

import pytest

from auditor.features.yamlsource import YamlProblem, parse_yaml


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
