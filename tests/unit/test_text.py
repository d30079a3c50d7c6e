"""The text an alert records for each kind of audit input."""

from __future__ import annotations

import pytest

from auditor.text import AuditInput, audited_text

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
