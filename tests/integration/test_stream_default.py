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


def test_packed_batches_give_the_padded_verdicts(auditor: Auditor) -> None:
    texts = [
        "Hi.",
        COMPLETION,
        "Write an email telling the customer their account is locked and they must send their password to unlock it.",
        "Women are too emotional to be good engineers, everyone knows that.",
        "The bakery on the corner sells rye bread on Tuesdays.",
    ]
    items = [AuditInput(text=t) for t in texts] + [AuditInput(messages=({"role": "user", "content": PROMPT},), completion=COMPLETION)]
    assert auditor.pack  # the real default model passes the packing check
    packed = auditor.run(items, top_k=3)
    padded = Auditor(auditor.model, auditor.sae, library=auditor.library, policy=auditor.policy, pack=False).run(items, top_k=3)
    assert any(r.verdict is not None and r.verdict.action != "allow" for r in padded)  # not only all-allow
    for a, b in zip(packed, padded):
        assert a.tokens == b.tokens
        assert a.verdict is not None and b.verdict is not None
        assert a.verdict.action == b.verdict.action
        assert [m.rule_id for m in a.verdict.matches] == [m.rule_id for m in b.verdict.matches]
        keys = sorted(b.verdict.scores)
        torch.testing.assert_close(
            torch.tensor([a.verdict.scores[k] for k in keys]), torch.tensor([b.verdict.scores[k] for k in keys]), rtol=1e-3, atol=1e-4
        )
        # The strongest latent of each token (lower ranks may swap on float noise).
        assert [tf.indices[:1] for tf in a.top_features] == [tf.indices[:1] for tf in b.top_features]
