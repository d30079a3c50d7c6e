"""sae-auditor: audit a language model through sparse-autoencoder features."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from auditor.steering.session import attach

__version__ = "0.1.0"
__all__ = ["__version__", "attach"]


def __getattr__(name: str) -> Any:
    # attach pulls in torch and transformers: import it on first use only.
    if name == "attach":
        from auditor.steering.session import attach

        return attach
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
