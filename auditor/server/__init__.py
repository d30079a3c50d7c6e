"""The sidecar server (FastAPI): ``create_app(settings)`` and its settings.

Importing this package loads nothing heavy; the app loads the model, SAE,
library and policies in its lifespan.

Example::

    from auditor.server import Settings, create_app
    app = create_app(Settings.load(env=os.environ))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from auditor._lazy import lazy_exports

if TYPE_CHECKING:
    from auditor.server.app import create_app
    from auditor.server.settings import Settings

_EXPORTS = {"create_app": "auditor.server.app", "Settings": "auditor.server.settings"}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
