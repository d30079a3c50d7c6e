"""Release ids -> where an SAE lives and what it reads (``releases.yaml``).

A release is a family of SAEs published together (one per layer, width, ...);
``sae_id`` picks one, and the release's templates turn it into a repository path
and a hookpoint. ``release:<id>/<sae_id>`` URIs resolve through ``hf://``.

Example::

    releases = load_releases()
    rel = get_release("gemma-scope-2b-pt-res", releases)
    rel.hf_uri("layer_12/width_16k/average_l0_82")
    # 'hf://google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82'
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from auditor.errors import ConfigError, SAESourceError, UnknownKeyError

__all__ = [
    "RELEASE_SCHEME",
    "Release",
    "get_release",
    "list_releases",
    "load_releases",
    "parse_release_uri",
]

RELEASE_SCHEME = "release:"


class Release(BaseModel):
    """One published family of SAEs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    """Short release id (the key in ``releases.yaml``)."""
    description: str
    """What the SAEs are, in one line."""
    model: str
    """Model the SAEs were trained on (Hugging Face id)."""
    source: Literal["hf", "url"]
    """``hf``: a Hugging Face repo; ``url``: plain files elsewhere, downloaded by the user."""
    repo: str | None = None
    """Hugging Face repo id (``source: hf``)."""
    url: str | None = None
    """Download URL template (``source: url``)."""
    format: str
    """Format name in the SAE format registry."""
    sae_id_pattern: str
    """Regex an ``sae_id`` must fully match; its named groups fill the templates."""
    example_sae_id: str
    """A valid ``sae_id``, shown in error messages."""
    default_sae_id: str | None = None
    """``sae_id`` used when the URI names none (single-SAE releases)."""
    path: str
    """Path template inside the repo (or the local file name for ``url`` releases)."""
    hook_name: str
    """Hookpoint template (TransformerLens form)."""

    @model_validator(mode="after")
    def _check_source(self) -> Release:
        if self.source == "hf" and not self.repo:
            raise ValueError(f"release {self.id!r}: source 'hf' needs 'repo'")
        if self.source == "url" and not self.url:
            raise ValueError(f"release {self.id!r}: source 'url' needs 'url'")
        return self

    def fields(self, sae_id: str | None) -> dict[str, str]:
        """Template fields for ``sae_id`` (``sae_id`` plus the pattern's named groups)."""
        chosen = sae_id or self.default_sae_id
        if not chosen:
            raise ConfigError(
                f"release {self.id!r} needs an SAE id, e.g. release:{self.id}/{self.example_sae_id}"
            )
        m = re.fullmatch(self.sae_id_pattern, chosen)
        if m is None:
            raise ConfigError(
                f"release {self.id!r} has no SAE {chosen!r}: ids match "
                f"{self.sae_id_pattern!r}, e.g. {self.example_sae_id!r}"
            )
        return {"sae_id": chosen, **{k: v for k, v in m.groupdict().items() if v is not None}}

    def hf_uri(self, sae_id: str | None) -> str:
        """``hf://`` URI of one SAE of an ``hf`` release."""
        if self.source != "hf":
            raise SAESourceError(
                f"{RELEASE_SCHEME}{self.id}",
                f"files are not on the Hugging Face hub; download {self.download_url(sae_id)} "
                "and pass the local file path",
            )
        return f"hf://{self.repo}/{self.path.format(**self.fields(sae_id))}"

    def download_url(self, sae_id: str | None) -> str | None:
        """Download URL of one SAE of a ``url`` release (None for hub releases)."""
        return self.url.format(**self.fields(sae_id)) if self.url else None

    def hook_for(self, sae_id: str | None) -> str:
        """Hookpoint the SAE ``sae_id`` reads."""
        return self.hook_name.format(**self.fields(sae_id))


def load_releases(path: str | Path | None = None) -> dict[str, Release]:
    """Parse a releases file (default: the packaged ``releases.yaml``).

    Read as policies and libraries are (:func:`~auditor.features.yamlsource.parse_yaml`);
    every problem is reported as ``FILE:LINE:COLUMN: message`` in one :class:`ConfigError`.
    """
    from auditor.features.yamlsource import YamlProblem, located, parse_yaml, pydantic_problems

    if path is None:
        text = resources.files("auditor.sae").joinpath("releases.yaml").read_text(encoding="utf-8")
        where = "auditor/sae/releases.yaml"
    else:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read the releases file ({exc})") from None
    data, smap, problems = parse_yaml(text)
    releases: dict[str, Release] | None = None
    if not problems:
        entries = data.get("releases") if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            problems = [YamlProblem(1, 1, "expected a top-level 'releases' mapping of release ids to releases")]
        else:
            # Each release's id is its key: given to the model, never written in the file.
            bodies = {rid: {"id": str(rid), **body} if isinstance(body, dict) else body for rid, body in entries.items()}
            try:
                releases = dict(_ReleasesFile.model_validate({**data, "releases": bodies}).releases)
            except ValidationError as exc:
                problems = pydantic_problems(exc, data, smap, known_keys=[*Release.model_fields, "releases"])
    if releases is None:
        raise ConfigError("\n".join(located(where, prob.line, prob.column, prob.message) for prob in problems))
    return releases


class _ReleasesFile(BaseModel):
    """The layout of ``releases.yaml``: one mapping of release ids to releases."""

    model_config = ConfigDict(extra="forbid")

    releases: dict[str, Release]
    """Release id -> release."""


def list_releases(releases: dict[str, Release] | None = None) -> list[str]:
    """Known release ids, sorted."""
    return sorted(releases if releases is not None else load_releases())


def get_release(release_id: str, releases: dict[str, Release] | None = None) -> Release:
    """The release ``release_id``, or :class:`UnknownKeyError` listing the known ones."""
    table = releases if releases is not None else load_releases()
    if release_id not in table:
        raise UnknownKeyError("SAE release", release_id, table)
    return table[release_id]


def parse_release_uri(uri: str) -> tuple[str, str | None]:
    """``release:<id>/<sae_id>`` -> ``(id, sae_id)``; the sae_id may contain ``/`` or be absent."""
    body = uri.removeprefix(RELEASE_SCHEME)
    if not uri.startswith(RELEASE_SCHEME) or not body:
        raise ConfigError(f"{uri!r} is not a release URI; expected release:<id>/<sae_id>")
    release_id, _, sae_id = body.partition("/")
    return release_id, sae_id or None
