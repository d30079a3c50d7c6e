"""``auditor index-features`` on the real default model with a random SAE: a run, a resumed run, flag errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from auditor.cli import main
from auditor.viewer.index import SAE_FINGERPRINT, load_index
from tests.conftest import make_random_sae

pytestmark = pytest.mark.integration

TEXTS = [
    "Send the processing fee today to claim your prize.",
    "The river froze early this winter.",
    "Confirm your password at this link.",
    "He planted tomatoes along the fence.",
    "The museum opens at nine on weekdays.",
    "Wire the deposit and the winnings are yours.",
]


def _run(argv: list[str]) -> int:
    return main(argv)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("index-cli")
    sae = make_random_sae(root / "sae", d_in=576, d_sae=32, hookpoint="blocks.3.hook_resid_post")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return sae, corpus


def test_index_then_resume(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sae, corpus = setup
    out = tmp_path / "idx.safetensors"
    common = ["index-features", "--corpus", str(corpus), "--sae", str(sae), "--out", str(out), "--batch-docs", "2", "--contexts", "3"]
    assert _run([*common, "--max-docs", "4"]) == 0
    first = capsys.readouterr()
    assert "indexed 4 documents" in first.out and "indexing" in first.err  # the progress bar is on stderr
    assert load_index(out).docs_done == 4
    assert _run([*common, "--no-progress"]) == 0
    assert "indexed 6 documents" in capsys.readouterr().out
    index = load_index(out)
    assert index.meta["sae"] == str(sae) and index.meta["corpus"] == "corpus.jsonl" and index.d_sae == 32
    assert index.meta["hookpoint"] == "blocks.3.hook_resid_post" and index.meta["model"] == "SmolLM2-135M-Instruct"
    # Every latent that fired has its top documents sorted by activation.
    fired = index.top_doc[:, 0] >= 0
    assert fired.any()
    acts = index.top_acts[fired]
    assert torch.all(acts[:, :-1] >= acts[:, 1:])


def _last_line(err: str) -> str:
    """The error line, after whatever the model's loading printed to stderr before it."""
    return err.strip().splitlines()[-1] if err.strip() else ""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-docs", "0"], "--max-docs must be at least 1"),
        (["--batch-docs", "0"], "--batch-docs must be at least 1"),
        (["--contexts", "0"], "contexts must be at least 1"),
        (["--no-out"], "with --sae pass --out FILE"),
        (["--missing-corpus"], "corpus file not found"),
    ],
)
def test_flag_errors(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    sae, corpus = setup
    argv = ["index-features", "--corpus", str(tmp_path / "nope.jsonl" if "--missing-corpus" in extra else corpus), "--sae", str(sae)]
    if "--no-out" not in extra:
        argv += ["--out", str(tmp_path / "idx.safetensors")]
    argv += [e for e in extra if e not in ("--no-out", "--missing-corpus")]
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert _last_line(err).startswith("error: ") and message in err


def test_resume_checks_the_sae_weights_not_its_path(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sae, corpus = setup
    mine = tmp_path / "sae"
    shutil.copytree(sae, mine)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "idx.safetensors"
    common = ["index-features", "--corpus", str(corpus), "--out", str(out), "--batch-docs", "2", "--contexts", "2", "--no-progress"]
    assert _run([*common, "--sae", "sae", "--max-docs", "2"]) == 0
    fingerprint = load_index(out).meta[SAE_FINGERPRINT]
    # The same SAE by its absolute path continues the index.
    assert _run([*common, "--sae", str(mine), "--max-docs", "4"]) == 0
    assert "indexed 4 documents" in capsys.readouterr().out
    # Retrained in place (same path, same width, other weights): refused.
    make_random_sae(mine, d_in=576, d_sae=32, hookpoint="blocks.3.hook_resid_post", seed=1)
    assert _run([*common, "--sae", "sae"]) == 2
    err = capsys.readouterr().err
    assert _last_line(err).startswith("error: ") and "it was built from other SAE weights (sha256 " + fingerprint[:12] in err
    assert "--restart" in err and load_index(out).docs_done == 4
    # An index written before fingerprints is checked by the SAE's name, with a note.
    side = out.with_suffix(".json")
    data = json.loads(side.read_text())
    del data["meta"][SAE_FINGERPRINT]
    side.write_text(json.dumps(data))
    assert _run([*common, "--sae", "sae"]) == 0
    captured = capsys.readouterr()
    assert "indexed 6 documents" in captured.out
    assert "note: " in captured.err and "checks the SAE by its name only ('sae'); pass --restart" in captured.err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "c.jsonl: the corpus has no documents (the file is empty or holds only blank lines)"),
        ("\n \n", "c.jsonl: the corpus has no documents"),
        (
            '{"text": "fine"}\n{"text": "also fine"}\n{"txt": "wrong key"}\n',
            "c.jsonl:3: give exactly one of 'text', 'messages' or 'prompt' (found none); other keys are ignored, "
            "and this line has 'txt'",
        ),
    ],
)
def test_corpus_errors(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    sae, _ = setup
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(content)
    out = tmp_path / "idx.safetensors"
    assert _run(["index-features", "--corpus", str(corpus), "--sae", str(sae), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert _last_line(err).startswith("error: ") and message in err and err.count("c.jsonl") == 1, err
    assert not out.exists()
