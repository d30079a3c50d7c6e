"""Files and folders the commands write (``-o``, ``--out``, ``--json``, ...), checked before they write.

A command checks its output paths first, before its (often slow) work, so a path that
names a folder, or sits below a file, fails at once with a sentence instead of a
traceback at the end. Writing through :func:`write_text` turns what the check cannot
foresee (no permission, a full disk) into the same kind of error.

Example::

    check_output_file(args.output)        # before the work: ConfigError if it cannot be a file
    ...
    write_text(args.output, text)         # parent folders made, OS errors as ConfigError
"""

from __future__ import annotations

import os
from pathlib import Path

from auditor.errors import ConfigError

__all__ = ["check_output_file", "check_output_folder", "output_file", "write_text"]


def check_output_file(path: str | os.PathLike[str]) -> Path:
    """``path`` if it can be written as a file; makes nothing (a check before a command's work).

    Raises :class:`ConfigError` when ``path`` is a folder or a file stands where one of its
    parent folders should be.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"cannot write {p}: it is a directory; give a file path")
    _check_ancestors(p.parent, p)
    return p


def output_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a file to (over)write: :func:`check_output_file`, then its missing parent folders made."""
    p = check_output_file(path)
    _make_folder(p.parent, p)
    return p


def check_output_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` if files can be written into it as a folder (existing or not); makes nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"cannot write into {p}: it is a file, not a folder; give a folder path")
    _check_ancestors(p, p)
    return p


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` after :func:`output_file`; an OS error becomes :class:`ConfigError`."""
    p = output_file(path)
    try:
        p.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {p}: {exc.strerror or exc}") from None
    return p


def _check_ancestors(folder: Path, target: Path) -> None:
    # The nearest existing ancestor must be a folder; mkdir's own error for a file in the
    # way (FileExistsError, NotADirectoryError) does not say which path is the file.
    for ancestor in (folder, *folder.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ConfigError(f"cannot write {target}: {ancestor} is a file, not a folder")
            return


def _make_folder(folder: Path, target: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: cannot make the folder {folder}: {exc.strerror or exc}") from None
