"""Hookpoint names in the TransformerLens convention the SAE world uses.

``blocks.{L}.hook_resid_pre``   input of decoder layer L (the embeddings for L=0)
``blocks.{L}.hook_resid_post``  output of decoder layer L
``blocks.{L}.hook_attn_out``    what the attention sub-block adds to the residual stream
``blocks.{L}.hook_mlp_out``     what the MLP sub-block adds to the residual stream
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from auditor.errors import HookpointError

__all__ = ["HOOK_KINDS", "HookKind", "Hookpoint", "parse_hookpoint"]

HookKind = Literal["resid_pre", "resid_post", "mlp_out", "attn_out"]
HOOK_KINDS: tuple[str, ...] = get_args(HookKind)

_PATTERN = re.compile(r"blocks\.(0|[1-9][0-9]*)\.hook_(resid_pre|resid_post|mlp_out|attn_out)")
_ACCEPTED = ", ".join(f"blocks.<layer>.hook_{kind}" for kind in HOOK_KINDS)

# Order of the hookpoints inside one layer, as the forward pass reaches them.
_ORDER: dict[str, int] = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}


@dataclass(frozen=True)
class Hookpoint:
    """One place in the residual stream of a decoder-only model.

    Example::

        >>> Hookpoint(3, "resid_post").name
        'blocks.3.hook_resid_post'
    """

    layer: int
    """Index of the decoder layer, from 0."""
    kind: HookKind
    """Which activation of that layer."""

    def __post_init__(self) -> None:
        if self.kind not in HOOK_KINDS:
            raise HookpointError(f"unknown hookpoint kind {self.kind!r}; accepted forms: {_ACCEPTED}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise HookpointError(f"hookpoint layer must be an integer >= 0, got {self.layer!r}")

    @property
    def name(self) -> str:
        """The TransformerLens name, ``blocks.{layer}.hook_{kind}``."""
        return f"blocks.{self.layer}.hook_{self.kind}"

    @property
    def depth(self) -> tuple[int, int]:
        """Sort key: the order in which a forward pass reaches this hookpoint."""
        return (self.layer, _ORDER[self.kind])

    def check_layer(self, n_layers: int, model_name: str = "the model") -> None:
        """Raise :class:`HookpointError` if ``layer`` is not below ``n_layers``."""
        if self.layer >= n_layers:
            raise HookpointError(
                f"hookpoint {self.name}: layer {self.layer} is out of range for {model_name}, "
                f"which has {n_layers} layers (valid layers: 0..{n_layers - 1})"
            )

    def __str__(self) -> str:
        return self.name


def parse_hookpoint(name: str | Hookpoint, n_layers: int | None = None, model_name: str = "the model") -> Hookpoint:
    """Parse a TransformerLens hookpoint name; check the layer when ``n_layers`` is given.

    Example::

        >>> parse_hookpoint("blocks.15.hook_resid_post", n_layers=30)
        Hookpoint(layer=15, kind='resid_post')
    """
    if isinstance(name, Hookpoint):
        hookpoint = name
    else:
        match = _PATTERN.fullmatch(name.strip()) if isinstance(name, str) else None
        if match is None:
            raise HookpointError(f"malformed hookpoint {name!r}; accepted forms: {_ACCEPTED}")
        kind: HookKind = match.group(2)  # type: ignore[assignment]
        hookpoint = Hookpoint(int(match.group(1)), kind)
    if n_layers is not None:
        hookpoint.check_layer(n_layers, model_name)
    return hookpoint
