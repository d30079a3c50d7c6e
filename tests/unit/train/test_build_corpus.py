"""The text cleaning of scripts/build_corpus.py, on inputs written like the real package files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "build_corpus.py"


@pytest.fixture(scope="module")
def bc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_corpus", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_corpus"] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["build_corpus"]
    return module


@pytest.mark.parametrize(
    ("tagged", "plain"),
    [
        ("\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ./.", 'The jury said "no evidence".'),
        ("Atlanta's/np$ recent/jj primary/nn ,/, which/wdt won/vbd ./.", "Atlanta's recent primary, which won."),
        ("stream/nn ;/. ;/.", "stream;"),
        ("about/rb 1-1/2/cd inches/nns (/( 4/cd )/)", "about 1-1/2 inches (4)"),
    ],
)
def test_brown_tags_are_stripped(bc: ModuleType, tagged: str, plain: str) -> None:
    assert bc.brown_sentence(tagged) == plain


def test_fortune_files_split_on_percent_lines(bc: ModuleType) -> None:
    text = "First one.\n\t-- Someone\n%\nSecond\nfortune.\n%\n"
    assert [f.strip() for f in bc.split_fortunes(text)] == ["First one.\n\t-- Someone", "Second\nfortune."]


def test_mail_body_drops_headers_and_html(bc: ModuleType) -> None:
    raw = (
        "From spammer@example.com  Tue Aug  6 11:51:02 2002\n"
        "Received: from x by y\n"
        "Subject: You won\n"
        "Content-Type: text/html; charset=us-ascii\n\n"
        "<html><head><style>p {color: red}</style></head><body><p>Claim your <b>prize</b> now!</p>"
        "<p>Send your bank password.</p></body></html>\n"
    )
    body = bc.clean(bc.mail_body(raw))
    assert body == "Claim your prize now!\n\nSend your bank password."


def test_mail_body_prefers_the_plain_part(bc: ModuleType) -> None:
    raw = (
        "Subject: hi\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=XX\n\n"
        "--XX\nContent-Type: text/plain\n\nPlain words.\n"
        "--XX\nContent-Type: text/html\n\n<p>Html words.</p>\n--XX--\n"
    )
    assert bc.clean(bc.mail_body(raw)) == "Plain words."


def test_bounded_cuts_at_paragraphs_and_drops_short_pieces(bc: ModuleType) -> None:
    bounds = bc.Bounds(min_chars=10, max_chars=40)
    text = "A first paragraph of words.\n\nA second paragraph here.\n\nok"
    pieces = bc.bounded(text, bounds)
    assert pieces == ["A first paragraph of words.", "A second paragraph here.\n\nok"]
    long_word_text = " ".join(["word"] * 30)
    assert all(len(p) <= 40 for p in bc.bounded(long_word_text, bounds))


def test_clean_removes_overstrike_and_extra_blank_lines(bc: ModuleType) -> None:
    assert bc.clean("b\x08bold  text\r\n\n\n\nnext\t line ") == "bold text\n\nnext line"


def test_mostly_english_rejects_lost_encodings_and_other_scripts(bc: ModuleType) -> None:
    assert bc.mostly_english("Plain English text with one café.")
    assert not bc.mostly_english("broken \ufffd text")
    assert not bc.mostly_english("中文邮件内容 some")
    assert bc.unescape("couldn\\u2019t") == "couldn\u2019t"


def test_jargon_entries_become_documents(bc: ModuleType) -> None:
    text = (
        "Table of Contents\n\nfoo\n\nbar\n\n"
        "This introduction has enough words to be kept as prose.\n\n"
        "   :foo: n.\n\n   A metasyntactic variable.\n\n"
        "   :bar: n.\n\n   Another one, see {foo}.\n"
    )
    docs = list(bc.jargon_documents(text, max_chars=2000))
    assert docs == [
        ":foo: n.\n\nA metasyntactic variable.",
        ":bar: n.\n\nAnother one, see {foo}.",
        "This introduction has enough words to be kept as prose.",
    ]
