"""SAE file formats: a registry of readers that convert into the canonical :class:`SAE`.

Each :class:`SAEFormat` has ``detect(path) -> bool`` and ``load(path, opts) -> SAE``.
:class:`FormatRegistry` holds them in detection order; :func:`default_registry`
builds a fresh one with the built-in formats (no module-level mutable state, so a
caller or test can register its own without touching anyone else's).

Example::

    registry = default_registry()
    fmt = registry.detect(Path("gemma-scope/layer_12/width_16k/average_l0_82"))
    sae = fmt.load(path, LoadOptions(device="cpu"))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from auditor.errors import SAEFormatError, UnknownKeyError
from auditor.sae.formats._common import LoadOptions
from auditor.sae.sae import SAE

__all__ = ["FormatRegistry", "LoadOptions", "SAEFormat", "default_registry"]


@dataclass(frozen=True)
class SAEFormat:
    """One on-disk SAE format."""

    name: str
    """Registry key, also the ``format=`` argument of ``load_sae``."""
    description: str
    """One line: where the format comes from and what the path looks like."""
    detect: Callable[[Path], bool]
    """Cheap check whether a path (file or folder) is in this format."""
    load: Callable[[Path, LoadOptions], SAE]
    """Read the path into a canonical :class:`SAE`."""


class FormatRegistry:
    """Formats by name, kept in detection order (first match wins)."""

    def __init__(self, formats: Iterable[SAEFormat] = ()) -> None:
        self._formats: dict[str, SAEFormat] = {}
        for fmt in formats:
            self.register(fmt)

    def register(self, fmt: SAEFormat) -> None:
        """Add ``fmt``; a second format with the same name is a programming error."""
        if fmt.name in self._formats:
            raise ValueError(f"SAE format {fmt.name!r} is already registered")
        self._formats[fmt.name] = fmt

    def names(self) -> list[str]:
        """Registered names in detection order."""
        return list(self._formats)

    def get(self, name: str) -> SAEFormat:
        """The format called ``name``, or :class:`UnknownKeyError` listing the known ones."""
        if name not in self._formats:
            raise UnknownKeyError("SAE format", name, self._formats)
        return self._formats[name]

    def detect(self, path: Path) -> SAEFormat:
        """The first format whose ``detect`` accepts ``path``."""
        for fmt in self._formats.values():
            if fmt.detect(path):
                return fmt
        kind = "folder" if path.is_dir() else "file"
        raise SAEFormatError(
            str(path),
            f"this {kind} matches no known SAE format (tried: {', '.join(self._formats)}); "
            "to force one and see what is missing, pass --format NAME to 'auditor audit' "
            "(--sae-format NAME to 'auditor serve', format=NAME in Python)",
        )


def default_registry() -> FormatRegistry:
    """A fresh registry with the built-in formats in detection order."""
    from auditor.sae.formats import (
        dictionary_learning,
        gemma_scope,
        goodfire,
        llama_scope,
        openai,
        saelens,
        sparsify,
    )

    return FormatRegistry(
        [
            saelens.FORMAT,
            sparsify.FORMAT,
            gemma_scope.FORMAT,
            llama_scope.FORMAT,
            dictionary_learning.FORMAT,
            openai.FORMAT,
            goodfire.FORMAT,
        ]
    )
