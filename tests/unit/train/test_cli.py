"""``auditor train-sae`` on a tiny model folder written in the test."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from auditor.errors import ConfigError
from auditor.sae import load_sae
from auditor.train import cli

from .conftest import HOOKPOINT

FLAGS = [
    "--hookpoint", HOOKPOINT, "--tokens", "3000", "--expansion", "2", "--k", "4", "--batch-size", "128",
    "--buffer-tokens", "1024", "--context-size", "32", "--model-batch-size", "8", "--eval-documents", "40",
    "--eval-tokens", "500", "--ce-contexts", "4", "--init-sample-tokens", "500", "--quiet",
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="auditor")
    cli.register(parser.add_subparsers(dest="command"))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(["train-sae", *argv])
    return int(args.func(args))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, model: Any, tokenizer: Any) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_train_sae_writes_sae_and_reports(tmp_path: Path, model_dir: Path, corpus_file: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sae"
    assert _run(["--model", str(model_dir), "--corpus", str(corpus_file), "--out", str(out), *FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "# SAE training report" in printed and "held-out FVE" in printed
    report = json.loads((out / "training_report.json").read_text())
    assert report["config"]["expansion"] == 2 and report["ce_skipped"] is None
    assert report["model_name"] == model_dir.name
    sae = load_sae(str(out))
    assert sae.cfg.d_sae == 64 and sae.cfg.metadata.hook_name == HOOKPOINT


@pytest.mark.parametrize(("tokens", "note"), [("10", "trained on 128 tokens, not the 10 of --tokens"), ("256", None)])
def test_tokens_rounded_up_to_a_batch_are_said(tmp_path: Path, model_dir: Path, corpus_file: Path,
                                               capsys: pytest.CaptureFixture[str], tokens: str, note: str | None) -> None:
    out = tmp_path / "sae"
    assert _run(["--model", str(model_dir), "--corpus", str(corpus_file), "--out", str(out), *FLAGS, "--tokens", tokens]) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "training_report.json").read_text())
    if note is None:
        assert "note:" not in err and report["tokens_trained"] == 256
    else:
        assert f"note: {note}: training takes whole batches of --batch-size 128 (1 step)" in err, err
        assert report["tokens_trained"] == 128


def test_collect_then_train_from_the_shard(tmp_path: Path, model_dir: Path, corpus_file: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    shard = tmp_path / "acts.safetensors"
    assert _run(["--model", str(model_dir), "--corpus", str(corpus_file), "--save-activations", str(shard),
                 "--collect-only", *FLAGS]) == 0
    assert shard.is_file()
    out = tmp_path / "sae"
    assert _run(["--activations", str(shard), "--out", str(out), *FLAGS]) == 0
    report = json.loads((out / "training_report.json").read_text())
    assert report["activations_source"] == str(shard)
    assert report["ce_skipped"] is not None
    assert report["model_name"] == model_dir.name  # carried in the shard's metadata
    assert "CE splice test | skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "x"], "pass --corpus"),
        (["--corpus", "c.jsonl", "--collect-only"], "--collect-only needs --save-activations"),
        (["--activations", "a.safetensors", "--save-activations", "b.safetensors", "--out", "x"], "exclude each other"),
        (["--corpus", "c.jsonl"], "--out DIR is required"),
        (["--corpus", "c.jsonl", "--out", "x", "--batch-size", "0"], "--batch-size: Input should be greater than 0"),
        (["--corpus", "c.jsonl", "--out", "x", "--batch-size", "64", "--buffer-tokens", "32"], "buffer_tokens"),
    ],
)
def test_bad_flags_are_reported(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _run(["--hookpoint", HOOKPOINT, *argv])


def test_optional_flags_accept_none() -> None:
    args = _parser().parse_args(["train-sae", "--hookpoint", HOOKPOINT, "--outlier-factor", "none", "--aux-k", "7",
                                 "--no-normalize", "--adam-betas", "0.8", "0.99"])
    cfg = cli._config(args)
    assert cfg.outlier_factor is None and cfg.aux_k == 7 and cfg.normalize is False
    assert cfg.adam_betas == (0.8, 0.99)
    assert cfg.tokens == 2_000_000  # untouched flags keep the config defaults


@pytest.mark.parametrize("rel", ["taken", "taken/run"])
def test_an_out_path_that_cannot_be_a_folder_is_refused_before_training(
    tmp_path: Path, model_dir: Path, corpus_file: Path, rel: str
) -> None:
    (tmp_path / "taken").write_text("an existing file\n")
    out = tmp_path / rel
    # Refused before the model loads and the activations stream (this used to fail in sae.save, after training).
    with pytest.raises(ConfigError, match=r"taken(: it)? is a file, not a folder"):
        _run(["--model", str(model_dir), "--corpus", str(corpus_file), "--out", str(out), *FLAGS])
    assert (tmp_path / "taken").read_text() == "an existing file\n"
