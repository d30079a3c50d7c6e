"""Feature libraries: the labelled SAE latents that policies name.

A library is one YAML file, ``feature_libraries/<id>/library.yaml``, that says
which SAE it describes and lists its labelled features (dotted lowercase names,
latent indices, categories, descriptions, measured statistics) plus optional
probes stored beside it. Policies refer to features by name, never by index.

Example:
    >>> lib = load_library("feature_libraries/examples/tiny/library.yaml")  # doctest: +SKIP
    >>> lib.feature("deception.fraud").index                                 # doctest: +SKIP
    12
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from auditor.errors import LibraryError, LibraryFileError
from auditor.features.yamlsource import SourceMap, YamlProblem, parse_yaml, pydantic_problems

__all__ = [
    "API_VERSION",
    "FEATURE_NAME_PATTERN",
    "FeatureSource",
    "QuantileMap",
    "SAEStats",
    "SAERef",
    "FeatureStats",
    "Feature",
    "ProbeEntry",
    "FeatureLibrary",
    "load_library",
    "library_to_yaml",
    "find_library",
    "library_search_dirs",
    "validate_library_data",
    "LIBRARY_FILE",
    "ENV_LIBRARY_PATH",
]

API_VERSION = "auditor/v1"
LIBRARY_FILE = "library.yaml"
"""File name of a library inside its folder."""
ENV_LIBRARY_PATH = "AUDITOR_LIBRARY_PATH"
"""Environment variable: extra folders (os.pathsep-separated) that hold ``<id>/library.yaml``."""

FEATURE_NAME_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$"
"""Dotted lowercase: ``category.what`` (at least two parts)."""
_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"

FeatureSource = Literal["contrastive", "neuronpedia", "manual", "autointerp"]
FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]


def _quantile_keys(value: Any) -> Any:
    """Accept unquoted YAML keys (``0.99: 1.2``) by spelling floats as their shortest string."""
    if isinstance(value, Mapping):
        return {repr(k) if isinstance(k, float) else k: v for k, v in value.items()}
    return value


def _check_quantile_key(key: str) -> str:
    try:
        q = float(key)
    except ValueError:
        q = math.nan
    if not 0.0 < q < 1.0:
        raise PydanticCustomError(
            "quantile_key", "quantile keys are probabilities in (0, 1) such as \"0.99\" (got {key})", {"key": repr(key)}
        )
    return key


QuantileMap = dict[Annotated[str, AfterValidator(_check_quantile_key)], FiniteFloat]
"""``{"0.99": 1.2, ...}``: quantile (as written) -> value."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, populate_by_name=True)


class SAEStats(_Model):
    """Measured statistics of the SAE as a whole."""

    recon_error_quantiles: QuantileMap = Field(default_factory=dict)
    """Quantiles of per-token relative reconstruction error ``||x - x_hat|| / ||x||`` on benign text."""
    dataset: str | None = None
    """What the statistics were measured on."""

    @field_validator("recon_error_quantiles", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        return _quantile_keys(value)


class SAERef(_Model):
    """Which SAE the library's indices refer to."""

    id: str = Field(min_length=1)
    """SAE id (a registry key or a descriptive name)."""
    model: str = Field(min_length=1)
    """The model the SAE reads (a Hugging Face repo id)."""
    hookpoint: str = Field(min_length=1)
    """Where the SAE reads the model, e.g. ``blocks.15.hook_resid_post``."""
    path: str | None = None
    """Weights: a path relative to the library file, ``hf://repo/path``, or ``release:ID``."""
    d_sae: StrictInt | None = Field(default=None, ge=1)
    """Number of latents; when given, every feature index must be below it."""
    stats: SAEStats | None = None
    """Optional measured statistics."""


class FeatureStats(_Model):
    """Measured statistics of one feature, each on named data."""

    benign_quantiles: QuantileMap = Field(default_factory=dict)
    """Activation quantiles on benign text."""
    max_activation: FiniteFloat | None = None
    """Largest activation seen."""
    auroc: FiniteFloat | None = Field(default=None, ge=0.0, le=1.0)
    """AUROC of the raw activation (max over tokens) on the labelled set it was found with."""
    dataset: str | None = None
    """Data the statistics were measured on."""

    @field_validator("benign_quantiles", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        return _quantile_keys(value)


class Feature(_Model):
    """One labelled SAE latent."""

    name: str = Field(pattern=FEATURE_NAME_PATTERN, max_length=128)
    """Dotted lowercase name, unique in the library (``deception.fraud``)."""
    index: StrictInt = Field(ge=0)
    """Latent index in the SAE, unique in the library."""
    category: str = Field(min_length=1)
    """Open set: bias, deception, dangerous, self_harm, privacy, ..."""
    description: str = ""
    """What the latent responds to, in words."""
    source: FeatureSource = "manual"
    """How the label was found: contrastive | neuronpedia | manual | autointerp."""
    stats: FeatureStats | None = None
    """Optional measured statistics."""


class ProbeEntry(_Model):
    """A probe stored beside the library, usable in policies as ``probe: {name: ...}``."""

    name: str = Field(min_length=1)
    """Probe name, unique in the library."""
    path: str = Field(min_length=1)
    """Probe JSON file, relative to the library file."""


class FeatureLibrary(_Model):
    """A feature library file (see the module docstring)."""

    api_version: Literal["auditor/v1"] = Field(alias="apiVersion")
    """Format version; must be ``auditor/v1``."""
    kind: Literal["FeatureLibrary"]
    """Must be ``FeatureLibrary``."""
    id: str = Field(pattern=_ID_PATTERN)
    """Library id; policies name it in ``library:``."""
    sae: SAERef
    """The SAE the indices refer to."""
    features: list[Feature] = Field(default_factory=list)
    """The labelled features."""
    probes: list[ProbeEntry] = Field(default_factory=list)
    """Named probes stored beside the library."""

    _path: Path | None = PrivateAttr(default=None)
    _by_name: dict[str, Feature] = PrivateAttr(default_factory=dict)
    _by_index: dict[int, Feature] = PrivateAttr(default_factory=dict)

    def model_post_init(self, __context: Any) -> None:
        self._by_name = {f.name: f for f in self.features}
        self._by_index = {f.index: f for f in self.features}

    # ------------------------------------------------------------ lookups

    @property
    def path(self) -> Path | None:
        """The file this library was loaded from (None when built in memory)."""
        return self._path

    @property
    def names(self) -> list[str]:
        """Feature names in file order."""
        return [f.name for f in self.features]

    @property
    def categories(self) -> list[str]:
        """Distinct categories, sorted."""
        return sorted({f.category for f in self.features})

    def has(self, name: str) -> bool:
        """Whether a feature with this name exists."""
        return name in self._by_name

    def feature(self, name: str) -> Feature:
        """The feature called ``name``; unknown names raise :class:`LibraryError` naming close matches."""
        try:
            return self._by_name[name]
        except KeyError:
            raise LibraryError(self.unknown_feature_message(name)) from None

    def unknown_feature_message(self, name: str) -> str:
        """``unknown feature 'x' in library 'y'; did you mean ...`` (shared with policy validation)."""
        msg = f"unknown feature {name!r} in library {self.id!r}"
        close = self.close_matches(name)
        if close:
            msg += f"; did you mean {' or '.join(repr(c) for c in close)}?"
        return msg

    def close_matches(self, name: str, n: int = 3) -> list[str]:
        """Feature names that look like ``name`` (difflib), best first."""
        return difflib.get_close_matches(name, self.names, n=n, cutoff=0.7)

    def name_for_index(self, index: int) -> str | None:
        """The name of latent ``index``, or None when it is not labelled."""
        f = self._by_index.get(index)
        return f.name if f is not None else None

    def indices(self, names: Iterable[str]) -> list[int]:
        """Latent indices of ``names`` in order (unknown names raise :class:`LibraryError`)."""
        return [self.feature(n).index for n in names]

    def probe(self, name: str) -> ProbeEntry:
        """The library probe called ``name`` (:class:`LibraryError` when absent)."""
        for p in self.probes:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.probes) or "none"
        raise LibraryError(f"unknown probe {name!r} in library {self.id!r}; library probes: {known}")

    def search(self, text: str | None = None, category: str | None = None) -> list[Feature]:
        """Features whose name or description contains ``text`` (case-insensitive), optionally of one category."""
        needle = (text or "").lower()
        return [
            f
            for f in self.features
            if (category is None or f.category == category)
            and (not needle or needle in f.name.lower() or needle in f.description.lower())
        ]

    def recon_error_quantile(self, quantile: str) -> float | None:
        """``sae.stats.recon_error_quantiles[quantile]`` or None when not measured."""
        stats = self.sae.stats
        return None if stats is None else stats.recon_error_quantiles.get(quantile)

    def resolve_path(self, rel: str | os.PathLike[str]) -> Path:
        """A path written in the library, made absolute relative to the library file.

        URIs (``hf://...``, ``release:...``) are not local paths and raise :class:`LibraryError`.
        """
        text = os.fspath(rel)
        if "://" in text or text.startswith("release:"):
            raise LibraryError(f"{text!r} is not a local path (library {self.id!r})")
        p = Path(text).expanduser()
        if p.is_absolute() or self._path is None:
            return p
        return (self._path.parent / p).resolve()

    def with_path(self, path: Path) -> FeatureLibrary:
        """This library, remembering ``path`` as its source file (used by loaders and converters)."""
        self._path = path.resolve()
        return self


# ---------------------------------------------------------------- semantic checks


def _semantic_problems(lib: FeatureLibrary, smap: SourceMap, data: Any) -> list[YamlProblem]:
    problems: list[YamlProblem] = []

    def at(path: tuple[Any, ...]) -> tuple[int | None, int | None]:
        pos = smap.value(path)
        return pos if pos is not None else (None, None)

    seen_names: dict[str, int] = {}
    seen_index: dict[int, int] = {}
    d_sae = lib.sae.d_sae
    for i, f in enumerate(lib.features):
        if f.name in seen_names:
            problems.append(
                YamlProblem(*at(("features", i, "name")), f"duplicate feature name {f.name!r} (first at features[{seen_names[f.name]}])")
            )
        else:
            seen_names[f.name] = i
        if f.index in seen_index:
            first = lib.features[seen_index[f.index]].name
            problems.append(
                YamlProblem(*at(("features", i, "index")), f"duplicate feature index {f.index} (already used by {first!r})")
            )
        else:
            seen_index[f.index] = i
        if d_sae is not None and f.index >= d_sae:
            problems.append(
                YamlProblem(*at(("features", i, "index")), f"feature index {f.index} is out of range: sae.d_sae is {d_sae}")
            )
    seen_probes: set[str] = set()
    for i, p in enumerate(lib.probes):
        if p.name in seen_probes:
            problems.append(YamlProblem(*at(("probes", i, "name")), f"duplicate probe name {p.name!r}"))
        seen_probes.add(p.name)
        if lib.path is not None and not lib.resolve_path(p.path).is_file():
            problems.append(
                YamlProblem(*at(("probes", i, "path")), f"probe file not found: {lib.resolve_path(p.path)}")
            )
    return problems


def _known_keys() -> set[str]:
    keys: set[str] = set()
    for model in (SAEStats, SAERef, FeatureStats, Feature, ProbeEntry, FeatureLibrary):
        for name, info in model.model_fields.items():
            keys.add(info.alias or name)
    return keys


def validate_library_data(
    data: Any, smap: SourceMap, path: Path | None = None
) -> tuple[FeatureLibrary | None, list[YamlProblem]]:
    """Validate parsed library YAML; returns the library (None when invalid) and every problem found."""
    if data is None:
        return None, [YamlProblem(1, 1, "file is empty; expected a FeatureLibrary (apiVersion: auditor/v1, kind: FeatureLibrary)")]
    if not isinstance(data, dict):
        return None, [YamlProblem(1, 1, f"expected a mapping at the top level, got {type(data).__name__}")]
    kind = data.get("kind")
    if kind != "FeatureLibrary":
        pos = smap.value(("kind",)) or (1, 1)
        hint = " (this looks like a policy; use `auditor policy validate`)" if kind == "Policy" else ""
        return None, [YamlProblem(*pos, f"kind must be 'FeatureLibrary' (got {kind!r}){hint}")]
    if data.get("apiVersion") != API_VERSION:
        pos = smap.value(("apiVersion",)) or (1, 1)
        return None, [YamlProblem(*pos, f"apiVersion must be {API_VERSION!r} (got {data.get('apiVersion')!r})")]
    try:
        lib = FeatureLibrary.model_validate(data)
    except ValidationError as exc:
        return None, pydantic_problems(exc, data, smap, known_keys=_known_keys())
    if path is not None:
        lib.with_path(path)
    problems = _semantic_problems(lib, smap, data)
    return (None if problems else lib), problems


# ---------------------------------------------------------------- loading


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def library_search_dirs(
    search_dirs: Sequence[str | os.PathLike[str]] | None = None, env: Mapping[str, str] | None = None
) -> list[Path]:
    """Folders searched for ``<id>/library.yaml``: ``search_dirs``, then $AUDITOR_LIBRARY_PATH, then the shipped ones."""
    env = os.environ if env is None else env
    dirs = [Path(d) for d in (search_dirs or ())]
    dirs += [Path(d) for d in env.get(ENV_LIBRARY_PATH, "").split(os.pathsep) if d]
    dirs.append(_repo_root() / "feature_libraries")
    dirs.append(Path(__file__).resolve().parents[1] / "feature_libraries")  # package data, when installed
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def _looks_like_path(ref: str) -> bool:
    return "/" in ref or os.sep in ref or ref.endswith((".yaml", ".yml"))


def find_library(
    path_or_id: str | os.PathLike[str],
    *,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """The library file that ``path_or_id`` names.

    A path (contains a slash or ends in .yaml) is taken relative to ``base_dir``
    (default: the working directory); a folder means its ``library.yaml``. An id
    is looked up as ``<dir>/<id>/library.yaml`` in :func:`library_search_dirs`.
    Raises :class:`LibraryError` saying where it looked.
    """
    ref = os.fspath(path_or_id)
    if isinstance(path_or_id, os.PathLike) or _looks_like_path(ref):
        p = Path(ref).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if p.is_dir():
            p = p / LIBRARY_FILE
        if not p.is_file():
            raise LibraryError(f"feature library file not found: {p}")
        return p
    dirs = library_search_dirs(search_dirs, env)
    for d in dirs:
        candidate = d / ref / LIBRARY_FILE
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(d / ref / LIBRARY_FILE) for d in dirs)
    raise LibraryError(
        f"feature library {ref!r} not found; looked in: {looked} "
        f"(give a path to a library.yaml, or add its parent folder to ${ENV_LIBRARY_PATH})"
    )


def load_library(
    path_or_id: str | os.PathLike[str],
    *,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> FeatureLibrary:
    """Load and validate a feature library by id or path.

    Raises :class:`LibraryError` when it cannot be found, and
    :class:`~auditor.errors.LibraryFileError` (a ``LibraryError`` whose message
    has one ``FILE:LINE:COLUMN: message`` line per problem) when it is invalid.
    """
    path = find_library(path_or_id, search_dirs=search_dirs, base_dir=base_dir, env=env)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LibraryError(f"{path}: cannot read feature library: {exc}") from None
    data, smap, problems = parse_yaml(text)
    lib = None
    if not problems:
        lib, problems = validate_library_data(data, smap, path)
    if problems or lib is None:
        raise LibraryFileError(str(path), [(p.line, p.column, p.message) for p in problems])
    ref = os.fspath(path_or_id)
    if not isinstance(path_or_id, os.PathLike) and not _looks_like_path(ref) and lib.id != ref:
        pos = smap.value(("id",)) or (None, None)
        raise LibraryFileError(str(path), [(*pos, f"library id is {lib.id!r} but it was loaded as {ref!r}")])
    return lib


def library_to_yaml(lib: FeatureLibrary, *, header: str | None = None) -> str:
    """The library as YAML that :func:`load_library` reads back unchanged (``header`` becomes comment lines)."""
    data = lib.model_dump(mode="json", by_alias=True, exclude_none=True)
    if not data.get("probes"):
        data.pop("probes", None)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
    return text
