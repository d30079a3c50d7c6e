"""The project's exceptions: one base class, subclasses that carry data.

Every error a user can cause (bad file, bad flag, bad request) is an
:class:`AuditorError`; the CLI prints ``error: <message>`` and exits non-zero,
the server answers with the message. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AuditorError",
    "ConfigError",
    "SAEFormatError",
    "UnknownKeyError",
    "ModelError",
    "HookpointError",
    "LibraryError",
    "LibraryFileError",
    "PolicyError",
    "PolicyErrors",
    "ProbeError",
    "AuditLogError",
]


class AuditorError(Exception):
    """Base class: a problem the user can fix, described in ``message``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(AuditorError):
    """A configuration value (flag, environment variable, config file) is invalid."""


class SAEFormatError(AuditorError):
    """An SAE file or folder could not be read as the format it claims to be."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


class UnknownKeyError(AuditorError):
    """A registry lookup failed; the message lists the known keys."""

    def __init__(self, kind: str, key: str, known: Iterable[str]) -> None:
        self.kind = kind
        self.key = key
        self.known = sorted(known)
        super().__init__(f"unknown {kind} {key!r}; known: {', '.join(self.known)}")


class ModelError(AuditorError):
    """The model could not be loaded or does not fit the SAE."""


class HookpointError(AuditorError):
    """A hookpoint name is malformed or out of range for the model."""


class LibraryError(AuditorError):
    """A feature library file is invalid."""


class PolicyError(AuditorError):
    """One problem in a policy file, located by file, line and column."""

    def __init__(
        self,
        path: str,
        line: int | None,
        column: int | None,
        message: str,
        rule: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.column = column
        self.rule = rule
        self.reason = message
        loc = path
        if line is not None:
            loc += f":{line}"
            if column is not None:
                loc += f":{column}"
        super().__init__(f"{loc}: {message}")


class PolicyErrors(AuditorError):
    """Several policy problems found in one pass (validation reports them all)."""

    def __init__(self, errors: list[PolicyError]) -> None:
        self.errors = errors
        super().__init__("\n".join(e.message for e in errors))


class ProbeError(AuditorError):
    """A probe file (a saved linear classifier) is missing, malformed or does not fit its inputs."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


class AuditLogError(AuditorError):
    """The audit log file cannot be used (newer schema, not an audit log) or a query is invalid."""


class LibraryFileError(LibraryError):
    """Problems in one feature library file, each located by 1-based line and column."""

    def __init__(self, path: str, problems: list[tuple[int | None, int | None, str]]) -> None:
        self.path = path
        self.problems = problems
        lines = []
        for line, column, message in problems:
            loc = path
            if line is not None:
                loc += f":{line}"
                if column is not None:
                    loc += f":{column}"
            lines.append(f"{loc}: {message}")
        super().__init__("\n".join(lines))


class SAESourceError(AuditorError):
    """An SAE location (hub repo, release, URL) could not be resolved to local files."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.reason = message


__all__.append("SAESourceError")


class SteeringError(AuditorError):
    """A steering request is malformed, names an unknown feature, or exceeds the configured limits."""


__all__.append("SteeringError")


class DatasetError(AuditorError):
    """A labelled data set (JSONL rows with id, category, text) is missing, malformed or unusable."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


__all__.append("DatasetError")


class FeatureIndexError(AuditorError):
    """A feature index file (``auditor index-features``) is missing, malformed or built for another SAE."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


__all__.append("FeatureIndexError")
