"""``--device``: every command that takes it (and the sidecar's settings) checks it first, with one message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from auditor.cli import main
from auditor.errors import ConfigError
from auditor.server.settings import Settings


def _commands(tmp_path: Path, device: str) -> dict[str, list[str]]:
    # Paths that do not exist: were anything loaded or read before the device check, its error would show.
    none = str(tmp_path / "none")
    return {
        "audit": ["audit", "Hi", "--model", none, "--sae", none, "--device", device],
        "audit --input": ["audit", "--input", none, "--device", device],
        "generate": ["generate", "Hi", "--model", none, "--sae", none, "--device", device],
        "index-features": ["index-features", "--corpus", none, "--sae", none, "--out", str(tmp_path / "i"), "--device", device],
        "train-sae": ["train-sae", "--hookpoint", "blocks.1.hook_resid_post", "--corpus", none, "--out", str(tmp_path / "run"),
                      "--device", device],  # fmt: skip
        "serve": ["serve", "--model", none, "--device", device],
    }


@pytest.mark.parametrize(
    ("device", "needle"),
    [
        ("nosuch", "invalid device 'nosuch' (expected a torch device such as cpu, cuda or cuda:0); available here: cpu"),
        pytest.param(
            "cuda", "device 'cuda' cannot be used: ",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
    ],
)
def test_every_command_refuses_a_bad_device_before_it_loads_anything(
    tmp_path: Path, device: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, argv in _commands(tmp_path, device).items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.splitlines()) <= 2, (name, err)
    assert not (tmp_path / "run").exists()


def test_the_sidecar_settings_check_the_device_and_name_where_it_came_from() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(env={"AUDITOR_DEVICE": "nosuch"})
    assert "setting device: " in info.value.message and "invalid device 'nosuch'" in info.value.message
    assert "(from environment AUDITOR_DEVICE)" in info.value.message
    assert Settings.load(env={"AUDITOR_DEVICE": "cpu"}).device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_settings_naming_a_gpu_load_on_a_host_without_one_and_serve_refuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`auditor alerts list --config` reads the sidecar's settings to find its log and runs no
    model, so a config written for the GPU host must load here; `auditor serve` refuses it."""
    config = tmp_path / "auditor.yaml"
    config.write_text(f"device: cuda\ndata_dir: {tmp_path / 'data'}\n")
    assert Settings.load(env={}, config_file=config).device == "cuda"
    assert main(["alerts", "list", "--config", str(config)]) == 2
    assert "no audit log there" in capsys.readouterr().err  # got past the settings to the log
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda' cannot be used" in err and "Traceback" not in err
