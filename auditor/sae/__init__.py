"""Sparse autoencoders: the canonical :class:`SAE`, its config, and readers for public formats.

Example::

    from auditor.sae import load_sae
    sae = load_sae("release:gpt2-small-res-jb/blocks.8.hook_resid_pre")
    feats = sae.encode(acts, features=[123, 456])   # [tokens, 2]
"""

from __future__ import annotations

from auditor.sae.config import SAEConfig, SAEMetadata
from auditor.sae.formats import FormatRegistry, SAEFormat, default_registry
from auditor.sae.hub import HFLocation, parse_hf_uri, resolve_hf
from auditor.sae.load import list_formats, load_sae
from auditor.sae.registry import Release, get_release, list_releases, load_releases
from auditor.sae.sae import SAE, NormState, WatchedEncoding

__all__ = [
    "FormatRegistry",
    "HFLocation",
    "NormState",
    "Release",
    "SAE",
    "SAEConfig",
    "SAEFormat",
    "SAEMetadata",
    "WatchedEncoding",
    "default_registry",
    "get_release",
    "list_formats",
    "list_releases",
    "load_releases",
    "load_sae",
    "parse_hf_uri",
    "resolve_hf",
]
