"""The text an alert records for each kind of audit input."""

from __future__ import annotations

import pytest
import torch

from auditor.text import AuditInput, InputError, audited_text

CHAT = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"})


@pytest.mark.parametrize(
    ("item", "full", "completion_only"),
    [
        (AuditInput(text="plain"), "plain", "plain"),
        (AuditInput(prompt="Q?"), "Q?", "Q?"),
        (AuditInput(prompt="Q?", completion=" A."), "Q?\n A.", " A."),
        (AuditInput(messages=CHAT), "Hi\nHello", "Hi\nHello"),
        (AuditInput(messages=CHAT[:1], completion="Sure"), "Hi\nSure", "Sure"),
    ],
)
def test_audited_text(item: AuditInput, full: str, completion_only: str) -> None:
    assert audited_text(item) == full
    assert audited_text(item, completion_only=True) == completion_only


def test_token_roles_sweep_equals_the_first_overlapping_span() -> None:
    import random

    from auditor.text import _token_roles

    def naive(offsets: list[tuple[int, int]], spans: list[tuple[int, int, int]]) -> list[int]:
        return [next((r for s0, s1, r in spans if a < s1 and b > s0), -1) for a, b in offsets]

    rng = random.Random(0)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, 60), rng.randint(0, 6)))
        bounds = [0, *cuts, 60]
        spans = [(s0, s1, rng.randint(0, 2)) for s0, s1 in zip(bounds, bounds[1:]) if rng.random() < 0.6]
        # Tokens along the text, some of zero width, some overlapping the previous one, and now
        # and then a step back (offsets a tokenizer may give around special or split characters).
        offsets, a = [], 0
        while a < 60:
            b = min(60, a + rng.randint(0, 5))
            offsets.append((a, b))
            a = max(0, b - rng.randint(0, 1)) if rng.random() < 0.9 else max(0, a - rng.randint(1, 10))
            if b == 60:
                break
        assert _token_roles(offsets, spans) == naive(offsets, spans)


def test_role_masks_give_each_scope_its_tokens() -> None:
    from auditor.text import ROLE_BOTH, ROLE_COMPLETION, ROLE_PROMPT, role_masks

    role = torch.tensor([[ROLE_PROMPT, ROLE_COMPLETION, ROLE_BOTH, ROLE_PROMPT]])
    is_completion, is_prompt = role_masks(role)
    assert is_completion.tolist() == [[False, True, True, False]]
    assert is_prompt.tolist() == [[True, False, True, True]]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "AuditInput: give exactly one of 'text', 'messages' or 'prompt' (found none)"),
        # A Python caller's text + prompt audited the text alone: the prompt was never audited.
        ({"text": "a", "prompt": "b"}, "AuditInput: give exactly one of 'text', 'messages' or 'prompt' (found ['text', 'prompt'])"),
        ({"text": 123}, "AuditInput: 'text' must be a string"),
        ({"text": "a", "completion": "b"}, "AuditInput: 'completion' goes with 'prompt' or 'messages', not with 'text'"),
        ({"messages": "hello"}, "AuditInput: 'messages' must be a sequence of {role, content} mappings"),
    ],
)
def test_an_audit_input_built_in_python_checks_its_own_fields(fields: dict, message: str) -> None:
    with pytest.raises(InputError) as info:
        AuditInput(**fields)
    assert info.value.message == message


# ---------------------------------------------------------------- a grown string's tokens from its prefix's

_PIECES = ["  ", "\n\n", "it's", " 1234567", "!!", " 'll", "é", "\U0001f642", "\t", "<|im_", "end|>", "x,y", " ", "'", "s", "<|im_end|>"]


def _grow(tokenizer, text: str, seed: int):  # type: ignore[no-untyped-def]
    """Feed ``text`` as a chat completion in random cuts; each step's batch from the last one's tokens and from scratch."""
    import random

    from auditor.text import tokenize_batch

    rng = random.Random(seed)
    messages = ({"role": "user", "content": "Say something."},)
    previous, cut = None, 0
    while cut < len(text):
        cut += rng.randint(1, 12)
        item = AuditInput(messages=messages, completion=text[:cut])
        grown = tokenize_batch(tokenizer, [item], previous=[previous])
        whole = tokenize_batch(tokenizer, [item])
        yield grown, whole
        previous = grown.encoded[0]


def test_a_grown_string_gets_the_tokens_of_tokenizing_it_whole(default_model) -> None:  # type: ignore[no-untyped-def]
    """Random texts with runs of spaces, digits, contractions, emoji and added tokens split between cuts."""
    import json
    import random
    from pathlib import Path

    from auditor import text as text_module

    tokenizer = default_model.tokenizer
    assert text_module._growable(tokenizer) is not None  # the default's byte-level BPE takes the fast path
    lines = (Path(__file__).resolve().parents[2] / "datasets" / "safety-v1" / "benign_a.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    rng = random.Random(0)
    calls = {"grown": 0}
    real = text_module._grown

    def counted(*args):  # type: ignore[no-untyped-def]
        out = real(*args)
        calls["grown"] += out is not None
        return out

    steps = 0
    try:
        text_module._grown = counted
        for seed in range(40):
            chars = list(" ".join(rng.sample(texts, 2)))
            for _ in range(6):
                chars.insert(rng.randrange(len(chars) + 1), rng.choice(_PIECES))
            for grown, whole in _grow(tokenizer, "".join(chars), seed):
                steps += 1
                assert grown.input_ids.tolist() == whole.input_ids.tolist()
                assert grown.tokens == whole.tokens and grown.content_mask.tolist() == whole.content_mask.tolist()
                assert grown.role.tolist() == whole.role.tolist() and grown.encoded[0].ids == whole.encoded[0].ids
    finally:
        text_module._grown = real
    assert calls["grown"] > steps * 0.8  # most steps encoded only the end


def test_what_is_not_a_grown_string_is_tokenized_whole(default_model) -> None:  # type: ignore[no-untyped-def]
    from auditor.text import Encoded, _grown, tokenize_batch

    tokenizer = default_model.tokenizer
    first = tokenize_batch(tokenizer, [AuditInput(text="The quick brown fox jumps over")]).encoded[0]
    assert _grown(tokenizer, first.text + " the lazy dog", first) is not None
    assert _grown(tokenizer, "A different start entirely, and longer", first) is None  # not an extension
    assert _grown(tokenizer, first.text + "<|im_end|> more", first) is None  # an added token after the join
    assert _grown(tokenizer, "The quick", Encoded("The quick", [1, 2], [(0, 3), (3, 9)])) is None  # too short to cut
    # Tokens that disagree with the text (a caller's stale state) are caught by the check, not kept.
    stale = Encoded(first.text, [0] * len(first.ids), first.offsets, first.piece, first.vocab)
    assert _grown(tokenizer, first.text + " the lazy dog", stale) is None
    # Padding or truncation another caller left on the shared backend: the whole string, through the tokenizer.
    backend = tokenizer._tokenizer
    backend.enable_padding(length=64)
    try:
        assert _grown(tokenizer, first.text + " the lazy dog", first) is None
    finally:
        backend.no_padding()
    assert _grown(tokenizer, first.text + " the lazy dog", first) is not None


@pytest.mark.parametrize("scheme", ["metaspace", "prefix_space", "no_backend"])
def test_tokenizers_of_other_schemes_always_tokenize_whole(scheme: str) -> None:
    """SentencePiece-style (a prefix space on every string) and byte-level with an added prefix
    space would tokenize an end differently alone: those tokenize whole strings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from auditor.text import Encoded, _growable, _grown, tokenize_batch

    if scheme == "no_backend":
        tokenizer = object()
    else:
        backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate("abcdefgh ▁Ġ")}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.Metaspace() if scheme == "metaspace" else pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert _growable(tokenizer) is None
    assert _grown(tokenizer, "abc def gha bcd", Encoded("abc def", [1, 2, 3, 4], [(0, 1), (1, 3), (3, 5), (5, 7)])) is None
    if scheme != "no_backend":
        first = tokenize_batch(tokenizer, [AuditInput(prompt="abc def")])
        again = tokenize_batch(tokenizer, [AuditInput(prompt="abc def gh")], previous=first.encoded)
        assert again.input_ids.tolist() == tokenize_batch(tokenizer, [AuditInput(prompt="abc def gh")]).input_ids.tolist()


def test_tokens_added_later_are_seen_at_the_join() -> None:
    """A token added to the tokenizer after its first use is an added token at the join from then on."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from auditor.text import _grown, tokenize_batch

    vocab = {c: i for i, c in enumerate("abcdefghĠ")}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    first = tokenize_batch(tokenizer, [AuditInput(prompt="abc def gab")]).encoded[0]
    assert _grown(tokenizer, first.text + "cd", first) is not None
    tokenizer.add_tokens(["bcd"])
    assert _grown(tokenizer, first.text + "cd", first) is None  # "bcd" now spans the join
    grown = tokenize_batch(tokenizer, [AuditInput(prompt=first.text + "cd")], previous=[first])
    assert grown.input_ids.tolist() == tokenize_batch(tokenizer, [AuditInput(prompt=first.text + "cd")]).input_ids.tolist()
