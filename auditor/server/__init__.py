"""The sidecar server (FastAPI): ``create_app(settings)`` and its settings.

Importing this package loads nothing heavy; the app loads the model, SAE,
library and policies in its lifespan.

Example::

    from auditor.server import Settings, create_app
    app = create_app(Settings.load(env=os.environ))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from auditor.server.app import create_app
    from auditor.server.settings import Settings

_EXPORTS = {"create_app": "auditor.server.app", "Settings": "auditor.server.settings"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
