"""Feature libraries: labelled SAE latents that policies refer to by name.

Example:
    >>> from auditor.features import load_library
    >>> lib = load_library("feature_libraries/examples/tiny/library.yaml")  # doctest: +SKIP
    >>> lib.feature("deception.fraud").index                                 # doctest: +SKIP
    12
"""

from __future__ import annotations

from auditor.features.library import (
    Feature,
    FeatureLibrary,
    FeatureStats,
    ProbeEntry,
    SAERef,
    SAEStats,
    find_library,
    library_to_yaml,
    load_library,
)
from auditor.features.neuronpedia import import_neuronpedia

__all__ = [
    "Feature",
    "FeatureLibrary",
    "FeatureStats",
    "ProbeEntry",
    "SAERef",
    "SAEStats",
    "find_library",
    "import_neuronpedia",
    "library_to_yaml",
    "load_library",
]
