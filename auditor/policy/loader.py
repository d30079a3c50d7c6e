"""Read and validate policy files, reporting every problem as ``FILE:LINE:COLUMN: message``.

Validation runs in one pass and never stops at the first problem:

1. YAML syntax (position from the parser), empty file, ``kind`` / ``apiVersion``;
2. the pydantic schema (:mod:`auditor.policy.schema`), each error mapped back to
   the key or value it is about;
3. checks on the whole file: duplicate rule ids, unknown list / macro names, macro cycles,
   conditions too deep or too large with their macros expanded;
4. checks against the feature library: unknown feature names (with "did you
   mean"), steer targets, probe files and their features, anomaly quantiles.

Example:
    >>> policy, library = parse_policy_file("policies/examples/deception.yaml")  # doctest: +SKIP
    >>> [e.message for e in validate_files(["bad.yaml"])]                         # doctest: +SKIP
    ['bad.yaml:7:15: rules[0].severity: Input should be ... (got 'urgent')']
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from auditor.errors import LibraryError, LibraryFileError, PolicyError, PolicyErrors, ProbeError
from auditor.features.library import FeatureLibrary, find_library, load_library
from auditor.features.yamlsource import DataPath, SourceMap, format_path, parse_yaml, pydantic_problems
from auditor.policy import schema
from auditor.policy.schema import API_VERSION, Policy, policy_conditions, reference_problems

__all__ = ["parse_policy_file", "validate_files", "check_policy", "PolicyCheck"]


class PolicyCheck:
    """The outcome of checking one policy file: the policy and library when valid, and all problems."""

    def __init__(
        self,
        path: str,
        policy: Policy | None,
        library: FeatureLibrary | None,
        errors: list[PolicyError],
    ) -> None:
        self.path = path
        self.policy = policy if not errors else None
        self.library = library
        self.errors = errors

    @property
    def ok(self) -> bool:
        """True when the file has no problems."""
        return not self.errors


@functools.lru_cache(maxsize=1)
def _known_keys() -> frozenset[str]:
    keys: set[str] = set()
    for obj in vars(schema).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == schema.__name__:
            for name, info in obj.model_fields.items():
                keys.add(info.alias or name)
    return frozenset(keys)


class _Collector:
    """Accumulates located problems for one policy file."""

    def __init__(self, path: str, data: Any, smap: SourceMap) -> None:
        self.path = path
        self.data = data
        self.smap = smap
        self.errors: list[PolicyError] = []

    def rule_id(self, path: DataPath) -> str | None:
        if len(path) >= 2 and path[0] == "rules" and isinstance(path[1], int):
            rules = self.data.get("rules") if isinstance(self.data, dict) else None
            if isinstance(rules, list) and path[1] < len(rules) and isinstance(rules[path[1]], dict):
                rid = rules[path[1]].get("id")
                return rid if isinstance(rid, str) else None
        return None

    def add(self, line: int | None, column: int | None, message: str, rule: str | None = None) -> None:
        self.errors.append(PolicyError(self.path, line, column, message, rule))

    def at(self, path: DataPath, message: str, *, with_path: bool = True) -> None:
        """A problem with the value at ``path`` (the dotted path is prefixed to the message)."""
        pos = self.smap.locate(self.data, path)
        line, col = pos if pos is not None else (None, None)
        text = f"{format_path(path)}: {message}" if with_path and path else message
        self.add(line, col, text, self.rule_id(path))


def check_policy(
    path: str | os.PathLike[str],
    *,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    _library_cache: dict[Path, FeatureLibrary | LibraryError] | None = None,
) -> PolicyCheck:
    """Check one policy file completely; never raises for problems in the file (they are in ``errors``).

    Relative paths in it (``library``, probe files) resolve against ``base_dir``, by default
    the file's own folder (another for a policy checked before it is put in place)."""
    fname = os.fspath(path)
    p = Path(fname)
    base = Path(base_dir).resolve() if base_dir is not None else p.resolve().parent
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return PolicyCheck(fname, None, None, [PolicyError(fname, None, None, f"cannot read policy file: {reason}")])

    data, smap, yaml_problems = parse_yaml(text)
    c = _Collector(fname, data, smap)
    for prob in yaml_problems:
        c.add(prob.line, prob.column, prob.message)
    if yaml_problems and data is None:
        return PolicyCheck(fname, None, None, c.errors)
    if data is None:
        c.add(1, 1, "file is empty; expected a policy (apiVersion: auditor/v1, kind: Policy, metadata, library, rules)")
        return PolicyCheck(fname, None, None, c.errors)
    if not isinstance(data, dict):
        c.add(1, 1, f"expected a mapping at the top level (apiVersion, kind, ...), got a {type(data).__name__}")
        return PolicyCheck(fname, None, None, c.errors)

    # A file of another kind or version would only produce noise below.
    kind = data.get("kind")
    if kind != "Policy":
        hint = " (this is a feature library; use `auditor library validate`)" if kind == "FeatureLibrary" else ""
        if "kind" in data:
            c.at(("kind",), f"kind must be 'Policy' (got {kind!r}){hint}", with_path=False)
        else:
            c.add(1, 1, "missing required key 'kind' (kind: Policy)")
        return PolicyCheck(fname, None, None, c.errors)
    version = data.get("apiVersion")
    if version != API_VERSION:
        if "apiVersion" in data:
            c.at(("apiVersion",), f"apiVersion must be {API_VERSION!r} (got {version!r})", with_path=False)
        else:
            c.add(1, 1, f"missing required key 'apiVersion' (apiVersion: {API_VERSION})")
        return PolicyCheck(fname, None, None, c.errors)

    policy: Policy | None = None
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        # A value YAML could not construct is None in ``data``; its schema error would only repeat that.
        yaml_positions = {(prob.line, prob.column) for prob in yaml_problems}
        for prob in pydantic_problems(
            exc, data, smap, known_keys=_known_keys(), skip_types=("policy_references",)
        ):
            if (prob.line, prob.column) not in yaml_positions:
                c.add(prob.line, prob.column, prob.message, c.rule_id(prob.path))

    for ref_path, message in reference_problems(data):
        c.at(ref_path, message)

    library = _check_library(c, base, search_dirs, env, _library_cache)
    if library is not None:
        _check_against_library(c, base, library)

    c.errors.sort(key=lambda e: (e.path != fname, e.path, e.line or 0, e.column or 0))
    errors = _dedupe(c.errors)
    return PolicyCheck(fname, policy, library, errors)


def _dedupe(errors: list[PolicyError]) -> list[PolicyError]:
    seen: set[str] = set()
    out = []
    for e in errors:
        if e.message not in seen:
            seen.add(e.message)
            out.append(e)
    return out


def _check_library(
    c: _Collector,
    base: Path,
    search_dirs: Sequence[str | os.PathLike[str]] | None,
    env: Mapping[str, str] | None,
    cache: dict[Path, FeatureLibrary | LibraryError] | None,
) -> FeatureLibrary | None:
    ref = c.data.get("library")
    if not isinstance(ref, str) or not ref:
        return None  # the schema already reported it
    try:
        lib_path = find_library(ref, search_dirs=search_dirs, base_dir=base, env=env).resolve()
    except LibraryError as exc:
        c.at(("library",), exc.message)
        return None
    cached = cache.get(lib_path) if cache is not None else None
    if cached is None:
        try:
            cached = load_library(lib_path)
        except LibraryError as exc:
            cached = exc
        if cache is not None:
            cache[lib_path] = cached
    if isinstance(cached, LibraryFileError):
        c.at(("library",), f"feature library {ref!r} is invalid ({len(cached.problems)} problem(s) in {lib_path})")
        for line, col, message in cached.problems:
            c.errors.append(PolicyError(str(lib_path), line, col, message))
        return None
    if isinstance(cached, LibraryError):
        c.at(("library",), cached.message)
        return None
    return cached


def _check_against_library(c: _Collector, base: Path, lib: FeatureLibrary) -> None:
    data = c.data

    def check_name(path: DataPath, name: Any) -> None:
        if isinstance(name, str) and not lib.has(name):
            c.at(path, lib.unknown_feature_message(name))

    lists = data.get("lists")
    if isinstance(lists, dict):
        for lname, items in lists.items():
            if isinstance(items, list):
                for i, name in enumerate(items):
                    check_name(("lists", lname, i), name)

    for path, node in policy_conditions(data):
        if "feature" in node:
            check_name((*path, "feature"), node["feature"])
        features = node.get("features")
        if isinstance(features, list):
            for i, name in enumerate(features):
                check_name((*path, "features", i), name)
        probe = node.get("probe")
        if isinstance(probe, dict):
            _check_probe(c, (*path, "probe"), probe, base, lib)
        anomaly = node.get("anomaly")
        if isinstance(anomaly, dict) and "quantile" in anomaly:
            q = anomaly["quantile"]
            q = repr(q) if isinstance(q, float) else q
            if isinstance(q, str) and lib.recon_error_quantile(q) is None:
                stats = lib.sae.stats
                measured = sorted(stats.recon_error_quantiles) if stats is not None else []
                have = f"measured: {', '.join(measured)}" if measured else "it has no sae.stats.recon_error_quantiles"
                c.at(
                    (*path, "anomaly", "quantile"),
                    f"quantile {q!r} is not in library {lib.id!r} reconstruction-error statistics ({have}); "
                    "use a measured quantile or an explicit 'threshold'",
                )

    rules = data.get("rules")
    if isinstance(rules, list):
        for i, rule in enumerate(rules):
            actions = rule.get("actions") if isinstance(rule, dict) else None
            if not isinstance(actions, list):
                continue
            for j, action in enumerate(actions):
                steer = action.get("steer") if isinstance(action, dict) else None
                if isinstance(steer, dict) and "feature" in steer:
                    name = steer["feature"]
                    if isinstance(name, str) and not lib.has(name):
                        c.at(
                            ("rules", i, "actions", j, "steer", "feature"),
                            "steer target: " + lib.unknown_feature_message(name),
                        )


def _check_probe(
    c: _Collector, path: DataPath, probe: Mapping[str, Any], base: Path, lib: FeatureLibrary
) -> None:
    file: Path | None = None
    where: DataPath = path
    if isinstance(probe.get("path"), str):
        where = (*path, "path")
        file = (base / probe["path"]).resolve()
        if not file.is_file():
            c.at(where, f"probe file not found: {file} (paths are relative to the policy file)")
            return
    elif isinstance(probe.get("name"), str):
        where = (*path, "name")
        try:
            entry = lib.probe(probe["name"])
        except LibraryError as exc:
            c.at(where, exc.message)
            return
        file = lib.resolve_path(entry.path)
    if file is None:
        return
    # Imported here: probes need torch, and most validations have no probe leaf.
    from auditor.policy.probes import load_probe

    try:
        loaded = load_probe(file)
    except ProbeError as exc:
        c.at(where, f"invalid probe: {exc.message}")
        return
    for name in loaded.features or ():
        if not lib.has(name):
            lacks = f"probe {file.name} reads a feature that library {lib.id!r} lacks: "
            c.at(where, lacks + lib.unknown_feature_message(name))


def parse_policy_file(
    path: str | os.PathLike[str],
    *,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> tuple[Policy, FeatureLibrary]:
    """Read, validate and return ``(policy, library)``; raise :class:`PolicyErrors` listing every problem
    (``base_dir``: see :func:`check_policy`)."""
    result = check_policy(path, search_dirs=search_dirs, env=env, base_dir=base_dir)
    if result.errors or result.policy is None or result.library is None:
        errors = result.errors or [PolicyError(os.fspath(path), None, None, "policy could not be loaded")]
        raise PolicyErrors(errors)
    return result.policy, result.library


def validate_files(
    paths: Iterable[str | os.PathLike[str]],
    *,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> list[PolicyError]:
    """All problems in all ``paths`` (empty when every file is valid); a shared library is read once
    (``base_dir``: see :func:`check_policy`)."""
    cache: dict[Path, FeatureLibrary | LibraryError] = {}
    errors: list[PolicyError] = []
    seen_names: dict[str, str] = {}
    for path in paths:
        result = check_policy(path, search_dirs=search_dirs, env=env, base_dir=base_dir, _library_cache=cache)
        errors.extend(result.errors)
        if result.policy is not None:
            name = result.policy.metadata.name
            if name in seen_names:
                errors.append(
                    PolicyError(
                        os.fspath(path),
                        *_name_position(path),
                        f"policy name {name!r} is also used by {seen_names[name]}; loaded policies need distinct metadata.name",
                    )
                )
            else:
                seen_names[name] = os.fspath(path)
    return errors


def _name_position(path: str | os.PathLike[str]) -> tuple[int | None, int | None]:
    try:
        data, smap, _ = parse_yaml(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None, None
    pos = smap.value(("metadata", "name"))
    return pos if pos is not None else (None, None)
