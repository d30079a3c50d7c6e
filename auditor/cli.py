"""Command-line entry point: ``auditor <command> ...``.

Each command group lives next to the code it drives and exposes
``register(subparsers)``; a registered handler takes the parsed arguments and
returns the process exit code. Errors a user can cause are
:class:`~auditor.errors.AuditorError` and print as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from auditor.errors import AuditorError

# Modules that contribute sub-commands, imported lazily so `auditor --help`
# stays fast and no command pays for another's imports.
_COMMAND_MODULES = (
    "auditor._cli_audit",
    "auditor.policy.cli",
    "auditor.features.cli",
    "auditor.train.cli",
    "auditor.server.cli",
    "auditor.steering.cli",
    "auditor.features.discover_cli",
    "auditor.viewer.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auditor",
        description="Audit a language model through sparse-autoencoder features.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class _StderrLines(logging.Handler):
    """``warning: message`` on the current ``sys.stderr`` (looked up per record, as tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)
        except Exception:  # logging's own rule: a failing handler must not fail the program
            self.handleError(record)


@contextlib.contextmanager
def _package_warnings_on_stderr(command: str) -> Iterator[None]:
    """While a command runs, the package's logged warnings (a library written for another
    model, ...) print like its errors; ``serve`` configures logging itself."""
    if command == "serve":
        yield
        return
    logger = logging.getLogger("auditor")
    handler = _StderrLines(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    # Weight-loading progress bars from transformers / huggingface_hub would
    # bury the command's own output; the caller can still turn them back on.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _package_warnings_on_stderr(args.command):
            return int(args.func(args))
    except AuditorError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
