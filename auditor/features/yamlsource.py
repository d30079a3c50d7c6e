"""YAML that remembers where every value came from.

Feature libraries and policies are hand-written YAML; a problem in them is only
useful to a user when it says ``FILE:LINE:COLUMN``. :func:`parse_yaml` builds the
plain Python data *and* a :class:`SourceMap` from data paths (``("rules", 0,
"condition", "threshold")``) to 1-based positions, and :meth:`SourceMap.locate`
turns a pydantic error ``loc`` back into a position. It never raises for what
the text holds: a character YAML refuses, nesting deeper than :data:`MAX_DEPTH`
and aliases that expand past :data:`MAX_ALIAS_NODES` are located problems too.

Example:
    >>> data, smap, problems = parse_yaml("a:\\n  b: [1, 2]\\n")
    >>> smap.value(("a", "b", 1))
    (2, 10)
"""

from __future__ import annotations

import os

import difflib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import yaml
from pydantic import ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "DataPath",
    "MAX_ALIAS_NODES",
    "MAX_DEPTH",
    "Position",
    "SourceMap",
    "YamlProblem",
    "parse_yaml",
    "format_path",
    "located",
    "pydantic_problems",
]

DataPath = tuple[Union[str, int], ...]
Position = tuple[int, int]  # (line, column), both 1-based

MAX_ALIAS_NODES = 100_000
"""Most nodes that expanding YAML aliases may add to one document.

An alias (``*name``) is read as a full copy of its anchored value, so aliases
of aliases grow exponentially: ten levels of ten aliases ("billion laughs")
are a few hundred bytes that expand to 10**10 nodes. The largest policies and
libraries have a few thousand nodes, so the limit only refuses such bombs."""

MAX_DEPTH = 200
"""Most levels of lists and mappings nested in one document (aliases expanded).

Hand-written policies and libraries nest well under 20 levels. Reading a
document recurses once or more per level (PyYAML's composer, the builder,
pydantic, the policy checks), so a limit far below Python's recursion limit
keeps ``[[[[...]]]]`` a located problem instead of a RecursionError."""


@dataclass(frozen=True)
class YamlProblem:
    """A located problem found while reading YAML (syntax error, duplicate key, ...)."""

    line: int | None
    column: int | None
    message: str
    path: DataPath = ()
    """Data path the problem is about (empty when unknown)."""


def located(source: str | os.PathLike[str], line: int | None, column: int | None, message: str | None = None) -> str:
    """``FILE:LINE:COLUMN`` (as much of it as is known), with ``: message`` when given."""
    where = os.fspath(source)
    if line is not None:
        where += f":{line}" + (f":{column}" if column is not None else "")
    return where if message is None else f"{where}: {message}"


@dataclass
class SourceMap:
    """Positions of every value (and of every mapping key) in one YAML document."""

    values: dict[DataPath, Position] = field(default_factory=dict)
    """Where each value starts (for a sequence item: the item, after its dash)."""
    keys: dict[DataPath, Position] = field(default_factory=dict)
    """Where the key of each mapping entry starts."""

    def value(self, path: DataPath) -> Position | None:
        """Position of the value at ``path``, or None when it is not in the document."""
        return self.values.get(path)

    def key(self, path: DataPath) -> Position | None:
        """Position of the mapping key whose value is at ``path`` (None for the root and list items)."""
        return self.keys.get(path)

    def resolve(self, data: Any, loc: Sequence[Any]) -> tuple[DataPath, bool]:
        """The longest prefix of ``loc`` present in ``data``, and whether all of ``loc`` was found.

        Segments that are not keys or indices of the current value are skipped:
        pydantic puts union tags and type names (``"feature"``, ``"SteerAction"``)
        in ``loc`` between real keys.
        """
        node = data
        path: DataPath = ()
        complete = True
        for seg in loc:
            if isinstance(node, dict) and seg in node:
                node = node[seg]
                path = (*path, seg)
            elif isinstance(node, dict) and isinstance(seg, str) and (key := _key_spelt(node, seg)) is not None:
                # a validator re-spelt a non-string YAML key (``0.99:`` -> "0.99")
                node = node[key]
                path = (*path, key)
            elif isinstance(node, list) and isinstance(seg, int) and 0 <= seg < len(node):
                node = node[seg]
                path = (*path, seg)
            else:
                complete = False
        return path, complete

    def locate(self, data: Any, loc: Sequence[Any], *, prefer_key: bool = False) -> Position | None:
        """Best position for a problem at pydantic ``loc`` in ``data``.

        Scalars point at their value; mappings and lists (and ``prefer_key``,
        e.g. for an unknown key) point at the key that introduces them, so a
        problem with a whole block is reported on the line that names it.
        """
        path, _ = self.resolve(data, loc)
        node = _get(data, path)
        if prefer_key or isinstance(node, (dict, list)):
            pos = self.keys.get(path)
            if pos is not None:
                return pos
        return self.values.get(path) or self.keys.get(path)


def _key_spelt(mapping: dict[Any, Any], text: str) -> Any:
    for key in mapping:
        if not isinstance(key, str) and (str(key) == text or repr(key) == text):
            return key
    return None


def _get(data: Any, path: DataPath) -> Any:
    for seg in path:
        data = data[seg]
    return data


def format_path(path: Sequence[Any]) -> str:
    """``("rules", 0, "id")`` -> ``rules[0].id``."""
    out = ""
    for seg in path:
        if isinstance(seg, int):
            out += f"[{seg}]"
        else:
            out += f".{seg}" if out else str(seg)
    return out


_MERGE_TAG = "tag:yaml.org,2002:merge"
_UNHASHABLE: list[None] = [None]  # the key of an entry whose key is a list or mapping


def _hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


class _Refused(yaml.MarkedYAMLError):
    """The document exceeds a limit of this reader; ``problem`` is the whole message."""


class _Loader(yaml.SafeLoader):
    """A SafeLoader that bounds, while composing, how deep and how large the data will be.

    Composing shares one node per anchor, so it stays small; aliases are
    expanded when the node graph is turned into data, and every step after
    that (building, pydantic, policy checks) recurses once per level. Counting
    here refuses a deep or exploding document at the event that crosses the
    limit, before anything recurses or expands.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._expanded: dict[int, tuple[int, int]] = {}  # id(collection) -> (nodes, levels), aliases expanded
        self._aliased = 0  # nodes that the aliases composed so far expand to
        self._depth = 0  # lists and mappings open around the node being composed

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node: Node = super().compose_node(parent, index)
            nodes, levels = self._expanded.get(id(node), (1, 0))  # unknown: a scalar, or an alias inside its anchor
            self._aliased += nodes
            if self._aliased > MAX_ALIAS_NODES:
                raise _Refused(
                    problem=f"too many aliased nodes: the aliases up to here expand to more than {MAX_ALIAS_NODES:,} "
                    "nodes; YAML aliases are expanded into full copies, so aliases of aliases grow exponentially "
                    "(a 'billion laughs' bomb); write the values out or use fewer levels of aliases",
                    problem_mark=mark,
                )
            if self._depth + levels > MAX_DEPTH:
                raise _Refused(problem=_too_deep(" once this alias is expanded"), problem_mark=mark)
            return node
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)  # a scalar: one node, no levels (the default below)
        if self._depth == MAX_DEPTH:
            raise _Refused(problem=_too_deep(""), problem_mark=self.peek_event().start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children = node.value if isinstance(node, SequenceNode) else [n for pair in node.value for n in pair]
        sizes = [self._expanded.get(id(c), (1, 0)) for c in children]
        self._expanded[id(node)] = (1 + sum(n for n, _ in sizes), 1 + max((lv for _, lv in sizes), default=0))
        return node


def _too_deep(where: str) -> str:
    return (
        f"lists and mappings nested more than {MAX_DEPTH} levels deep{where}; "
        "no policy, feature library or config needs that many, so flatten the structure"
    )


def _mark(node: Node) -> Position:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Builder:
    def __init__(self, loader: _Loader) -> None:
        self.loader = loader
        self.smap = SourceMap()
        self.problems: list[YamlProblem] = []
        self._active: set[int] = set()
        self._merged: dict[int, int] = {}  # id(mapping) -> how many of its entries came from "<<"

    def build(self, node: Node, path: DataPath) -> Any:
        self.smap.values[path] = _mark(node)
        if id(node) in self._active:
            line, col = _mark(node)
            self.problems.append(YamlProblem(line, col, "recursive YAML alias"))
            return None
        if isinstance(node, ScalarNode):
            return self._scalar(node)
        self._active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            return self._scalar(node)
        finally:
            self._active.discard(id(node))

    def _scalar(self, node: Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            # e.g. "!!int x" or an unknown "!tag": report it where it is, keep going
            line, col = _mark(node)
            reason = getattr(exc, "problem", None) or str(exc)
            self.problems.append(YamlProblem(line, col, f"YAML value error: {reason}"))
            return None

    def _mapping(self, node: MappingNode, path: DataPath) -> dict[Any, Any]:
        merged = self._merged.get(id(node))
        if merged is None:  # first visit (an aliased mapping is flattened once, in place)
            own = sum(1 for key_node, _ in node.value if key_node.tag != _MERGE_TAG)
            try:
                self.loader.flatten_mapping(node)  # puts the entries of "<<" mappings first, in place
            except yaml.MarkedYAMLError as exc:
                # "<<: 5": only a mapping or a list of mappings can be merged; keep the mapping's own keys
                mark = exc.problem_mark or node.start_mark
                self.problems.append(
                    YamlProblem(
                        mark.line + 1,
                        mark.column + 1,
                        f"YAML merge key error: {exc.problem}; write '<<: *anchor' or '<<: [*a, *b]'",
                    )
                )
                node.value = [(k, v) for k, v in node.value if k.tag != _MERGE_TAG]
            merged = self._merged[id(node)] = len(node.value) - own
        keys = [self._scalar(key_node) if isinstance(key_node, ScalarNode) else _UNHASHABLE for key_node, _ in node.value]
        # YAML merge keys: the mapping's own keys override merged ones, and among merged entries the
        # last wins (flatten_mapping lists "<<: [*a, *b]" as b's entries, then a's). Only the mapping's
        # own keys must be unique.
        own_keys = {key for key in keys[merged:] if _hashable(key)}
        winner = {key: i for i, key in enumerate(keys[:merged]) if _hashable(key)}
        out: dict[Any, Any] = {}
        for i, ((key_node, value_node), key) in enumerate(zip(node.value, keys)):
            line, col = _mark(key_node)
            if not _hashable(key):
                self.problems.append(YamlProblem(line, col, "a mapping key must be a plain value, not a list or mapping"))
                continue
            if i < merged and (key in own_keys or winner[key] != i):
                continue
            if key in out:
                self.problems.append(YamlProblem(line, col, f"duplicate key {key!r} (a key may appear once per mapping)"))
                continue
            self.smap.keys[(*path, key)] = (line, col)
            out[key] = self.build(value_node, (*path, key))
        return out


# What YAML counts as a line break; positions are counted the way PyYAML's marks count them.
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")
# The escapes YAML double-quoted strings have a name for; any other character is written \xXX or \uXXXX.
_NAMED_ESCAPES = {0x00: "\\0", 0x07: "\\a", 0x08: "\\b", 0x0B: "\\v", 0x0C: "\\f", 0x1B: "\\e"}


def _position(text: str, index: int) -> Position:
    """1-based (line, column) of ``text[index]``."""
    line, start = 1, 0
    for brk in _LINE_BREAK.finditer(text, 0, index):
        line, start = line + 1, brk.end()
    return line, index - start + 1


def _unprintable_problem(text: str, exc: yaml.reader.ReaderError) -> YamlProblem:
    """The located problem for a character YAML does not allow (the reader refuses the whole text)."""
    code = exc.character if isinstance(exc.character, int) else ord(exc.character)
    what = "control character" if unicodedata.category(chr(code)) == "Cc" else "character"
    escape = _NAMED_ESCAPES.get(code) or (f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")
    more = len(yaml.reader.Reader.NON_PRINTABLE.findall(text, exc.position + 1))
    also = f" ({more} more in this file)" if more else ""
    line, col = _position(text, exc.position)
    return YamlProblem(
        line,
        col,
        f"{what} U+{code:04X} is not allowed in YAML{also}; "
        f"remove it or write it as the escape {escape} inside a double-quoted string",
    )


def parse_yaml(text: str) -> tuple[Any, SourceMap, list[YamlProblem]]:
    """Parse one YAML document into plain data plus its :class:`SourceMap`.

    Returns ``(data, source_map, problems)``; it never raises for what the
    text contains. A syntax error or a character YAML does not allow (a NUL,
    a control character) yields ``(None, empty map, [problem])``; an empty
    document yields ``None`` data and no problems (the caller knows what an
    empty file means to it). Duplicate keys are problems (the first value is
    kept), not silent overrides.
    """
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:  # the reader checks every character up front
        return None, SourceMap(), [_unprintable_problem(text, exc)]
    try:
        try:
            node = loader.get_single_node()
        except _Refused as exc:
            mark = exc.problem_mark
            line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
            return None, SourceMap(), [YamlProblem(line, col, exc.problem or "document refused")]
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            what = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
            line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
            return None, SourceMap(), [YamlProblem(line, col, f"YAML syntax error: {what}")]
        except yaml.YAMLError as exc:
            return None, SourceMap(), [YamlProblem(None, None, f"YAML error: {exc}")]
        if node is None:
            return None, SourceMap(), []
        builder = _Builder(loader)
        data = builder.build(node, ())
        return data, builder.smap, builder.problems
    finally:
        loader.dispose()


def pydantic_problems(
    exc: ValidationError,
    data: Any,
    smap: SourceMap,
    *,
    known_keys: Iterable[str] = (),
    skip_types: Iterable[str] = (),
) -> list[YamlProblem]:
    """Turn a pydantic ``ValidationError`` on ``data`` into located problems.

    ``known_keys`` (every key the format allows anywhere) feeds "did you mean"
    for unknown keys; error types in ``skip_types`` are dropped (the caller
    reports those itself, with better positions).
    """
    vocabulary = sorted(set(known_keys))
    skip = set(skip_types)
    problems: list[YamlProblem] = []
    for err in exc.errors(include_url=False):
        kind = err["type"]
        if kind in skip:
            continue
        loc = err["loc"]
        path, complete = smap.resolve(data, loc)
        if kind == "extra_forbidden" and complete and loc:
            key = path[-1]
            msg = f"unknown key {key!r}"
            close = difflib.get_close_matches(str(key), vocabulary, n=1, cutoff=0.7)
            if close:
                msg += f"; did you mean {close[0]!r}?"
            where = format_path(path[:-1])
            msg = f"{where}: {msg}" if where else msg
            pos = smap.key(path) or smap.value(path)
        elif kind == "missing" and loc:
            where = format_path(path)
            msg = f"missing required key {loc[-1]!r}" + (f" in {where}" if where else "")
            pos = smap.locate(data, path)
        elif loc and loc[-1] == "[key]":
            # A bad mapping key: point at the key itself.
            msg = f"{format_path(path)}: key {err['msg']}"
            got = err.get("input")
            if not isinstance(got, (dict, list)):
                msg += f" (got {got!r})"
            pos = smap.key(path) or smap.value(path)
        else:
            msg = err["msg"]
            if kind in ("literal_error", "string_pattern_mismatch", "enum") or kind.endswith("_type"):
                got = err.get("input")
                if not isinstance(got, (dict, list)):
                    msg += f" (got {got!r})"
            where = format_path(path)
            msg = f"{where}: {msg}" if where else msg
            pos = smap.locate(data, path)
        line, col = pos if pos is not None else (None, None)
        problems.append(YamlProblem(line, col, msg, path))
    return problems
