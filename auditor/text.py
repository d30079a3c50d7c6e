"""Turn audit inputs (plain text, chats, prompt + completion) into padded token batches.

Every input is rendered to one string plus the character spans that hold
*content* (what a user or the model wrote). Tokens outside those spans are
chat-template scaffolding (role names, ``<|im_start|>``, the template's default
system prompt), padding or the leading sink token, and are masked out of
features and policy evaluation.

Position 0 of a causal LM is an attention sink with a residual norm two orders
of magnitude above ordinary tokens (SmolLM2: ~23,800 against a median of ~170),
so it is never content. Plain text gets a document-separator token prepended so
that its first real token is not the one lost to the sink; chats already start
with a template token.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from auditor.errors import AuditorError

__all__ = [
    "AuditInput",
    "Encoded",
    "TokenBatch",
    "ROLE_PROMPT",
    "ROLE_COMPLETION",
    "ROLE_BOTH",
    "role_masks",
    "audited_text",
    "parse_input",
    "message_text",
    "with_tool_calls",
    "render",
    "tokenize_batch",
    "sink_token_id",
]

ROLE_PROMPT = 0
ROLE_COMPLETION = 1
# Plain text that is neither a prompt nor a completion: prompt- and
# completion-scoped rules both see it.
ROLE_BOTH = 2

Role = Literal[0, 1, 2]

# A UTF-16 surrogate code point on its own: JSON allows the escape (``"\\ud83d"``, half of an
# emoji cut off by a client that truncates UTF-16 strings) and Python decodes it, but it is not
# Unicode text: the tokenizer refuses it and UTF-8 cannot encode it (the audit log, responses).
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_text(text: Any) -> Any:
    """``text`` with each lone surrogate replaced by U+FFFD (one code point for one, so character
    offsets stay put); anything that is not a string as it is."""
    if isinstance(text, str) and _LONE_SURROGATE.search(text):
        return _LONE_SURROGATE.sub("\ufffd", text)
    return text


def role_masks(role: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens completion-scoped and prompt-scoped rules see, from a role tensor:
    ``(is_completion, is_prompt)``; :data:`ROLE_BOTH` is both. One comparison each, as the
    roles are 0, 1, 2 (prompt, completion, both)."""
    return role >= ROLE_COMPLETION, role != ROLE_COMPLETION


class InputError(AuditorError):
    """An audit input does not have one of the accepted shapes."""


@dataclass(frozen=True)
class AuditInput:
    """One thing to audit.

    Exactly one of ``text``, ``messages`` or ``prompt`` is set; ``completion``
    goes with ``prompt`` or ``messages`` and is audited as model output.
    """

    text: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    prompt: str | None = None
    completion: str | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        # Checked here, not only in parse_input: a Python caller's text + prompt would otherwise
        # audit the text alone and never the prompt.
        problem = _shape_problem(vars(self))
        if problem is not None:
            raise InputError(f"AuditInput: {problem}")
        if self.messages is not None and (
            isinstance(self.messages, (str, bytes)) or not all(isinstance(m, Mapping) for m in self.messages)
        ):
            raise InputError("AuditInput: 'messages' must be a sequence of {role, content} mappings")
        # Lone surrogates become U+FFFD here, so the rest of the text is audited (not refused by
        # the tokenizer: an error that fail-open would let through unaudited) and alerts store.
        for key in ("text", "prompt", "completion"):
            value = getattr(self, key)
            valid = _valid_text(value)
            if valid is not value:
                object.__setattr__(self, key, valid)
        if self.messages is not None and any(_valid_text(m.get("content")) is not m.get("content") for m in self.messages):
            messages = tuple({**m, "content": _valid_text(m.get("content"))} for m in self.messages)
            object.__setattr__(self, "messages", messages)


def _shape_problem(fields: Mapping[str, Any]) -> str | None:
    """What is wrong with the kind and types of an input's fields (``text``, ``messages``,
    ``prompt``, ``completion``), or None: the one check of :class:`AuditInput` and :func:`parse_input`."""
    kinds = [k for k in ("text", "messages", "prompt") if fields.get(k) is not None]
    if len(kinds) != 1:
        return f"give exactly one of 'text', 'messages' or 'prompt' (found {kinds or 'none'})"
    for key in ("text", "prompt", "completion"):
        if fields.get(key) is not None and not isinstance(fields[key], str):
            return f"'{key}' must be a string"
    if "text" in kinds and fields.get("completion") is not None:
        return "'completion' goes with 'prompt' or 'messages', not with 'text'"
    return None


def message_text(message: Mapping[str, Any], where: str) -> str:
    """What a chat message says, as audited: its ``content`` (a string, or OpenAI content parts
    whose text parts are joined by newlines; other parts such as images carry no text) followed
    by its tool calls, each ``name arguments`` on its own line (text the model wrote as surely as
    its content; see :func:`with_tool_calls`)."""
    content = message.get("content")
    if content is None:
        if not with_tool_calls("", message):
            raise InputError(f"{where} needs a 'content': a string or a list of content parts (null only with 'tool_calls')")
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise InputError(f"{where}.content[{i}] must be an object such as {{'type': 'text', 'text': ...}}")
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
        text = "\n".join(parts)
    else:
        raise InputError(f"{where}.content must be a string, a list of content parts or null")
    return with_tool_calls(text, message)


def with_tool_calls(text: str, message: Mapping[str, Any]) -> str:
    """``text`` followed by the tool calls (and legacy ``function_call``) of a chat message or of
    a streamed delta: a call's name starts a new line, its arguments follow a space. Fed the
    deltas of a stream one by one (each with the text so far), it builds the same text as the
    whole message gives."""
    calls = message.get("tool_calls")
    functions = [c.get("function") for c in calls if isinstance(c, Mapping)] if isinstance(calls, list) else []
    functions.append(message.get("function_call"))
    for fn in functions:
        if not isinstance(fn, Mapping):
            continue
        name, args = fn.get("name"), fn.get("arguments")
        if isinstance(name, str) and name:
            text += ("\n" if text else "") + name + " "
        if isinstance(args, str):
            text += args
    return text


def parse_input(obj: Any, *, where: str = "input") -> AuditInput:
    """Validate one JSON object (a line of ``--input`` or a request body).

    Accepted: ``{"text": ...}``, ``{"messages": [{"role", "content"}...]}``,
    ``{"prompt": ..., "completion": ...}``, ``{"messages": [...], "completion": ...}``;
    an optional ``"id"``.
    """
    if isinstance(obj, str):
        return AuditInput(text=obj)
    if not isinstance(obj, Mapping):
        raise InputError(f"{where}: expected a JSON object or string, got {type(obj).__name__}")
    known = {"text", "messages", "prompt", "completion", "id"}
    extra = sorted(set(obj) - known)
    if extra:
        raise InputError(f"{where}: unknown field(s) {', '.join(extra)}; accepted: {', '.join(sorted(known))}")
    problem = _shape_problem(obj)  # before the messages are read, as AuditInput will check again
    if problem is not None:
        raise InputError(f"{where}: {problem}")
    ident = obj.get("id")
    messages = None
    if obj.get("messages") is not None:
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        checked = []
        for i, m in enumerate(raw):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise InputError(f"{where}: messages[{i}] must be an object with a string 'role' and a 'content'")
            checked.append({"role": m["role"], "content": message_text(m, f"{where}: messages[{i}]")})
        messages = tuple(checked)
    return AuditInput(
        text=obj.get("text"),
        messages=messages,
        prompt=obj.get("prompt"),
        completion=obj.get("completion"),
        id=None if ident is None else str(ident),
    )


def audited_text(item: AuditInput, *, completion_only: bool = False) -> str:
    """The text an alert about ``item`` records: every part written by a user or the model,
    joined by newlines, or with ``completion_only`` the completion alone when there is one
    (a proxy audits the prompt and the completion separately, each with its own alerts).
    """
    if item.text is not None:
        return item.text
    if completion_only and item.completion:
        return item.completion
    parts = [m["content"] for m in item.messages or ()]
    if item.prompt is not None:
        parts.append(item.prompt)
    if item.completion:
        parts.append(item.completion)
    return "\n".join(parts)


def sink_token_id(tokenizer: Any) -> int | None:
    """The token put in front of plain text to absorb the position-0 attention sink.

    The tokenizer's BOS token (what SAEs are trained with: ``prepend_bos``), else a
    document separator such as ``<|endoftext|>``. The SAE trainer starts its
    contexts with the same token, so audit-time activations match training.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        return int(bos)
    vocab = tokenizer.get_vocab()
    for name in ("<|endoftext|>", "<|begin_of_text|>", "<s>"):
        if name in vocab:
            return int(vocab[name])
    return None


def render(tokenizer: Any, item: AuditInput) -> tuple[str, list[tuple[int, int, int]], bool]:
    """Render an input to ``(string, content_spans, needs_sink)``.

    ``content_spans`` are ``(char_start, char_end, role)``; ``needs_sink`` says
    whether a sink token must be prepended (plain text) or the string already
    starts with template scaffolding (chats).
    """
    if item.text is not None:
        return item.text, [(0, len(item.text), ROLE_BOTH)], True
    if item.prompt is not None:
        prompt = item.prompt
        spans = [(0, len(prompt), ROLE_PROMPT)]
        rendered = prompt
        if item.completion:
            spans.append((len(prompt), len(prompt) + len(item.completion), ROLE_COMPLETION))
            rendered = prompt + item.completion
        return rendered, spans, True
    assert item.messages is not None  # parse_input guarantees one kind
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError("this model's tokenizer has no chat template; send 'text' or 'prompt' instead of 'messages'")
    messages = [dict(m) for m in item.messages]
    # With a completion to follow, render the assistant header it belongs under.
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=item.completion is not None
    )
    spans: list[tuple[int, int, int]] = []
    cursor = 0
    for m in messages:
        content = m["content"]
        start = rendered.find(content, cursor) if content else -1
        if start < 0:
            continue
        role = ROLE_COMPLETION if m["role"] == "assistant" else ROLE_PROMPT
        spans.append((start, start + len(content), role))
        cursor = start + len(content)
    if item.completion:
        start = len(rendered)
        rendered += item.completion
        spans.append((start, len(rendered), ROLE_COMPLETION))
    return rendered, spans, False


@dataclass(frozen=True)
class Encoded:
    """A rendered string's token ids and character offsets, as the tokenizer gave them (no sink
    token, no truncation): what :func:`tokenize_batch` starts from when the string has grown."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    piece: int = 0  # a character offset where the tokenizer's pre-tokenizer starts a piece (0: none known)
    vocab: int = -1  # the tokenizer's vocabulary size (added tokens included) when encoded; -1: not kept


# tokenizer -> (its backend, its added tokens' strings, the longest one's length, its vocabulary's
# size with them), or None where a grown string's tokens cannot be found from its prefix's (see _grown).
_GROWABLE: weakref.WeakKeyDictionary[Any, tuple[Any, list[str], int, int] | None] = weakref.WeakKeyDictionary()


def _growable(tokenizer: Any) -> tuple[Any, list[str], int, int] | None:
    """For byte-level BPE tokenizers (GPT-2's scheme: no normalizer, the regex pre-tokenizer without
    an added prefix space, no BPE dropout) the backend, its added tokens, the longest one's length
    and the vocabulary's size; else None. Looked up again when the vocabulary has grown (tokens
    added since)."""
    known: tuple[Any, list[str], int, int] | None | bool
    try:
        known = _GROWABLE[tokenizer]
    except (KeyError, TypeError):  # not seen yet, or not weakly referable
        known = False
    if known is None:
        return None
    if isinstance(known, tuple) and known[0].get_vocab_size(with_added_tokens=True) == known[3]:
        return known
    found = None
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        pre = backend.pre_tokenizer if backend is not None else None
        if (
            backend is not None
            and backend.normalizer is None
            and type(backend.model).__name__ == "BPE"
            and getattr(backend.model, "dropout", None) is None
            and type(pre).__name__ == "ByteLevel"
            and getattr(pre, "use_regex", False)
            and not getattr(pre, "add_prefix_space", True)
        ):
            added = [t.content for t in backend.get_added_tokens_decoder().values() if t.content]
            found = (backend, added, max((len(a) for a in added), default=1), backend.get_vocab_size(with_added_tokens=True))
    except Exception:  # another tokenizers release: tokenize whole strings
        found = None
    try:
        _GROWABLE[tokenizer] = found
    except TypeError:  # not weakly referable
        pass
    return found


def _grown(tokenizer: Any, text: str, previous: Encoded | None) -> Encoded | None:
    """``text``'s tokens from those of ``previous``, a prefix of it; None to tokenize it whole.

    A byte-level BPE tokenizer splits its input at its added tokens, cuts each part into pieces
    by a regular expression read left to right (no look-behind), and encodes each piece alone.
    Every piece of the prefix but its last ends where the next begins, inside the prefix, so it is
    cut the same way in the longer text; only the last one can grow (a word split between two
    chunks). So the tokens up to the second-to-last piece are kept, and the text from there is
    encoded anew; the second-to-last piece's new tokens must equal its old ones (a check of that
    argument), and no added token may appear where the prefix ended. Only the prefix's end is
    cut into pieces: from ``previous.piece``, where one is known to start.
    """
    if previous is None or len(previous.ids) < 4 or not text.startswith(previous.text):
        return None
    info = _growable(tokenizer)
    if info is None:
        return None
    backend, added, longest, vocab = info
    if previous.vocab != vocab:
        return None  # tokens were added since: the kept ones may split the text otherwise now
    if backend.padding is not None or backend.truncation is not None:
        return None  # settings another caller left on the backend (the tokenizer's own calls reset them)
    old = previous.text
    # Where the part the last piece is in starts: after the last added token of the prefix.
    start = max((old.rfind(a) + len(a) for a in added if a in old), default=0)
    if any(a in text[max(start, len(old) - longest + 1) :] for a in added):
        return None  # an added token at or across the join
    begin = max(start, previous.piece)
    pieces = backend.pre_tokenizer.pre_tokenize_str(old[begin:])
    if len(pieces) < 3:
        if begin == start:
            return None
        begin = start  # too little since the known piece: cut the whole part
        pieces = backend.pre_tokenizer.pre_tokenize_str(old[begin:])
        if len(pieces) < 3:
            return None
    check, last = begin + pieces[-2][1][0], begin + pieces[-1][1][0]
    ids, offsets = previous.ids, previous.offsets
    # The first token past the third-to-last piece (offsets may be trimmed of spaces, so by ends).
    j = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][1] <= check), -1) + 1
    kept = [i for i in range(j, len(offsets)) if offsets[i][1] <= last]  # the second-to-last piece's tokens
    if not kept or kept[-1] - j + 1 != len(kept):
        return None
    enc = backend.encode(text[check:], add_special_tokens=False)
    tail_ids, tail_offsets = list(enc.ids), [(a + check, b + check) for a, b in enc.offsets]
    m = len(kept)
    if tail_ids[:m] != ids[j : j + m] or tail_offsets[:m] != offsets[j : j + m]:
        return None
    return Encoded(text, ids[:j] + tail_ids, offsets[:j] + tail_offsets, check, previous.vocab)


@dataclass
class TokenBatch:
    """A right-padded batch with per-token content and role masks."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    content_mask: torch.Tensor  # [B, T] bool, True on content tokens only
    role: torch.Tensor  # [B, T] int8, ROLE_* per token (meaningful where content_mask)
    tokens: list[list[str]]  # per row, the text of each real token
    truncated: list[bool]  # per row, whether the input was cut at max_tokens
    encoded: list[Encoded] = field(default_factory=list)  # per row, the rendered string's tokens (for previous=)

    @property
    def lengths(self) -> torch.Tensor:  # [B]
        return self.attention_mask.sum(dim=1)

    @property
    def n_content_tokens(self) -> int:
        return int(self.content_mask.sum())


def _token_roles(offsets: Sequence[Sequence[int]], spans: Sequence[tuple[int, int, int]]) -> list[int]:
    """Each token's role: that of the first content span its ``(start, end)`` characters overlap, else -1.

    ``spans`` (from :func:`render`) are sorted and disjoint, so one sweep along the tokens finds
    them; it starts over wherever a tokenizer's offsets step back.
    """
    out: list[int] = []
    j, last = 0, -1
    for a, b in offsets:
        if a < last:
            j = 0
        last = a
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        # spans[j] ends after a (the sweep skipped the others): it is hit if it starts before b.
        out.append(spans[j][2] if j < len(spans) and spans[j][0] < b else -1)
    return out


def tokenize_batch(
    tokenizer: Any,
    items: Sequence[AuditInput],
    *,
    max_tokens: int | None = None,
    previous: Sequence[Encoded | None] | None = None,
) -> TokenBatch:
    """Tokenize inputs into one right-padded batch with content and role masks.

    Inputs longer than ``max_tokens`` are cut (and flagged in ``truncated``). ``previous[i]``,
    when given, is item ``i``'s earlier tokens (``batch.encoded[i]`` of an earlier call): where the
    item's rendered string only grew, the tokenizer then encodes its end alone, with the same
    result (a streamed input's cost no longer grows with its length; byte-level BPE tokenizers).
    """
    sink = sink_token_id(tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows: list[tuple[list[int], list[bool], list[int], list[str], bool]] = []
    rendered_items = [render(tokenizer, item) for item in items]
    found: list[Encoded | None] = [
        _grown(tokenizer, r[0], previous[i] if previous is not None and i < len(previous) else None)
        for i, r in enumerate(rendered_items)
    ]
    whole = [i for i, f in enumerate(found) if f is None]
    if whole:
        # One call for the rest: a fast tokenizer encodes the strings in parallel.
        encoded = tokenizer([rendered_items[i][0] for i in whole], add_special_tokens=False, return_offsets_mapping=True)
        info = _growable(tokenizer)
        vocab = info[3] if info is not None else -1
        for i, ids, offsets in zip(whole, encoded["input_ids"], encoded["offset_mapping"]):
            found[i] = Encoded(rendered_items[i][0], list(ids), [(a, b) for a, b in offsets], 0, vocab)
    encodings: list[Encoded] = []
    for (rendered, spans, needs_sink), enc in zip(rendered_items, found):
        assert enc is not None
        encodings.append(enc)
        ids, offsets = list(enc.ids), enc.offsets
        token_roles = _token_roles(offsets, spans)
        content = [role >= 0 for role in token_roles]
        roles = [max(role, 0) for role in token_roles]
        texts = [rendered[a:b] for a, b in offsets]
        if needs_sink and sink is not None:
            ids.insert(0, sink)
            content.insert(0, False)
            roles.insert(0, ROLE_PROMPT)
            texts.insert(0, tokenizer.convert_ids_to_tokens(sink))
        if content:
            content[0] = False  # the attention sink, whatever token sits there
        truncated = max_tokens is not None and len(ids) > max_tokens
        if truncated:
            ids, content, roles, texts = ids[:max_tokens], content[:max_tokens], roles[:max_tokens], texts[:max_tokens]
        rows.append((ids, content, roles, texts, truncated))

    width = max((len(r[0]) for r in rows), default=0)
    width = max(width, 1)
    n = len(rows)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    content_mask = torch.zeros((n, width), dtype=torch.bool)
    role = torch.zeros((n, width), dtype=torch.int8)
    for i, (ids, content, roles, _texts, _trunc) in enumerate(rows):
        k = len(ids)
        input_ids[i, :k] = torch.tensor(ids, dtype=torch.long)
        attention[i, :k] = 1
        content_mask[i, :k] = torch.tensor(content, dtype=torch.bool)
        role[i, :k] = torch.tensor(roles, dtype=torch.int8)
    return TokenBatch(
        input_ids=input_ids,
        attention_mask=attention,
        content_mask=content_mask,
        role=role,
        tokens=[r[3] for r in rows],
        truncated=[r[4] for r in rows],
        encoded=encodings,
    )
