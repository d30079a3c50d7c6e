"""``auditor policy ...``: validate policy files and print the policy JSON Schema.

Example::

    $ auditor policy validate policies/examples/*.yaml
    policies/examples/deception.yaml: ok (4 rules)
    $ auditor policy schema > policy.schema.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``policy`` command group to the top-level parser."""
    parser = subparsers.add_parser("policy", help="validate policies, print the policy schema")
    sub = parser.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    sub.required = True

    validate = sub.add_parser(
        "validate",
        help="check policy files; print FILE:LINE:COLUMN: message per problem",
        description="Check policy files against the schema and their feature library. "
        "Exit 0 when all are valid, 1 when any problem was found.",
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="policy YAML files")
    validate.add_argument(
        "--library-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="extra folder holding <id>/library.yaml (repeatable; searched first)",
    )
    validate.set_defaults(func=_validate)

    schema = sub.add_parser("schema", help="print the policy JSON Schema")
    schema.add_argument("--indent", type=int, default=2, help="JSON indent (default 2)")
    schema.set_defaults(func=_schema)


def _validate(args: argparse.Namespace) -> int:
    from auditor.policy.loader import check_policy

    from auditor.errors import PolicyError

    cache: dict[Any, Any] = {}
    names: dict[str, str] = {}
    failed = False
    for f in args.files:
        result = check_policy(f, search_dirs=args.library_dir, _library_cache=cache)
        errors = result.errors or _compile_errors(f, result.policy, result.library)
        if not errors and result.policy is not None:
            # The policy store keys engines by name, so two files may not share one.
            name = result.policy.metadata.name
            if name in names:
                errors = [PolicyError(f, None, None, f"policy name {name!r} is also used by {names[name]}")]
            names.setdefault(name, f)
        if errors:
            failed = True
            for err in errors:
                print(err.message, file=sys.stderr)
        else:
            n = len(result.policy.rules) if result.policy is not None else 0
            print(f"{f}: ok ({n} rule{'s' if n != 1 else ''})")
    return 1 if failed else 0


def _compile_errors(path: str, policy: Any, library: Any) -> list[Any]:
    """Problems only compilation finds, so that "ok" means the policy loads."""
    from auditor.errors import AuditorError, PolicyError, PolicyErrors
    from auditor.policy.engine import build_engine

    try:
        build_engine(policy, library, path=path)
    except PolicyErrors as exc:
        return list(exc.errors)
    except PolicyError as exc:
        return [exc]
    except AuditorError as exc:
        return [PolicyError(path, None, None, exc.message)]
    return []


def _schema(args: argparse.Namespace) -> int:
    from auditor.policy.schema import policy_json_schema

    print(json.dumps(policy_json_schema(), indent=args.indent))
    return 0
