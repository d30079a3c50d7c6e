"""Steering: change SAE features at the hookpoint while the model generates.

Interventions (clamp, scale, add) keep the SAE's reconstruction error; they run
as a hook at the SAE hookpoint on every position, with the KV cache on, in
:func:`generate` (the sidecar's serve mode and ``auditor generate``) and in
:func:`attach` (a user's own ``transformers`` model). A policy rule's ``steer``
action switches its interventions on once the rule fires.
:func:`write_control_vector` exports an additive direction as a llama.cpp
control-vector GGUF file.

Names are imported on first use (PEP 562) so importing the package stays cheap.

Example::

    from auditor.pipeline import Auditor
    from auditor.steering import Intervention, generate
    from auditor.text import AuditInput

    auditor = Auditor.load()
    result = generate(auditor, AuditInput(prompt="Once upon a time"), max_tokens=20,
                      interventions=[Intervention(123, "clamp", 0.0)], compare=True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from auditor._lazy import lazy_exports

if TYPE_CHECKING:
    from auditor.steering._hook import SteeringHook, Trigger
    from auditor.steering.control_vector import ControlVector, control_vector, read_control_vector, write_control_vector
    from auditor.steering.generate import GenerationResult, generate
    from auditor.steering.interventions import (
        Intervention,
        ResolvedIntervention,
        Steerer,
        SteeringLimits,
        parse_intervention,
        resolve_interventions,
    )
    from auditor.steering.session import Session, attach

_EXPORTS: dict[str, str] = {
    "Intervention": "auditor.steering.interventions",
    "ResolvedIntervention": "auditor.steering.interventions",
    "Steerer": "auditor.steering.interventions",
    "SteeringLimits": "auditor.steering.interventions",
    "parse_intervention": "auditor.steering.interventions",
    "resolve_interventions": "auditor.steering.interventions",
    "SteeringHook": "auditor.steering._hook",
    "Trigger": "auditor.steering._hook",
    "GenerationResult": "auditor.steering.generate",
    "generate": "auditor.steering.generate",
    "Session": "auditor.steering.session",
    "attach": "auditor.steering.session",
    "ControlVector": "auditor.steering.control_vector",
    "control_vector": "auditor.steering.control_vector",
    "read_control_vector": "auditor.steering.control_vector",
    "write_control_vector": "auditor.steering.control_vector",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
