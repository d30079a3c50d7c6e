"""`auditor generate --steer ... --compare` and `auditor export-control-vector` on a tiny saved model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import transformers

from auditor.cli import build_parser, main
from auditor.models import LoadedModel
from tests.unit.steering.conftest import LIBRARY_YAML, random_sae


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, loaded: LoadedModel) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny-model"
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    lib_dir = root / "lib"
    random_sae().save(lib_dir / "sae")
    (lib_dir / "library.yaml").write_text(LIBRARY_YAML)
    return model_dir, lib_dir / "library.yaml"


@pytest.fixture(autouse=True)
def _steering_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make sure the steering commands are registered, whether or not auditor.cli lists them yet.
    import auditor.cli as cli

    if "auditor.steering.cli" not in cli._COMMAND_MODULES:
        monkeypatch.setattr(cli, "_COMMAND_MODULES", (*cli._COMMAND_MODULES, "auditor.steering.cli"))


def test_generate_compare_prints_both_completions_and_the_trace(saved: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, lib = saved
    argv = ["generate", "The cat sat", "--raw", "--model", str(model_dir), "--library", str(lib), "--max-tokens", "6"]
    assert main([*argv, "--steer", "topic.weather=add:25", "--compare", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["text"] != data["default_text"]
    assert data["interventions"] == ["topic.weather=add:25@all"]
    assert len(data["feature_traces"]["topic.weather"]) == len(data["tokens"]) == 6
    assert main([*argv, "--steer", "topic.weather=add:25", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "STEERED (topic.weather=add:25@all)" in out and "DEFAULT" in out
    assert "activation per token" in out
    trace_lines = [line for line in out.splitlines() if "topic.weather" in line and "->" in line]
    assert len(trace_lines) == 6
    # The side-by-side rows hold both texts.
    body = "".join(line.split(" | ")[0].strip() for line in out.splitlines() if " | " in line)
    assert data["text"].split()[0] in body


def test_generate_refuses_out_of_bound_steering(saved: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, lib = saved
    code = main(["generate", "Hi", "--model", str(model_dir), "--library", str(lib), "--steer", "mood.sad=add:50", "--max-abs-value", "10"])
    assert code == 2
    assert "exceeds the limit 10" in capsys.readouterr().err


def test_a_steering_spec_spells_its_value_in_every_mode(saved: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, lib = saved
    for spec, fix in (("mood.sad=clamp", "mood.sad=clamp:0"), ("mood.sad=add", "mood.sad=add:8"), ("9=scale", "9=scale:0.5")):
        code = main(["generate", "Hi", "--model", str(model_dir), "--library", str(lib), "--steer", spec, "--max-tokens", "1"])
        err = capsys.readouterr().err
        assert code == 2 and f"needs a value, e.g. {fix}; expected NAME=MODE:VALUE" in err, err


def test_export_control_vector(saved: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, lib = saved
    out = tmp_path / "v.gguf"
    argv = ["export-control-vector", "--model", str(model_dir), "--library", str(lib), "--steer", "deception.fraud=add:4"]
    assert main([*argv, "-o", str(out)]) == 0
    assert "direction.1" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    [tensor] = reader.tensors
    assert tensor.name == "direction.1"
    np.testing.assert_allclose(np.asarray(tensor.data), 4.0 * random_sae().W_dec[5].numpy(), rtol=1e-6)
    code = main([*argv[:-1], "deception.fraud=clamp:0", "-o", str(out)])
    assert code == 2 and "only NAME=add:C" in capsys.readouterr().err
    for bad, why in ((tmp_path, "it is a directory; give a file path"), (out / "v.gguf", f"{out} is a file, not a folder")):
        code = main([*argv, "-o", str(bad)])
        assert code == 2 and capsys.readouterr().err == f"error: cannot write {bad}: {why}\n"


@pytest.mark.parametrize(
    ("hookpoint", "message"),
    [
        # The tiny model has 3 layers: a direction.N past them would be written and never applied.
        ("blocks.3.hook_resid_post", "hookpoint blocks.3.hook_resid_post: layer 3 is out of range for tiny-model, "
         "which has 3 layers (valid layers: 0..2)"),
        ("blocks.99.hook_resid_pre", "layer 99 is out of range for tiny-model, which has 3 layers"),
        ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre is the embeddings (the input of block 0); llama.cpp's "
         "control vectors add to the output of block 1 or later"),
    ],
)
def test_export_refuses_a_layer_the_model_does_not_have(
    saved: tuple[Path, Path], tmp_path: Path, hookpoint: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, lib = saved
    out = tmp_path / "v.gguf"
    argv = ["export-control-vector", "--model", str(model_dir), "--sae", str(lib.parent / "sae"), "--steer", "5=add:4"]
    assert main([*argv, "--hookpoint", hookpoint, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_export_checks_the_width_of_the_model_it_is_for(
    saved: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, lib = saved
    other = tmp_path / "wide"  # a configuration is all the export reads of a model
    transformers.LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4).save_pretrained(other)
    argv = ["export-control-vector", "--model", str(other), "--library", str(lib), "--steer", "deception.fraud=add:4"]
    assert main([*argv, "-o", str(tmp_path / "v.gguf")]) == 2
    assert "SAE expects d_in=32 but model wide has hidden size 64" in capsys.readouterr().err


def test_parser_has_both_commands() -> None:
    parser = build_parser()
    args = parser.parse_args(["generate", "x", "--steer", "a.b=clamp:0", "--steer", "3=add:1", "--compare"])
    assert args.steer == ["a.b=clamp:0", "3=add:1"] and args.compare


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_generate_refuses_a_temperature_that_is_not_finite_before_loading(
    tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The model path does not exist: the flag is checked before anything loads.
    assert main(["generate", "Hi", "--model", str(tmp_path / "none"), f"--temperature={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --temperature must be a finite number >= 0 (0 is greedy), got ") and "Traceback" not in err


def test_the_steering_examples_name_features_of_the_default_library(capsys: pytest.CaptureFixture[str]) -> None:
    from auditor.features import load_library
    from auditor.pipeline import DEFAULT_LIBRARY
    from auditor.steering.interventions import _CLI_HELP

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    shown = capsys.readouterr().out + _CLI_HELP
    names = set(re.findall(r"\b([a-z_]+\.[a-z_]+)=(?:clamp|scale|add):", shown))
    assert names, shown
    library = load_library(DEFAULT_LIBRARY)
    assert [n for n in sorted(names) if not library.has(n)] == []
