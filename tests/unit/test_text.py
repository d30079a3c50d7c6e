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
