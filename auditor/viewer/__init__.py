"""The feature viewer: ``auditor index-features`` and the ``/ui`` pages of the sidecar.

``index`` builds and reads the feature index (top contexts, histograms,
density per latent); ``web`` serves the pages. Importing this package loads
neither FastAPI nor torch.

Example::

    from auditor.viewer import mount_viewer
    app = create_app(settings)
    mount_viewer(app)            # pages under /ui/
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from auditor._lazy import lazy_exports

if TYPE_CHECKING:
    from auditor.viewer.index import FeatureIndex, IndexConfig, build_index, load_index
    from auditor.viewer.web import mount_viewer, router

_EXPORTS = {
    "FeatureIndex": "auditor.viewer.index",
    "IndexConfig": "auditor.viewer.index",
    "build_index": "auditor.viewer.index",
    "load_index": "auditor.viewer.index",
    "mount_viewer": "auditor.viewer.web",
    "router": "auditor.viewer.web",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
