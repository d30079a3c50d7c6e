"""``load_sae``: one entry point for local files, ``hf://`` URIs and ``release:`` ids."""

from __future__ import annotations

from pathlib import Path

import torch

from auditor.errors import SAEFormatError
from auditor.sae.formats import FormatRegistry, LoadOptions, default_registry
from auditor.sae.hub import HF_SCHEME, parse_hf_uri, resolve_hf
from auditor.sae.registry import RELEASE_SCHEME, Release, get_release, parse_release_uri
from auditor.sae.sae import SAE

__all__ = ["list_formats", "load_sae"]


def list_formats(registry: FormatRegistry | None = None) -> list[str]:
    """Names of the SAE formats ``load_sae`` knows, in detection order."""
    return (registry or default_registry()).names()


def load_sae(
    source: str | Path,
    *,
    format: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    k: int | None = None,
    cache_dir: str | Path | None = None,
    offline: bool = False,
    registry: FormatRegistry | None = None,
    releases: dict[str, Release] | None = None,
) -> SAE:
    """Load an SAE in any registered format into the canonical :class:`SAE`.

    ``source`` is a local file or folder, ``hf://owner/repo/path/in/repo`` or
    ``release:<id>/<sae_id>`` (see ``releases.yaml``). The format is detected unless
    ``format=`` forces one. ``k`` overrides k for TopK formats. ``cache_dir`` and
    ``offline`` go to the Hugging Face hub client. Release loads fill in the model
    and hookpoint when the files do not say.

    Example::

        sae = load_sae("release:gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")
        sae = load_sae("/data/saes/blocks.8.hook_resid_pre", format="saelens")
    """
    formats = registry or default_registry()
    chosen = formats.get(format) if format is not None else None
    release: Release | None = None
    sae_id: str | None = None
    text = str(source)
    if text.startswith(RELEASE_SCHEME):
        release_id, sae_id = parse_release_uri(text)
        release = get_release(release_id, releases)
        text = release.hf_uri(sae_id)
        if chosen is None:
            chosen = formats.get(release.format)
    if text.startswith(HF_SCHEME):
        path = resolve_hf(parse_hf_uri(text), cache_dir=cache_dir, offline=offline)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise SAEFormatError(str(path), "no such file or folder")
    fmt = chosen if chosen is not None else formats.detect(path)
    sae = fmt.load(path, LoadOptions(device=device, dtype=dtype, k=k))
    if release is not None:
        meta = sae.cfg.metadata.model_copy(
            update={
                "model_name": sae.cfg.metadata.model_name or release.model,
                "hook_name": sae.cfg.metadata.hook_name or release.hook_for(sae_id),
                "release": release.id,
                "sae_id": release.fields(sae_id)["sae_id"],
            }
        )
        sae.cfg = sae.cfg.model_copy(update={"metadata": meta})
    return sae
