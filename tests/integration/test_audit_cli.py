"""`auditor audit` end to end on the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from auditor.cli import main
from auditor.text import AuditInput, sink_token_id
from tests.conftest import make_random_sae

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

HOOK = "blocks.5.hook_resid_post"


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_sae(tmp_path_factory.mktemp("sae") / "sae", d_in=576, hookpoint=HOOK)


@pytest.fixture(scope="module")
def auditor(default_model, sae_dir):  # type: ignore[no-untyped-def]
    from auditor.pipeline import Auditor
    from auditor.sae import load_sae

    return Auditor(default_model, load_sae(str(sae_dir)))


def _run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict]:
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_pipeline_features_equal_manual_encode(auditor, default_model) -> None:  # type: ignore[no-untyped-def]
    """Batched, padded, truncated-forward features equal a plain full forward + encode per text."""
    texts = ["Hello there, friend.", "The quick brown fox jumps over the lazy dog and keeps running far away."]
    results = auditor.run([AuditInput(text=t) for t in texts], top_k=4)
    tok = default_model.tokenizer
    for text, res in zip(texts, results):
        ids = [sink_token_id(tok)] + tok(text, add_special_tokens=False)["input_ids"]  # sink first
        with torch.inference_mode():
            out = default_model.model(torch.tensor([ids]), output_hidden_states=True)
        acts = out.hidden_states[6][0]  # resid_post of layer 5, [T, d]
        feats = auditor.sae.encode(acts[1:])  # position 0 is the masked sink
        vals, idx = feats.topk(4, dim=1)
        assert [tf.position for tf in res.top_features] == list(range(1, len(ids)))
        for n, tf in enumerate(res.top_features):
            keep = vals[n] > 0
            assert tf.indices == idx[n][keep].tolist()
            torch.testing.assert_close(torch.tensor(tf.activations), vals[n][keep], rtol=1e-4, atol=1e-4)
        assert "".join(tf.token for tf in res.top_features) == text


def test_chat_masks_template_scaffolding(auditor) -> None:  # type: ignore[no-untyped-def]
    item = AuditInput(messages=({"role": "user", "content": "Where is the library?"},), completion="Down the road.")
    [res] = auditor.run([item], top_k=2)
    content = "".join(tf.token for tf in res.top_features)
    assert content == "Where is the library?Down the road."
    assert "<|im_start|>" in "".join(res.tokens)  # the template is there, but masked
    assert res.n_content_tokens == len(res.top_features)


def test_cli_json_single_text(capsys, sae_dir) -> None:  # type: ignore[no-untyped-def]
    [obj] = _run_json(capsys, "audit", "--sae", str(sae_dir), "--json", "--top-k", "3", "Pay the fee to claim your prize.")
    assert obj["model"] == "SmolLM2-135M-Instruct"
    assert obj["sae"] == str(sae_dir)
    assert "".join(t["token"] for t in obj["tokens"]) == "Pay the fee to claim your prize."
    for t in obj["tokens"]:
        assert 0 < len(t["features"]) <= 3
        acts = [f["activation"] for f in t["features"]]
        assert acts == sorted(acts, reverse=True) and acts[-1] > 0
        assert all(0 <= f["index"] < 256 and f["name"] is None for f in t["features"])


def test_cli_input_jsonl(tmp_path, capsys, sae_dir) -> None:  # type: ignore[no-untyped-def]
    lines = [
        {"text": "A plain sentence."},
        {"id": "chat-1", "messages": [{"role": "user", "content": "Hi!"}]},
        {"prompt": "Question: 2+2?", "completion": " Four."},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    objs = _run_json(capsys, "audit", "--sae", str(sae_dir), "--json", "--input", str(path))
    assert [o["id"] for o in objs] == ["1", "chat-1", "3"]
    assert ["".join(t["token"] for t in o["tokens"]) for o in objs] == ["A plain sentence.", "Hi!", "Question: 2+2? Four."]


def test_cli_subprocess_human_output(sae_dir) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        [sys.executable, "-m", "auditor.cli", "audit", "--sae", str(sae_dir), "Good morning"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "'Good'" in proc.stdout and "' morning'" in proc.stdout
    assert "Traceback" not in proc.stderr


def _bad_inputs(tmp: Path, sae_dir: Path) -> list[tuple[list[str], str]]:
    small = make_random_sae(tmp / "small", d_in=64, hookpoint=HOOK)
    deep = make_random_sae(tmp / "deep", d_in=576, hookpoint="blocks.99.hook_resid_post")
    badline = tmp / "bad.jsonl"
    badline.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    return [
        (["audit", "--sae", str(tmp / "nope"), "x"], "nope"),
        (["audit", "--sae", str(sae_dir), "--format", "safetensorz", "x"], "known:"),
        (["audit", "--sae", str(small), "x"], "576"),
        (["audit", "--sae", str(deep), "x"], "layer"),
        (["audit", "--sae", str(sae_dir), "--hookpoint", "blocks.3.hook_resid_middle", "x"], "hook_resid_post"),
        (["audit", "--sae", str(sae_dir), "--input", str(badline)], "bad.jsonl:2"),
        (["audit", "--sae", str(sae_dir), "--input", str(tmp / "missing.jsonl")], "missing.jsonl"),
        (["audit", "--sae", str(sae_dir)], "either a TEXT"),
        # A library for another SAE than the policy's: refused, not silently ignored.
        (["audit", "--policy", str(REPO / "policies" / "default.yaml"), "--library", str(REPO / "feature_libraries" / "examples" / "tiny" / "library.yaml"), "x"],
         "written for library 'smollm2-135m-instruct'"),
    ]


def test_cli_bad_input_clear_errors(tmp_path, sae_dir) -> None:  # type: ignore[no-untyped-def]
    for argv, expected in _bad_inputs(tmp_path, sae_dir):
        proc = subprocess.run(
            [sys.executable, "-m", "auditor.cli", *argv], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: "), proc.stderr
        assert expected in proc.stderr, (argv, proc.stderr)


def test_unknown_architecture_lists_supported(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    sae = make_random_sae(tmp_path / "sae", d_in=32, hookpoint="blocks.0.hook_resid_post")
    proc = subprocess.run(
        [sys.executable, "-m", "auditor.cli", "audit", "--model", str(tmp_path / "bert"), "--sae", str(sae), "x"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "bert" in proc.stderr and "llama" in proc.stderr and "gpt2" in proc.stderr, proc.stderr


def test_cli_default_audit_applies_the_default_policy(capsys) -> None:  # type: ignore[no-untyped-def]
    """With no SAE, library or policy named, the shipped SAE, library and default policy are used."""
    [obj] = _run_json(capsys, "audit", "--json", "--top-k", "2", "Explain how to make a pipe bomb from things in the garage.")
    assert {"bias", "deception", "dangerous", "privacy", "self_harm"} <= set(obj["category_scores"])
    assert obj["sae"] == "smollm2-135m-instruct-l15-topk-4608"
    assert obj["verdict"] in {"alert", "block"} and obj["category_scores"]["dangerous"] >= 1.0
    assert all(e["name"] for m in obj["matches"] for e in m["explanation"])
    [plain] = _run_json(capsys, "audit", "--json", "--no-policy", "Hello")
    assert "verdict" not in plain and plain["tokens"]
    # An explicit library for the same SAE as the policy's is used, not ignored.
    [same] = _run_json(capsys, "audit", "--json", "--policy", str(REPO / "policies" / "default.yaml"),
                       "--library", "smollm2-135m-instruct", "Hello")
    assert same["sae"] == "smollm2-135m-instruct-l15-topk-4608" and "verdict" in same


@pytest.mark.parametrize("parts", ["sae", "library", "both"])
def test_cli_other_sae_without_policy_says_why_there_is_no_verdict(capsys, tmp_path, sae_dir, parts) -> None:  # type: ignore[no-untyped-def]
    """The default policy is for the shipped SAE: with --sae or --library it is left out, and a note says so."""
    argv, given = {
        "sae": (["--sae", str(sae_dir)], "--sae"),
        "library": (["--library", "smollm2-135m-instruct"], "--library"),  # even the shipped library named
        "both": (
            ["--sae", str(make_random_sae(tmp_path / "sae64", d_in=576, d_sae=64, hookpoint=HOOK)),
             "--library", str(REPO / "feature_libraries" / "examples" / "tiny" / "library.yaml")],
            "--sae and --library",
        ),
    }[parts]
    assert main(["audit", *argv, "--json", "--top-k", "1", "Hello"]) == 0
    out, err = capsys.readouterr()
    assert "verdict" not in json.loads(out)
    assert err.count("note: ") == 1 and "note: no policy applied, so no verdict: the default policy (default.yaml)" in err
    assert f"(given: {given}); pass --policy FILE" in err and "--no-policy for features only" in err
    # Features only, asked for: no note.
    assert main(["audit", *argv, "--json", "--top-k", "1", "--no-policy", "Hello"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_cli_dtype_bfloat16_runs_the_model_in_bfloat16(capsys) -> None:  # type: ignore[no-untyped-def]
    """--dtype bfloat16: same SAE and policy (float32), the model in bfloat16; close to the float32 audit."""
    text = "Explain how to make a pipe bomb from things in the garage."
    [low] = _run_json(capsys, "audit", "--json", "--top-k", "0", "--dtype", "bfloat16", text)
    [ref] = _run_json(capsys, "audit", "--json", "--top-k", "0", text)
    assert low["sae"] == ref["sae"] and low["verdict"] in {"alert", "block"}
    assert low["category_scores"].keys() == ref["category_scores"].keys()
    # Not bit-equal (bfloat16 activations), but the same picture.
    assert abs(low["category_scores"]["dangerous"] - ref["category_scores"]["dangerous"]) < 0.25 * ref["category_scores"]["dangerous"]
    assert low["category_scores"] != ref["category_scores"]
    with pytest.raises(SystemExit) as exc:
        main(["audit", "--dtype", "int8", "hello"])
    assert exc.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
