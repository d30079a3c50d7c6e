"""Release table, release/hub URI parsing, and hub resolution from a pre-filled local cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from auditor.errors import ConfigError, SAESourceError
from auditor.sae import SAE, SAEConfig, get_release, list_releases, load_releases, load_sae, parse_hf_uri
from auditor.sae.hub import HFLocation, resolve_hf
from auditor.sae.registry import parse_release_uri

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_hub_cache(cache: Path, repo_id: str, files: dict[str, SAE]) -> None:
    """Write SAEs into ``cache`` in the real hub cache layout (refs/main -> snapshots/<sha>)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for sub, sae in files.items():
        sae.save(repo_dir / "snapshots" / COMMIT / sub)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("hf://jbloom/GPT2-Small-SAEs-Reformatted/blocks.8.hook_resid_pre",
         HFLocation("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre")),
        ("hf://google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/",
         HFLocation("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")),
        ("hf://Goodfire/Llama-3.1-8B-Instruct-SAE-l19@v1.0/Llama-3.1-8B-Instruct-SAE-l19.pth",
         HFLocation("Goodfire/Llama-3.1-8B-Instruct-SAE-l19", "Llama-3.1-8B-Instruct-SAE-l19.pth", "v1.0")),
        ("hf://owner/repo", HFLocation("owner/repo", "")),
    ],
)
def test_parse_hf_uri(uri: str, expected: HFLocation) -> None:
    assert parse_hf_uri(uri) == expected
    assert parse_hf_uri(expected.uri) == expected


@pytest.mark.parametrize("uri", ["hf://", "hf://owner", "s3://a/b", "hf://owner/repo/../secret"])
def test_parse_hf_uri_rejects(uri: str) -> None:
    with pytest.raises(SAESourceError, match="expected hf://owner/repo"):
        parse_hf_uri(uri)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("release:gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82",
         ("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")),
        ("release:goodfire-llama-3.1-8b-instruct", ("goodfire-llama-3.1-8b-instruct", None)),
    ],
)
def test_parse_release_uri(uri: str, expected: tuple[str, str | None]) -> None:
    assert parse_release_uri(uri) == expected


def test_release_table_resolves_every_example() -> None:
    releases = load_releases()
    assert {"gpt2-small-res-jb", "openai-gpt2-small-v5-32k", "gemma-scope-2b-pt-res", "llama-scope-lxr-8x",
            "goodfire-llama-3.1-8b-instruct", "goodfire-llama-3.3-70b-instruct"} <= set(list_releases(releases))
    for rel in releases.values():
        hook = rel.hook_for(rel.example_sae_id)
        assert hook.startswith("blocks.") and ".hook_resid_" in hook, rel.id
        if rel.source == "hf":
            assert rel.hf_uri(rel.example_sae_id).startswith(f"hf://{rel.repo}/")
        else:
            assert (rel.download_url(rel.example_sae_id) or "").startswith("https://")
    gemma = get_release("gemma-scope-2b-pt-res", releases)
    assert gemma.hf_uri("layer_12/width_16k/average_l0_82") == (
        "hf://google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")
    assert gemma.hook_for("layer_12/width_16k/average_l0_82") == "blocks.12.hook_resid_post"
    llama = get_release("llama-scope-lxr-8x", releases)
    assert llama.hf_uri("L15R") == "hf://fnlp/Llama3_1-8B-Base-LXR-8x/Llama3_1-8B-Base-L15R-8x"
    goodfire = get_release("goodfire-llama-3.1-8b-instruct", releases)
    assert goodfire.hf_uri(None).endswith("/Llama-3.1-8B-Instruct-SAE-l19.pth")
    with pytest.raises(ConfigError, match="needs an SAE id"):
        get_release("gpt2-small-res-jb", releases).hf_uri(None)


def test_bad_releases_file(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("releases:\n  x:\n    description: d\n    model: m\n    source: hf\n    format: saelens\n"
                   "    sae_id_pattern: a\n    example_sae_id: a\n    path: a\n    hook_name: a\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:2:3: releases\.x: Value error, release 'x': source 'hf' needs 'repo'"):
        load_releases(bad)


_RELEASE = "description: d\n    model: m\n    source: hf\n    repo: o/r\n    format: saelens\n    sae_id_pattern: a\n    example_sae_id: a\n    path: a\n    hook_name: a\n"


@pytest.mark.parametrize(
    ("text", "messages"),
    [
        ("releases:\n  x:\n    " + _RELEASE + "    hook_nam: b\n", ["r.yaml:12:5: releases.x: unknown key 'hook_nam'; did you mean 'hook_name'?"]),
        ("releases:\n  x:\n    " + _RELEASE.replace("source: hf", "source: ftp"), ["r.yaml:5:13: releases.x.source: Input should be 'hf' or 'url'"]),
        ("releases:\n  x: 3\n  y:\n    model: m\n", ["r.yaml:2:6: releases.x: Input should be a valid dictionary", "r.yaml:3:3: missing required key"]),
        ("releases: [1]\n", ["r.yaml:1:1: expected a top-level 'releases' mapping"]),
        ("release:\n  x: {}\n", ["r.yaml:1:1: expected a top-level 'releases' mapping"]),
        ("releases:\n  x: {model: \"m\x07\"}\n", ["r.yaml:2:16: control character U+0007 is not allowed in YAML"]),
        ("releases:\n  x: {}\n  x: {}\n", ["r.yaml:3:3: duplicate key 'x'"]),
        ("releases: {}\nextra: 1\n", ["r.yaml:2:1: unknown key 'extra'"]),
    ],
)
def test_a_releases_file_is_read_with_located_problems(tmp_path: Path, text: str, messages: list[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_releases(path)
    lines = info.value.message.splitlines()
    for expected in messages:
        assert any(line.startswith(f"{tmp_path}/{expected}") for line in lines), (expected, lines)


def test_a_missing_releases_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"none\.yaml: cannot read the releases file"):
        load_releases(tmp_path / "none.yaml")


def test_hf_and_release_resolve_from_offline_cache(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    sae = SAE.from_tensors(
        SAEConfig(d_in=4, d_sae=8),
        {"W_enc": torch.randn(4, 8), "b_enc": torch.randn(8), "W_dec": torch.randn(8, 4), "b_dec": torch.randn(4)},
    )
    fill_hub_cache(cache, "jbloom/GPT2-Small-SAEs-Reformatted", {"blocks.8.hook_resid_pre": sae})
    local = resolve_hf(parse_hf_uri("hf://jbloom/GPT2-Small-SAEs-Reformatted/blocks.8.hook_resid_pre"),
                       cache_dir=cache, offline=True)
    assert local.is_dir() and (local / "cfg.json").is_file()

    x = torch.randn(5, 4)
    from_hf = load_sae("hf://jbloom/GPT2-Small-SAEs-Reformatted/blocks.8.hook_resid_pre",
                       cache_dir=cache, offline=True)
    assert_close(from_hf.encode(x), sae.encode(x))

    from_release = load_sae("release:gpt2-small-res-jb/blocks.8.hook_resid_pre", cache_dir=cache, offline=True)
    assert_close(from_release.encode(x), sae.encode(x))
    meta = from_release.cfg.metadata
    assert (meta.model_name, meta.hook_name) == ("gpt2", "blocks.8.hook_resid_pre")
    assert meta.model_extra == {"release": "gpt2-small-res-jb", "sae_id": "blocks.8.hook_resid_pre"}

    with pytest.raises(SAESourceError, match="has no file or folder 'blocks.9.hook_resid_pre'"):
        load_sae("hf://jbloom/GPT2-Small-SAEs-Reformatted/blocks.9.hook_resid_pre", cache_dir=cache, offline=True)
