"""Policies: the YAML rule language, its validation, compilation and evaluation.

Names are imported on first use (PEP 562) so that reading the schema or
validating a file does not import torch.

Example:
    >>> from auditor.policy import load_policy
    >>> engine = load_policy("policies/examples/deception.yaml")  # doctest: +SKIP
    >>> verdicts = engine.evaluate(batch)                         # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from auditor._lazy import lazy_exports

if TYPE_CHECKING:
    from auditor.policy.engine import (
        AuditBatch,
        LeafExplanation,
        PendingVerdicts,
        PolicyEngine,
        RuleMatch,
        SteerAction,
        Verdict,
        build_engine,
        load_policy,
        validate_files,
    )
    from auditor.policy.loader import PolicyCheck, check_policy, parse_policy_file
    from auditor.policy.probes import Probe, load_probe, save_probe
    from auditor.policy.schema import Policy, Rule, policy_json_schema
    from auditor.policy.store import PolicyStore, ReloadResult

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Policy": "auditor.policy.schema",
    "Rule": "auditor.policy.schema",
    "policy_json_schema": "auditor.policy.schema",
    "parse_policy_file": "auditor.policy.loader",
    "check_policy": "auditor.policy.loader",
    "PolicyCheck": "auditor.policy.loader",
    "PolicyEngine": "auditor.policy.engine",
    "AuditBatch": "auditor.policy.engine",
    "Verdict": "auditor.policy.engine",
    "PendingVerdicts": "auditor.policy.engine",
    "RuleMatch": "auditor.policy.engine",
    "LeafExplanation": "auditor.policy.engine",
    "SteerAction": "auditor.policy.engine",
    "build_engine": "auditor.policy.engine",
    "load_policy": "auditor.policy.engine",
    # The engine's validate_files also compiles, so it reports everything load_policy would.
    "validate_files": "auditor.policy.engine",
    "PolicyStore": "auditor.policy.store",
    "ReloadResult": "auditor.policy.store",
    "Probe": "auditor.policy.probes",
    "load_probe": "auditor.policy.probes",
    "save_probe": "auditor.policy.probes",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
