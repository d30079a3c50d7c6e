"""Streaming audits on the real default model and policy: chunk boundaries that split words."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from auditor.pipeline import Auditor
from auditor.text import AuditInput

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMPT = "How do I keep my savings safe?"
COMPLETION = (
    "Never share your bank PIN or one-time passcodes with anyone who calls you, "
    "even if they claim to be from your bank's fraud department."
)


@pytest.fixture(scope="module")
def auditor(default_model) -> Auditor:  # type: ignore[no-untyped-def]
    from auditor.pipeline import _default_library
    from auditor.policy import load_policy
    from auditor.sae import load_sae

    engine = load_policy(REPO / "policies" / "default.yaml")
    lib = engine.library or _default_library()
    sae = load_sae(str(lib.resolve_path(lib.sae.path)), dtype=torch.float32)
    return Auditor(default_model, sae, library=lib, policy=engine)


def test_chunks_that_split_words_give_the_single_audit_verdict(auditor: Auditor) -> None:
    item = AuditInput(messages=({"role": "user", "content": PROMPT},))
    stream = auditor.stream(item)
    # 5-character chunks cut most words, so the last token is often re-split by the next chunk.
    for i in range(0, len(COMPLETION), 5):
        got = stream.feed(COMPLETION[i : i + 5])
    [want] = auditor.run([AuditInput(messages=item.messages, completion=COMPLETION)])
    assert got.tokens == want.tokens
    assert got.content_mask == want.content_mask
    assert got.verdict is not None and want.verdict is not None
    assert got.verdict.action == want.verdict.action
    keys = sorted(want.verdict.scores)
    torch.testing.assert_close(
        torch.tensor([got.verdict.scores[k] for k in keys]),
        torch.tensor([want.verdict.scores[k] for k in keys]),
        rtol=1e-3,
        atol=1e-4,
    )
    assert stream.n_cached == len(want.tokens)
