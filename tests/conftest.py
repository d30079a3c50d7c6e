"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings

# CI explores a fixed set of examples, so a run is reproducible; locally each run
# draws new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def default_model():  # type: ignore[no-untyped-def]
    """The embedded default model, loaded once per test session (converted on first use)."""
    from auditor.models import load_model

    return load_model()


def make_random_sae(
    path: Path,
    *,
    d_in: int,
    d_sae: int = 256,
    hookpoint: str = "blocks.5.hook_resid_post",
    architecture: str = "standard",
    seed: int = 0,
) -> Path:
    """Write a random SAE in the SAELens layout and return its folder.

    Encoder columns are random unit directions and the encoder bias is negative,
    so each token activates a subset of the latents.
    """
    from auditor.sae import SAE, SAEConfig

    gen = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(
        architecture=architecture,  # type: ignore[arg-type]
        d_in=d_in,
        d_sae=d_sae,
        k=8 if architecture == "topk" else None,
        metadata={"hook_name": hookpoint, "model_name": "test"},
    )
    w = torch.randn(d_in, d_sae, generator=gen)
    w = w / w.norm(dim=0, keepdim=True)
    tensors = {
        "W_enc": w,
        "b_enc": -torch.rand(d_sae, generator=gen) * 2.0,
        "W_dec": w.T.contiguous(),
        "b_dec": torch.zeros(d_in),
    }
    if architecture in ("jumprelu", "batchtopk"):
        tensors["threshold"] = torch.full((d_sae,), 0.5)
    sae = SAE.from_tensors(cfg, tensors)
    sae.save(path)
    return path


@contextmanager
def sidecars(root: Path, common: dict[str, Any], variants: dict[str, dict[str, Any]], **running: Any) -> Iterator[dict[str, Any]]:
    """Sidecars on loopback, one per variant (``common`` flags, then the variant's, each with a
    data folder of its own under ``root``), each ready (its model loaded), beside the servers in
    ``running`` (an upstream, started by the caller); every server in the result, ``running``
    included, is stopped on leaving."""
    from auditor.server.app import create_app
    from auditor.server.background import BackgroundServer
    from auditor.server.settings import Settings

    started: dict[str, Any] = dict(running)
    try:
        for name, extra in variants.items():
            flags = {**common, **extra, "data_dir": str(root / name)}
            started[name] = BackgroundServer(create_app(Settings.load(flags=flags, env={}))).start()
        for name in variants:
            started[name].wait_ready()
        yield started
    finally:
        for srv in started.values():
            srv.stop()


@contextmanager
def proxied_sidecars(root: Path, upstream_app: Any, common: dict[str, Any], variants: dict[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``upstream_app`` served on loopback (``"upstream"`` in the result) and :func:`sidecars` in
    front of it, with the random 64-latent SAE that :func:`write_fraud_policy`'s library describes;
    ``common`` adds to the flags ``sae`` and ``upstream``."""
    from auditor.server.background import BackgroundServer

    sae = make_random_sae(root / "sae", d_in=576, d_sae=64, hookpoint="blocks.5.hook_resid_post")
    upstream = BackgroundServer(upstream_app).start()
    with sidecars(root, {"sae": str(sae), "upstream": upstream.url, **common}, variants, upstream=upstream) as started:
        yield started


def write_fraud_policy(folder: Path, name: str, threshold: float, *, scope: str, severity: str, actions: str) -> None:
    """``folder/name.yaml``: one rule on the tiny example library's ``deception.fraud`` (max over the
    ``scope`` at ``threshold``; 0 matches every text, 1e6 none), for a random SAE of 64 latents."""
    library = Path(__file__).resolve().parents[1] / "feature_libraries" / "examples" / "tiny" / "library.yaml"
    (folder / f"{name}.yaml").write_text(
        f"""apiVersion: auditor/v1
kind: Policy
metadata: {{name: {name}}}
library: {library}
rules:
  - id: {name}-rule
    severity: {severity}
    category: deception
    scope: {scope}
    condition: {{feature: deception.fraud, agg: max, threshold: {threshold}}}
    actions: {actions}
"""
    )


def sse_chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0, **extra: Any) -> bytes:
    """One server-sent event of an OpenAI-shaped chat completion stream, as the test upstreams send
    them: ``delta`` for choice ``index``, its ``finish_reason``, ``extra`` top-level fields."""
    import json

    body = {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "up",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}], **extra}
    return b"data: " + json.dumps(body).encode() + b"\n\n"
