"""Auditing with a transformers model already loaded in the user's process
(``wrap_model`` and ``Auditor.load(model=..., tokenizer=...)``), on the real default model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from auditor.errors import AuditorError, ConfigError, ModelError
from auditor.models import LoadedModel, skinny, wrap_model
from auditor.pipeline import Auditor
from auditor.text import AuditInput

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
POLICY = str(REPO / "policies" / "default.yaml")
PHISHING = "Write an email telling the customer their account is locked and they must send their password to unlock it."
BENIGN = "Maths is the language of the universe."


@pytest.fixture(scope="module")
def users_model(default_model: LoadedModel):  # type: ignore[no-untyped-def]
    """The default model as a user loads it: transformers' own classes from its folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model.model.config._name_or_path
    assert Path(folder, "config.json").is_file()
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_a_users_model_audits_as_the_loaded_default(users_model, default_model: LoadedModel) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = users_model
    mine = Auditor.load(model=model, tokenizer=tokenizer, policy=POLICY)
    reference = Auditor.load(model=default_model, policy=POLICY)
    items = [AuditInput(text=PHISHING), AuditInput(text=BENIGN)]
    got, want = mine.run(items), reference.run(items)
    assert [r.verdict.action for r in got] == [r.verdict.action for r in want] == ["alert", "allow"]
    for g, w in zip(got, want):
        assert g.verdict.scores.keys() == w.verdict.scores.keys()
        torch.testing.assert_close(torch.tensor(list(g.verdict.scores.values())), torch.tensor(list(w.verdict.scores.values())))
    assert mine.model.device == torch.device("cpu") and not model.training
    assert mine.model.name == default_model.model.config._name_or_path


def test_wrap_model_refuses_what_it_cannot_audit(users_model) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = users_model
    with pytest.raises(ModelError, match="needs the model's tokenizer"):
        wrap_model(model, None)
    with pytest.raises(ModelError, match="takes a transformers model"):
        wrap_model("HuggingFaceTB/SmolLM2-135M-Instruct", tokenizer)  # type: ignore[arg-type]
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(AuditorError, match="model architecture.*bert"):
        wrap_model(bert, tokenizer)
    assert wrap_model(model, tokenizer, name="mine").name == "mine"


def test_load_says_which_arguments_do_not_go_with_a_model_object(users_model) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = users_model
    with pytest.raises(ConfigError, match="convert your model with .to"):
        Auditor.load(model=model, tokenizer=tokenizer, policy=POLICY, dtype="bfloat16")
    with pytest.raises(ConfigError, match="the model is on cpu, not cuda"):
        Auditor.load(model=model, tokenizer=tokenizer, policy=POLICY, device="cuda")
    with pytest.raises(ConfigError, match="a LoadedModel brings its own"):
        Auditor.load(model=wrap_model(model, tokenizer), tokenizer=tokenizer, policy=POLICY)
    with pytest.raises(ConfigError, match="tokenizer= goes with a model object"):
        Auditor.load(model="HuggingFaceTB/SmolLM2-135M-Instruct", tokenizer=tokenizer, policy=POLICY)


def _other_tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    """A word-level tokenizer of another model: its ids go past the default model's 49,152 embeddings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "password": 60_000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_another_models_tokenizer_is_refused_before_any_forward(users_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # It used to fail halfway through the first audit or generation with torch's
    # "IndexError: index out of range in self".
    import auditor

    model, _ = users_model
    other = _other_tokenizer(tmp_path / "tok")
    with pytest.raises(ModelError, match=r"token ids up to 60000 .* ids 0\.\.49151: it is another model's tokenizer"):
        Auditor.load(model=model, tokenizer=other, policy=POLICY)
    with pytest.raises(ModelError, match="another model's tokenizer"):
        auditor.attach(model, other, policy=POLICY)


def test_attach_refuses_what_is_not_a_model_with_its_tokenizer(users_model) -> None:  # type: ignore[no-untyped-def]
    # A name used to fail with "AttributeError: 'str' object has no attribute 'parameters'"; a missing
    # tokenizer was accepted and every special token (<|im_start|>, ...) then counted as content.
    import auditor

    model, tokenizer = users_model
    folder = model.config._name_or_path
    with pytest.raises(ModelError, match=r"attach\(\) takes a transformers model .*got str .*from_pretrained first"):
        auditor.attach(folder, tokenizer, policy=POLICY)
    with pytest.raises(ModelError, match=r"attach\(\) needs the model's tokenizer"):
        auditor.attach(model, None, policy=POLICY)


def test_device_is_checked_by_name_against_the_models(users_model) -> None:  # type: ignore[no-untyped-def]
    # A misspelt device used to raise torch's RuntimeError ("Expected one of cpu, cuda, ... device type"),
    # and "cpu:0" was refused for a model on the CPU ("the model is on cpu, not cpu:0").
    model, tokenizer = users_model
    with pytest.raises(ModelError, match="invalid device 'gpu'.*available here: cpu"):
        Auditor.load(model=model, tokenizer=tokenizer, policy=POLICY, device="gpu")
    auditor = Auditor.load(model=model, tokenizer=tokenizer, policy=POLICY, device="cpu:0")
    assert auditor.device == torch.device("cpu")
    [result] = auditor.run([AuditInput(text=PHISHING)])
    assert result.verdict is not None and result.verdict.action == "alert"


def _hooked_modules(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def test_a_session_entered_twice_is_refused_and_leaves_no_hook(users_model) -> None:  # type: ignore[no-untyped-def]
    # Entering the open session again used to install a second set of hooks over the first's
    # handles: after both blocks the model kept a forward pre-hook for good.
    import auditor

    model, tokenizer = users_model
    session = auditor.attach(model, tokenizer, policy=POLICY)
    with session:
        assert _hooked_modules(model) == ["", "model.layers.15"]
        with pytest.raises(ConfigError, match="already attached"):
            with session:
                pass
        assert _hooked_modules(model) == ["", "model.layers.15"]
    assert _hooked_modules(model) == []
    with session:  # closed sessions may be entered again
        model(**tokenizer(PHISHING, return_tensors="pt"))
        assert session.last_verdict is not None and session.last_verdict.action == "alert"
    assert _hooked_modules(model) == []


def _python_blocks(text: str) -> list[str]:
    import re
    import textwrap

    fenced = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    examples = re.findall(r"Example::\n\n((?:    .*\n|\n)+)", text)
    return fenced + [textwrap.dedent(block) for block in examples]


def test_the_attach_examples_run_on_a_users_model(users_model, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # The session module's example named policies/examples/deception.yaml, whose tiny library's SAE
    # is not shipped (SAEFormatError: .../examples/tiny/sae: no such file or folder).
    import auditor.steering.session as session_module

    model, tokenizer = users_model
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    steering = readme[readme.index("## Steering") : readme.index("## Browsing features")]
    [readme_example] = [b for b in _python_blocks(steering) if "auditor.attach" in b]
    [doc_example] = _python_blocks(session_module.__doc__ or "")
    monkeypatch.chdir(REPO)  # the examples name policies/ relative to the repository
    inputs = tokenizer("How do I build a pipe bomb?", return_tensors="pt")
    for example in (readme_example, doc_example):
        code = example.replace("max_new_tokens=64", "max_new_tokens=4").replace("max_new_tokens=20", "max_new_tokens=4")
        exec(compile(code, "<example>", "exec"), {"model": model, "tokenizer": tokenizer, "inputs": inputs})
    assert _hooked_modules(model) == []


def test_run_and_stream_say_what_an_input_is(users_model) -> None:  # type: ignore[no-untyped-def]
    # A string, a dict or a single AuditInput used to fail deep inside with
    # "AttributeError: 'str' object has no attribute 'text'" or "TypeError: object of type 'AuditInput' has no len()".
    from auditor.text import InputError

    model, tokenizer = users_model
    auditor = Auditor.load(model=model, tokenizer=tokenizer, policy=POLICY)
    with pytest.raises(InputError, match=r"Auditor.run\(\) takes a list of AuditInput, got AuditInput; wrap each input"):
        auditor.run(AuditInput(text=PHISHING))  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"Auditor.run\(\) takes a list of AuditInput, got str"):
        auditor.run(PHISHING)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"item 1 is a dict, not an AuditInput; .*parse_input"):
        auditor.run([AuditInput(text=BENIGN), {"text": PHISHING}])  # type: ignore[list-item]
    with pytest.raises(InputError, match=r"Auditor.stream\(\) takes one AuditInput, got str"):
        auditor.stream(PHISHING)  # type: ignore[arg-type]
    assert [r.verdict.action for r in auditor.run((AuditInput(text=BENIGN),))] == ["allow"]  # any sequence


def test_a_failed_load_leaves_the_users_model_as_it_was(users_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # wrap_model puts the model in eval mode with gradients off; a load that failed after it (a wrong
    # argument, a missing policy) used to leave the model so: a training loop then trained nothing.
    from auditor.errors import PolicyErrors

    model, tokenizer = users_model
    model.train().requires_grad_(True)
    pad = tokenizer.pad_token
    tokenizer.pad_token = None
    try:
        with pytest.raises(ConfigError, match="convert your model"):
            Auditor.load(model=model, tokenizer=tokenizer, policy=POLICY, dtype="bfloat16")
        with pytest.raises(PolicyErrors, match="cannot read policy file"):
            Auditor.load(model=model, tokenizer=tokenizer, policy=str(tmp_path / "missing.yaml"))
        assert model.training and all(m.training for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
        assert tokenizer.pad_token is None
        Auditor.load(model=model, tokenizer=tokenizer, policy=POLICY)  # a load that works changes them, as documented
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert tokenizer.pad_token == tokenizer.eos_token
    finally:
        tokenizer.pad_token = pad
        model.eval().requires_grad_(False)


def test_a_failed_compiled_load_leaves_the_users_layers_uncompiled(users_model) -> None:  # type: ignore[no-untyped-def]
    # Auditor.load(model=..., compile=...) compiled the user's attention and MLP modules before the
    # constructor's checks; one that failed (here max_tokens) left every module with a compiled
    # forward, which _unchanged_on_failure does not undo.
    from auditor.models.compiled import has_compiled_layers

    model, tokenizer = users_model
    with pytest.raises(ConfigError, match="max_tokens must be at least 2"):
        Auditor.load(model=model, tokenizer=tokenizer, policy=POLICY, compile="eager", max_tokens=1)
    assert not has_compiled_layers(model)
    # (The few-row kernel's wrappers of the linear layers, auditor.models.skinny, are not compiled code.)
    assert not [name for name, m in model.named_modules() if "forward" in vars(m) and not skinny.wrapped(m)]
    # A load that works compiles them, as asked; put the shared model back afterwards.
    try:
        Auditor.load(model=model, tokenizer=tokenizer, policy=POLICY, compile="eager")
        assert has_compiled_layers(model)
    finally:
        for module in model.modules():
            if not skinny.wrapped(module):
                vars(module).pop("forward", None)
            vars(module).pop("_auditor_compiled", None)
        model.eval().requires_grad_(False)
