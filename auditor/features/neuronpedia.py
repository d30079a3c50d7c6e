"""Convert Neuronpedia explanation exports into a feature library.

Neuronpedia publishes auto-interpretability explanations of SAE latents as
JSON lines (or one JSON array), one explanation per row::

    {"modelId": "gpt2-small", "layer": "6-res-jb", "index": "1234",
     "description": " references to fraud", "explanationModelName": "gpt-4o-mini",
     "typeName": "oai_token-act-pair"}

``layer`` is Neuronpedia's source id of the SAE; ``index`` may be a string or an
int. Each explained latent becomes a :class:`~auditor.features.library.Feature`
with ``source: neuronpedia``, named ``<category>.<slug of the description>``.
Categories come from keyword rules (``--category deception=fraud,scam``); a
latent no rule matches is ``uncategorized``.

Example:
    >>> lib = import_neuronpedia("export.jsonl", sae_id="gpt2-res-6", model="openai-community/gpt2",
    ...                          hookpoint="blocks.6.hook_resid_pre",
    ...                          categories=[("deception", ["fraud", "scam"])])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from auditor.errors import LibraryError, LibraryFileError
from auditor.features.library import FeatureLibrary

__all__ = [
    "DEFAULT_CATEGORY",
    "NeuronpediaExplanation",
    "ImportReport",
    "read_export",
    "slugify",
    "categorize",
    "parse_category_rule",
    "import_neuronpedia",
]

DEFAULT_CATEGORY = "uncategorized"
_MAX_SLUG_WORDS = 6
_MAX_SLUG_CHARS = 48
_CATEGORY_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class NeuronpediaExplanation:
    """One row of an export."""

    model_id: str
    """Neuronpedia model id (``gpt2-small``)."""
    layer: str
    """Neuronpedia source id of the SAE (``6-res-jb``)."""
    index: int
    """Latent index."""
    description: str
    """The explanation text, stripped."""
    explanation_model: str | None
    """Model that wrote the explanation, when given."""
    type_name: str | None
    """Explanation method, when given."""
    line: int
    """1-based line (JSONL) or 1-based array position (JSON array) in the export."""


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_neuronpedia` did with the rows it read."""

    library: FeatureLibrary
    """The converted library."""
    rows: int
    """Rows read (after the ``layer`` filter)."""
    duplicates: int
    """Rows skipped because their latent already had an explanation (the first is kept)."""
    empty: int
    """Rows skipped because their description was empty."""
    renamed: int
    """Features whose slug clashed with another and got an ``_<index>`` suffix (``_<index>_<n>`` if that was taken)."""


def _row(data: Any, line: int) -> NeuronpediaExplanation | str:
    """Parse one row, or return why it is invalid."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    missing = [k for k in ("modelId", "layer", "index", "description") if k not in data]
    if missing:
        return f"missing key(s) {', '.join(missing)} (a Neuronpedia explanation row has modelId, layer, index, description)"
    raw_index = data["index"]
    if isinstance(raw_index, bool) or not isinstance(raw_index, (int, str)):
        return f"index must be an integer or a string of digits, got {raw_index!r}"
    try:
        index = int(raw_index)
    except ValueError:
        return f"index must be an integer or a string of digits, got {raw_index!r}"
    if index < 0:
        return f"index must be >= 0, got {index}"
    description = data["description"]
    if not isinstance(description, str):
        return f"description must be a string, got {type(description).__name__}"
    for key in ("modelId", "layer"):
        if not isinstance(data[key], str):
            return f"{key} must be a string, got {data[key]!r}"
    opt = {k: data.get(k) if isinstance(data.get(k), str) else None for k in ("explanationModelName", "typeName")}
    return NeuronpediaExplanation(
        model_id=data["modelId"],
        layer=data["layer"],
        index=index,
        description=" ".join(description.split()),
        explanation_model=opt["explanationModelName"],
        type_name=opt["typeName"],
        line=line,
    )


def read_export(path: str | os.PathLike[str]) -> list[NeuronpediaExplanation]:
    """Read a JSONL (or JSON array) export; every bad row is reported as ``FILE:LINE: message``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LibraryError(f"{p}: cannot read Neuronpedia export: {exc}") from None
    rows: list[tuple[int, Any]] = []
    problems: list[tuple[int | None, int | None, str]] = []
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LibraryFileError(str(p), [(exc.lineno, exc.colno, f"invalid JSON: {exc.msg}")]) from None
        rows = [(i + 1, item) for i, item in enumerate(array)]
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                problems.append((n, exc.colno, f"invalid JSON: {exc.msg}"))
    out: list[NeuronpediaExplanation] = []
    for n, data in rows:
        parsed = _row(data, n)
        if isinstance(parsed, str):
            problems.append((n, None, parsed))
        else:
            out.append(parsed)
    if problems:
        raise LibraryFileError(str(p), problems)
    if not out:
        raise LibraryError(f"{p}: the export holds no explanation rows")
    return out


def slugify(text: str, *, max_words: int = _MAX_SLUG_WORDS, max_chars: int = _MAX_SLUG_CHARS) -> str:
    """A name part from free text: lowercase words joined by ``_`` (``"Fake prizes!"`` -> ``fake_prizes``)."""
    words = re.findall(r"[a-z0-9]+", text.lower())[:max_words]
    slug = ""
    for w in words:
        candidate = f"{slug}_{w}" if slug else w
        if len(candidate) > max_chars:
            break
        slug = candidate
    return slug or (words[0][:max_chars] if words else "")


def parse_category_rule(spec: str) -> tuple[str, list[str]]:
    """``"deception=fraud,scam"`` -> ``("deception", ["fraud", "scam"])`` (raises :class:`LibraryError`)."""
    name, sep, words = spec.partition("=")
    name = name.strip()
    keywords = [w.strip().lower() for w in words.split(",") if w.strip()]
    if not sep or not keywords:
        raise LibraryError(f"category rule {spec!r} must look like CATEGORY=KEYWORD[,KEYWORD...]")
    if not _CATEGORY_RE.match(name):
        raise LibraryError(f"category {name!r} must be lowercase letters, digits and '_', starting with a letter")
    return name, keywords


def categorize(description: str, rules: Sequence[tuple[str, Sequence[str]]], default: str = DEFAULT_CATEGORY) -> str:
    """The first rule's category whose keyword occurs in ``description`` (case-insensitive), else ``default``."""
    text = description.lower()
    for category, keywords in rules:
        if any(k.lower() in text for k in keywords):
            return category
    return default


def import_neuronpedia(
    export: str | os.PathLike[str],
    *,
    sae_id: str,
    model: str,
    hookpoint: str,
    library_id: str | None = None,
    sae_path: str | None = None,
    d_sae: int | None = None,
    layer: str | None = None,
    categories: Sequence[tuple[str, Sequence[str]]] = (),
    default_category: str = DEFAULT_CATEGORY,
) -> ImportReport:
    """Convert a Neuronpedia export into a validated :class:`FeatureLibrary`.

    ``layer`` picks one Neuronpedia source when the export holds several (it
    must, then). Each latent keeps its first explanation; features are sorted
    by index. Raises :class:`LibraryError` on bad input.
    """
    if not _CATEGORY_RE.match(default_category):
        raise LibraryError(f"default category {default_category!r} must be lowercase letters, digits and '_'")
    rows = read_export(export)
    layers = sorted({r.layer for r in rows})
    if layer is not None:
        rows = [r for r in rows if r.layer == layer]
        if not rows:
            raise LibraryError(f"{export}: no rows with layer {layer!r}; the export has: {', '.join(layers)}")
    elif len(layers) > 1:
        raise LibraryError(
            f"{export}: the export holds several SAEs (layer ids: {', '.join(layers)}); choose one with --layer"
        )

    first: dict[int, NeuronpediaExplanation] = {}
    duplicates = empty = 0
    for r in rows:
        if not r.description:
            empty += 1
        elif r.index in first:
            duplicates += 1
        else:
            first[r.index] = r

    features: list[dict[str, Any]] = []
    used: set[str] = set()
    renamed = 0
    for index in sorted(first):
        r = first[index]
        category = categorize(r.description, categories, default_category)
        slug = slugify(r.description) or f"latent_{index}"
        name = f"{category}.{slug}"
        if name in used:
            # ``_<index>`` can itself be taken (another latent's description ends in that number):
            # count up from it until the name is free, so the library never repeats a name.
            base = name = f"{name}_{index}"
            n = 1
            while name in used:
                n += 1
                name = f"{base}_{n}"
            renamed += 1
        used.add(name)
        features.append(
            {
                "name": name,
                "index": index,
                "category": category,
                "description": r.description,
                "source": "neuronpedia",
            }
        )

    data: dict[str, Any] = {
        "apiVersion": "auditor/v1",
        "kind": "FeatureLibrary",
        "id": library_id or sae_id,
        "sae": {"id": sae_id, "model": model, "hookpoint": hookpoint},
        "features": features,
    }
    if sae_path is not None:
        data["sae"]["path"] = sae_path
    if d_sae is not None:
        data["sae"]["d_sae"] = d_sae
    try:
        library = FeatureLibrary.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
        raise LibraryError(f"the converted library is invalid: {details}") from None
    if d_sae is not None and features and features[-1]["index"] >= d_sae:
        raise LibraryError(f"{export}: latent index {features[-1]['index']} is out of range for --d-sae {d_sae}")
    return ImportReport(library=library, rows=len(rows), duplicates=duplicates, empty=empty, renamed=renamed)
