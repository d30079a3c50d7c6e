"""Feature interventions at an SAE hookpoint that keep the SAE's reconstruction error.

With ``f = encode(x)``, ``x_hat = decode(f)`` and the error ``e = x - x_hat``, an
intervention changes some latents (``f -> f'``) and writes back
``x' = decode(f') + e``. Decode is linear up to the input normalization
(``x_hat = (f W_dec + b_dec) * scale + shift``), so

    x' = x + ((f' - f) W_dec) * scale

which touches only the intervened latents' decoder rows and leaves ``e`` exactly
as it was. ``scale`` is ``1 / s`` for ``expected_average_only_in``, the row's
factor for ``constant_norm_rescale`` and ``layer_norm`` and 1 otherwise.

Modes (``f_i`` is the latent's activation on the incoming ``x``):

- ``clamp``: ``f'_i = v`` (``x + (v - f_i) W_dec[i]``), on positions where
  ``f_i > 0`` (``positions="active"``, the default) or on every position (``"all"``);
- ``scale``: ``f'_i = alpha * f_i`` (zero stays zero, so positions do not matter);
- ``add``: ``f'_i = f_i + c`` (``x + c W_dec[i]``), on every position by default,
  or only where ``f_i > 0`` with ``positions="active"``.

Coefficients are in the SAE's latent units, the same units as the activations
the auditor reports, so "clamp to 0" and "add 5" mean what a feature trace shows.

Example::

    iv = parse_intervention("deception.fraud=clamp:0", library)
    steerer = Steerer(sae, resolve_interventions([iv], library=library, d_sae=sae.cfg.d_sae))
    x_steered = steerer.apply(x)[0]             # [N, d_in]
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor

from auditor.errors import SteeringError

if TYPE_CHECKING:
    from auditor.features import FeatureLibrary
    from auditor.sae import SAE, NormState

__all__ = [
    "Mode",
    "Positions",
    "Intervention",
    "ResolvedIntervention",
    "SteeringLimits",
    "SteeringError",
    "Steerer",
    "parse_intervention",
    "resolve_interventions",
    "feature_label",
    "SteerOutput",
]

Mode = Literal["clamp", "scale", "add"]
Positions = Literal["active", "all"]
MODES: tuple[str, ...] = get_args(Mode)
POSITIONS: tuple[str, ...] = get_args(Positions)

# name=mode:value[@positions]; the name is a library name, an index or #index.
_CLI_FORM = re.compile(r"^\s*(?P<feature>[^=\s]+)\s*=\s*(?P<mode>[a-z]+)\s*(?::\s*(?P<value>[^@\s]+))?\s*(?:@\s*(?P<pos>[a-z]+))?\s*$")
_INDEX_FORM = re.compile(r"^#?(?P<index>[0-9]+)$")
# The example names a feature of the default library (a test keeps it there).
_CLI_HELP = "expected NAME=MODE:VALUE[@active|@all], e.g. deception.pretend_to_be=clamp:0 or 1234=add:8@all"
_EXAMPLE_VALUES = {"clamp": "0", "scale": "0.5", "add": "8"}


@dataclass(frozen=True)
class Intervention:
    """One requested change to one SAE latent.

    ``feature`` is a library name (``deception.fraud``) or a latent index.
    ``positions`` defaults by mode: ``active`` for clamp, ``all`` for add
    (scale is the same on both).
    """

    feature: str | int
    mode: Mode
    value: float
    positions: Positions | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SteeringError(f"unknown steering mode {self.mode!r}; use one of: {', '.join(MODES)}")
        if self.positions is not None and self.positions not in POSITIONS:
            raise SteeringError(
                f"unknown steering positions {self.positions!r}; use 'active' (where the feature fires) or 'all'"
            )
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise SteeringError(f"steering value for {self.feature!r} must be a finite number, got {self.value!r}")
        if isinstance(self.feature, bool) or not isinstance(self.feature, (str, int)):
            raise SteeringError(f"steering feature must be a library name or a latent index, got {self.feature!r}")
        if isinstance(self.feature, int) and self.feature < 0:
            raise SteeringError(f"latent index must be >= 0, got {self.feature}")

    @property
    def effective_positions(self) -> Positions:
        """``positions``, or the mode's default when it was not given."""
        if self.positions is not None:
            return self.positions
        return "all" if self.mode == "add" else "active"

    def describe(self) -> str:
        """The CLI spelling, ``feature=mode:value@positions``."""
        return f"{self.feature}={self.mode}:{self.value:g}@{self.effective_positions}"


@dataclass(frozen=True)
class SteeringLimits:
    """Bounds a steering request must stay within; violations raise :class:`SteeringError`.

    The defaults suit SAEs whose typical activations are in the tens; a server
    reads its own from its settings.
    """

    max_abs_value: float = 200.0
    """Largest ``|value|`` for clamp targets and add coefficients (latent units)."""
    min_scale: float = -10.0
    """Smallest scale factor alpha."""
    max_scale: float = 10.0
    """Largest scale factor alpha."""
    max_interventions: int = 16
    """Most interventions in one request."""

    def __post_init__(self) -> None:
        if not (self.max_abs_value >= 0 and math.isfinite(self.max_abs_value)):
            raise SteeringError(f"max_abs_value must be a finite number >= 0, got {self.max_abs_value}")
        if not self.min_scale <= self.max_scale:
            raise SteeringError(f"min_scale ({self.min_scale}) must be <= max_scale ({self.max_scale})")
        if self.max_interventions < 0:
            raise SteeringError(f"max_interventions must be >= 0, got {self.max_interventions}")

    def check(self, interventions: Sequence[Intervention]) -> None:
        """Raise :class:`SteeringError` naming the first intervention outside the limits."""
        if len(interventions) > self.max_interventions:
            raise SteeringError(
                f"{len(interventions)} interventions requested; at most {self.max_interventions} are allowed"
            )
        for iv in interventions:
            if iv.mode == "scale":
                if not self.min_scale <= iv.value <= self.max_scale:
                    raise SteeringError(
                        f"{iv.describe()}: scale factor {iv.value:g} is outside the allowed range "
                        f"[{self.min_scale:g}, {self.max_scale:g}]"
                    )
            elif abs(iv.value) > self.max_abs_value:
                raise SteeringError(
                    f"{iv.describe()}: |value| {abs(iv.value):g} exceeds the limit {self.max_abs_value:g} "
                    f"for {iv.mode}"
                )


def _parse_feature(text: str) -> str | int:
    m = _INDEX_FORM.match(text)
    return int(m.group("index")) if m else text


def parse_intervention(obj: Mapping[str, Any] | str | Intervention, library: FeatureLibrary | None = None) -> Intervention:
    """Parse ``{feature, mode, value, positions?}`` or the CLI form ``name=clamp:0[@all]``.

    The string form always spells the value (``name=clamp:0``); in the object form
    ``value`` may be left out for clamp (it means 0, as in a policy's ``steer``
    action). A feature written as digits (``1234`` or ``#1234``) is a latent
    index; anything else must be a name in ``library`` (checked here when a
    library is given, so the message can suggest close names).
    """
    if isinstance(obj, Intervention):
        iv = obj
    elif isinstance(obj, str):
        m = _CLI_FORM.match(obj)
        if m is None:
            raise SteeringError(f"cannot parse steering spec {obj!r}; {_CLI_HELP}")
        raw_value, mode = m.group("value"), m.group("mode")
        if raw_value is None and mode in MODES:
            # Every mode spells its value here (the help says NAME=MODE:VALUE): a bare "clamp"
            # meaning 0 would be the one guess the other modes refuse.
            raise SteeringError(
                f"steering spec {obj!r}: mode {mode!r} needs a value, e.g. "
                f"{m.group('feature')}={mode}:{_EXAMPLE_VALUES[mode]}; {_CLI_HELP}"
            )
        try:
            value = float(raw_value) if raw_value is not None else 0.0  # an unknown mode is refused below
        except ValueError:
            raise SteeringError(f"steering spec {obj!r}: {raw_value!r} is not a number; {_CLI_HELP}") from None
        iv = Intervention(
            feature=_parse_feature(m.group("feature")),
            mode=m.group("mode"),  # type: ignore[arg-type]
            value=value,
            positions=m.group("pos"),  # type: ignore[arg-type]
        )
    elif isinstance(obj, Mapping):
        known = {"feature", "mode", "value", "positions"}
        extra = sorted(set(obj) - known)
        if extra:
            raise SteeringError(f"unknown steering field(s) {', '.join(extra)}; accepted: {', '.join(sorted(known))}")
        if "feature" not in obj or "mode" not in obj:
            raise SteeringError("a steering entry needs 'feature' and 'mode' (and 'value' except for clamp)")
        feature = obj["feature"]
        if isinstance(feature, str):
            feature = _parse_feature(feature)
        value = obj.get("value")
        if value is None:
            if obj["mode"] != "clamp":
                raise SteeringError(f"steering mode {obj['mode']!r} for {feature!r} needs a 'value'")
            value = 0.0
        iv = Intervention(feature=feature, mode=obj["mode"], value=value, positions=obj.get("positions"))
    else:
        raise SteeringError(f"a steering entry must be an object or a NAME=MODE:VALUE string, got {type(obj).__name__}")
    if isinstance(iv.feature, str):
        if library is None:
            raise SteeringError(
                f"feature {iv.feature!r} is a name but no feature library is loaded; give a latent index instead"
            )
        if not library.has(iv.feature):
            raise SteeringError(f"steering target: {library.unknown_feature_message(iv.feature)}")
    return iv


@dataclass(frozen=True)
class ResolvedIntervention:
    """An :class:`Intervention` bound to a latent index."""

    index: int
    mode: Mode
    value: float
    positions: Positions
    label: str
    """Library name, or ``#index`` for unnamed latents (trace keys use it)."""
    source: str = "request"
    """``request`` or ``rule:<id>`` for policy-triggered steering."""


def feature_label(index: int, library: FeatureLibrary | None) -> str:
    """The library name of latent ``index``, else ``#index``."""
    name = library.name_for_index(index) if library is not None else None
    return name or f"#{index}"


def resolve_interventions(
    interventions: Sequence[Intervention | Mapping[str, Any] | str],
    *,
    library: FeatureLibrary | None,
    d_sae: int,
    limits: SteeringLimits | None = None,
    source: str = "request",
) -> list[ResolvedIntervention]:
    """Parse, check against ``limits`` and bind each intervention to its latent index."""
    parsed = [parse_intervention(iv, library) for iv in interventions]
    (limits or SteeringLimits()).check(parsed)
    out = []
    for iv in parsed:
        if isinstance(iv.feature, int):
            index = iv.feature
            if index >= d_sae:
                raise SteeringError(f"latent index {index} is out of range: the SAE has {d_sae} latents (0..{d_sae - 1})")
            label = feature_label(index, library)
        elif library is not None:
            index = library.feature(iv.feature).index
            if index >= d_sae:
                raise SteeringError(
                    f"feature {iv.feature!r} has index {index}, out of range for an SAE with {d_sae} latents; "
                    "the library does not describe this SAE"
                )
            label = iv.feature
        else:
            raise SteeringError(f"feature {iv.feature!r} is a name but no feature library is loaded")
        out.append(ResolvedIntervention(index, iv.mode, float(iv.value), iv.effective_positions, label, source))
    return out


@dataclass
class SteerOutput:
    """What :meth:`Steerer.apply` computed for one batch of rows."""

    x: Tensor
    """``[N, d_in]`` the steered activations."""
    features: Tensor
    """``[N, U]`` activations of ``Steerer.latents`` on the incoming activations (before steering)."""
    steered: Tensor
    """``[N, U]`` the same latents after steering."""


@dataclass
class Steerer:
    """Applies a fixed list of intervention slots, each switched on per row.

    ``latents`` is every latent the caller wants measured: the slots' latents
    first, then ``extra`` (for example the latents a policy watches), without
    duplicates. Encoding only those is exact for per-latent architectures; TopK
    ranks all latents, which :meth:`SAE.encode_with_norm` does internally.
    """

    sae: SAE
    slots: list[ResolvedIntervention]
    extra: Sequence[int] = ()
    latents: Tensor = field(init=False)
    _slot_cols: list[int] = field(init=False)
    _w_dec: Tensor = field(init=False)

    def __post_init__(self) -> None:
        order = list(dict.fromkeys([s.index for s in self.slots] + [int(i) for i in self.extra]))
        self.latents = torch.tensor(order, dtype=torch.long, device=self.sae.W_dec.device)
        col = {lat: c for c, lat in enumerate(order)}
        self._slot_cols = [col[s.index] for s in self.slots]
        n_slot_latents = len(dict.fromkeys(s.index for s in self.slots))
        # Only the slots' decoder rows can change x; they come first in `latents`.
        self._w_dec = self.sae.W_dec.index_select(0, self.latents[:n_slot_latents]).float()  # [S', d_in]
        self._n_slot_latents = n_slot_latents

    @functools.cached_property
    def _sub(self) -> SAE | None:
        """Per-latent architectures encode the measured latents from a copy of just their columns
        (no gather per call), made on the first encode that can use it; TopK ranks all latents."""
        return self.sae.subset(self.latents) if self.sae.cfg.architecture != "topk" and self.latents.numel() else None

    def column(self, index: int) -> int:
        """Column of latent ``index`` in :attr:`SteerOutput.features`."""
        return int((self.latents == index).nonzero()[0, 0])

    @torch.no_grad()
    def measure(self, x: Tensor) -> tuple[Tensor, NormState]:
        """Activations ``[N, U]`` of :attr:`latents` on ``x [N, d_in]``, with the SAE's norm state."""
        f, state, _ = self.measure_with_error(x, recon_error=False)
        return f, state

    @torch.no_grad()
    def measure_with_error(self, x: Tensor, *, recon_error: bool) -> tuple[Tensor, NormState, Tensor | None]:
        """:meth:`measure` plus, if asked, each row's relative reconstruction error ``[N]`` from the same encode."""
        if self.latents.numel() == 0 and not recon_error:
            from auditor.sae import NormState

            return x.new_zeros((x.shape[0], 0), dtype=torch.float32), NormState(x.new_ones(()), x.new_zeros(())), None
        if self._sub is not None and not recon_error:
            f, state = self._sub.encode_with_norm(x)
            return f.float(), state, None
        enc = self.sae.encode_watched(x, self.latents, recon_error=recon_error)
        return enc.features.float(), enc.state, enc.recon_error

    @torch.no_grad()
    def steer(self, x: Tensor, f: Tensor, state: NormState, enabled: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Steered ``x [N, d_in]`` and the latents after steering ``[N, U]``, from :meth:`measure`'s output.

        ``enabled [N, S]`` (bool) switches slots per row (default: all on). Slots run in
        order, each seeing the previous ones' result, so two slots on one latent
        compose (clamp then scale, ...).
        """
        new = f.clone()
        n = f.shape[0]
        for s, (slot, c) in enumerate(zip(self.slots, self._slot_cols)):
            on = torch.ones(n, dtype=torch.bool, device=f.device) if enabled is None else enabled[:, s]
            cur = new[:, c]
            if slot.positions == "active" and slot.mode != "scale":
                on = on & (cur > 0)
            if slot.mode == "clamp":
                cur.masked_fill_(on, slot.value)  # `cur` is a view of `new`: one kernel, in place
                continue
            target = cur * slot.value if slot.mode == "scale" else cur + slot.value
            new[:, c] = torch.where(on, target, cur)
        k = self._n_slot_latents
        if k == 0:
            return x, new
        # decode(f') + e - x == (f' - f) W_dec * scale: the change in the SAE's normalized units,
        # times the input normalization's scale (exactly 1 without normalization).
        diff = new[:, :k] - f[:, :k]  # [N, S']
        if self.sae.cfg.normalize_activations != "none":
            diff = diff * state.scale.float()
        steered_x = torch.addmm(x.float(), diff, self._w_dec)  # [N, d_in]
        return steered_x.to(x.dtype), new

    def apply(self, x: Tensor, enabled: Tensor | None = None) -> SteerOutput:
        """Measure and steer ``x [N, d_in]`` in one call (see :meth:`steer`)."""
        f, state = self.measure(x)
        new_x, new = self.steer(x, f, state, enabled)
        return SteerOutput(x=new_x, features=f, steered=new)
