"""sae-auditor: audit a language model through sparse-autoencoder features."""

from __future__ import annotations

from typing import TYPE_CHECKING

from auditor._lazy import lazy_exports

if TYPE_CHECKING:
    from auditor.steering.session import attach

__version__ = "0.1.0"

# attach pulls in torch and transformers: imported on first use only.
_EXPORTS = {"attach": "auditor.steering.session"}
__all__ = ["__version__", "attach"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
