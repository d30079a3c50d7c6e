"""``hf://owner/repo[@revision]/path/in/repo``: SAEs on the Hugging Face hub.

The URI is resolved with ``huggingface_hub.snapshot_download`` restricted to that
path (a file, or a folder and everything under it), so only the one SAE is
fetched; the result is a local path in the hub cache that the format readers open.
With ``offline=True`` (or ``HF_HUB_OFFLINE=1``) only the local cache is consulted.

Example::

    loc = parse_hf_uri("hf://google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")
    local = resolve_hf(loc)          # .../snapshots/<sha>/layer_12/width_16k/average_l0_82
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from auditor.errors import SAESourceError

__all__ = ["HF_SCHEME", "HFLocation", "parse_hf_uri", "resolve_hf"]

HF_SCHEME = "hf://"
_URI = re.compile(
    r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w.-]+))?(?:/(?P<path>.*?))?/?$"
)


@dataclass(frozen=True)
class HFLocation:
    """A path inside a Hugging Face model repository."""

    repo_id: str
    """``owner/name`` of the repository."""
    path: str
    """Path inside the repository ('' for its root)."""
    revision: str | None = None
    """Branch, tag or commit; None for the default branch."""

    @property
    def uri(self) -> str:
        """The ``hf://`` form of this location."""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_SCHEME}{self.repo_id}{rev}/{self.path}".rstrip("/")


def parse_hf_uri(uri: str) -> HFLocation:
    """``hf://owner/repo[@rev]/path`` -> :class:`HFLocation`, or :class:`SAESourceError`."""
    m = _URI.match(uri)
    if m is None or ".." in (m.group("path") or "").split("/"):
        raise SAESourceError(
            uri, "not a valid hub URI; expected hf://owner/repo[@revision]/path/in/repo"
        )
    return HFLocation(m.group("repo"), m.group("path") or "", m.group("rev"))


def resolve_hf(
    loc: HFLocation, *, cache_dir: str | Path | None = None, offline: bool = False
) -> Path:
    """Download (or find in the cache) ``loc`` and return its local path."""
    from huggingface_hub import snapshot_download

    patterns = [loc.path, f"{loc.path}/*"] if loc.path else None
    try:
        root = snapshot_download(
            loc.repo_id,
            revision=loc.revision,
            allow_patterns=patterns,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            local_files_only=offline,
        )
    except Exception as exc:  # hub client raises HTTP, offline-cache and OS errors alike
        where = "the local cache (offline mode)" if offline else "the Hugging Face hub"
        raise SAESourceError(
            loc.uri,
            f"cannot fetch repo {loc.repo_id!r} from {where}: {type(exc).__name__}: {exc}. "
            "If the hub is unreachable, download the files elsewhere and pass a local path",
        ) from exc
    local = Path(root) / loc.path
    if not local.exists():
        raise SAESourceError(loc.uri, f"repo {loc.repo_id!r} has no file or folder {loc.path!r}")
    return local
