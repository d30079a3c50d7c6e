"""Sidecar settings: command-line flags > environment (``AUDITOR_*``) > YAML config file > defaults.

:meth:`Settings.load` merges the layers and validates once; the error names
the setting and where its value came from. The environment is passed in (the
CLI passes ``os.environ``), so tests never touch the process environment.

Nested values come from the environment with ``__`` between levels
(``AUDITOR_ALERTS__TEXT_MODE=store``); lists and objects as JSON
(``AUDITOR_POLICIES='["policies/"]'``).

Example::

    settings = Settings.load(flags={"port": 9000}, env=os.environ, config_file="auditor.yaml")
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from auditor.alerts import AlertsConfig
from auditor.errors import ConfigError, ModelError
from auditor.features.yamlsource import SourceMap, parse_yaml
from auditor.models.loading import ModelDType, parse_device

__all__ = ["Settings", "ENV_PREFIX", "default_data_dir"]

_log = logging.getLogger("auditor.server")
ENV_PREFIX = "AUDITOR_"


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/sae-auditor``, else ``~/.local/share/sae-auditor``."""
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sae-auditor"


class Settings(BaseSettings):
    """Everything ``auditor serve`` can be told; one field per flag, ``AUDITOR_<FIELD>`` and YAML key."""

    model_config = SettingsConfigDict(extra="forbid", env_prefix=ENV_PREFIX, validate_default=True)

    # -- listening
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(default=8080, ge=0, le=65535)
    """TCP port (0 picks a free one)."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Log level of the server and uvicorn."""

    # -- what to load
    model: str | None = None
    """Model id, folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)."""
    sae: str | None = None
    """SAE folder, file, hf:// URI or release id (default: the library's SAE)."""
    sae_format: str | None = None
    """Force the SAE format instead of detecting it."""
    library: str | None = None
    """Feature library path or id (default: the first policy's library, else the default library)."""
    hookpoint: str | None = None
    """Override the SAE's hookpoint."""
    device: str = "cpu"
    """Torch device."""
    dtype: ModelDType | None = None
    """The model's dtype (default: float32 on the CPU, bfloat16 on a GPU). bfloat16 on a CPU with AMX is
    several times faster; verdicts can differ near thresholds (``benchmarks/dtype_agreement.py``)."""
    compile: bool = False
    """``torch.compile`` the model's decoder layers and, on a GPU, the policies' evaluation programs (for
    GPUs; the first forward of each shape, and the first evaluations of each policy, compile)."""
    cuda_graphs: bool = True
    """On a GPU, replay the steering hook's decode step (measure, record, steer, and the decision of
    rules that steer) as one captured CUDA graph while generating, and policy evaluations of batch
    shapes that recur as CUDA graphs; off runs every step and evaluation eagerly."""
    gc_freeze: bool = True
    """Once loaded, the ``auditor serve`` process moves everything then alive (model, tokenizer,
    libraries: hundreds of thousands of objects) into Python's permanent generation
    (``gc.freeze``), so its full garbage collections walk only what requests create: the longest
    took 279 ms with the model's objects in them, 8.5-22 ms without (``benchmarks/audit_pipeline.py``
    on an H100, 8B shape). Objects frozen are not reclaimed if they later form garbage cycles; the
    sidecar's startup state lives as long as the process, except the policies, which hold no
    cycle: a reload frees the engines it replaced once nothing uses them. With ``compile`` an
    engine's compiled program refers back to it, so the first successful reload unfreezes the
    heap (the engines it replaced, and their device memory, go with the next full collection).
    An app built with ``create_app`` in your own process leaves your heap alone."""
    policies: list[str] = Field(default_factory=list)
    """Policy files and folders; empty loads ``policies/default.yaml`` when it exists."""
    default_policy: str | None = None
    """Policy used when a request names none (default: one called ``default``, else the first)."""
    policy_watch_s: float = Field(default=0.0, ge=0.0)
    """Poll policy files for changes this often and reload (0: only on ``POST /v1/policies/reload``)."""

    # -- proxy / serve
    upstream: str | None = None
    """OpenAI-compatible server to proxy ``/v1/chat/completions`` and ``/v1/completions`` to
    (e.g. ``http://127.0.0.1:8000``); without it the sidecar's own model answers."""
    upstream_api_key: SecretStr | None = None
    """Bearer token sent to the upstream (the client's own ``Authorization`` is forwarded otherwise)."""
    upstream_timeout_s: float = Field(default=120.0, gt=0)
    """Timeout of one upstream request."""
    stream_mode: Literal["hold", "chunked"] = "hold"
    """Streaming completions: ``hold`` buffers the whole completion and audits it before releasing
    anything; ``chunked`` audits and releases every ``stream_chunk_chars`` characters."""
    stream_chunk_chars: int = Field(default=256, ge=1)
    """Characters of new completion text per audit in ``chunked`` stream mode."""
    fail_mode: Literal["open", "closed"] = "closed"
    """When the auditor itself fails (timeout, overload, internal error) on a proxied request:
    ``closed`` answers 503 ``auditor_error``; ``open`` lets the request through unaudited."""
    max_generate_tokens: int = Field(default=256, ge=1)
    """Most tokens the sidecar's own model generates per request."""

    # -- limits and batching
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest request body; larger ones get 413."""
    max_tokens: int = Field(default=2048, ge=2)
    """Most tokens per audited input; longer ones get 413."""
    batch_max_wait_ms: float = Field(default=20.0, ge=0.0)
    """How long the batcher waits for more requests before running a forward."""
    batch_max_tokens: int = Field(default=8192, ge=2)
    """Most tokens per micro-batched forward."""
    model_workers: int | None = Field(default=None, ge=1, le=64)
    """Threads that run audits and generation at the same time on the one loaded model, each with
    an even share of torch's CPU threads (default: 2 on a CPU with 2+ cores, 1 on a GPU)."""
    queue_size: int = Field(default=256, ge=1)
    """Audit requests that may wait for the model; beyond it requests get 503 + Retry-After."""
    request_timeout_s: float = Field(default=30.0, gt=0)
    """Longest an audit may take (queue wait included) before it fails with a timeout."""
    explain_top_k: int = Field(default=5, ge=1, le=64)
    """Features per token returned when ``/v1/audit`` is asked to ``explain``."""
    viewer_index: Path | None = None
    """Feature index the ``/ui/`` pages read (default: ``feature_index.safetensors`` beside the library)."""

    # -- auth
    api_token: SecretStr | None = None
    """Bearer token required on mutating routes (reload, validate, generate with steering)."""
    auth_all_routes: bool = False
    """Require the token on every route except ``/healthz`` and ``/readyz``."""

    # -- alerts
    data_dir: Path | None = None
    """Where the audit log lives (default ``$XDG_DATA_HOME/sae-auditor``)."""
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    """Audit log and alert sinks; a relative ``log_path`` is under ``data_dir``."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        # Spelling checked with the other settings; whether this host can use it is checked by
        # `auditor serve` and the runtime's load (commands that only read the audit log run no model).
        try:
            parse_device(value, usable=False)
        except ModelError as exc:
            raise ValueError(exc.message) from None
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.api_token is not None:
            token = self.api_token.get_secret_value()
            if not token.strip():
                # An empty secret (say an unpopulated Kubernetes secret) would let "Bearer " through
                # and sign viewer sessions with an empty key.
                raise ValueError("api_token (AUDITOR_API_TOKEN) is empty; set a secret, or unset it to run without auth")
            if token != token.strip():
                raise ValueError(
                    "api_token (AUDITOR_API_TOKEN) starts or ends with whitespace (a trailing newline from a "
                    "file?), which no Authorization header can carry; strip it"
                )
        if self.auth_all_routes and self.api_token is None:
            raise ValueError("auth_all_routes needs api_token (AUDITOR_API_TOKEN) to be set")
        return self

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL such as http://127.0.0.1:8000, got {value!r}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Layers are merged by `load` from an environment the caller passes; the
        # constructor itself never reads the process environment.
        return (init_settings,)

    @classmethod
    def load(
        cls,
        *,
        flags: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        config_file: str | os.PathLike[str] | None = None,
        flag_names: Mapping[str, str] | None = None,
    ) -> Settings:
        """Merge defaults < YAML file < environment < flags and validate.

        ``config_file`` falls back to ``AUDITOR_CONFIG`` in ``env``. Flags whose
        value is None are treated as not given. ``flag_names``: setting -> the flag as spelt
        on the command line (``policies`` -> ``--policy``), for errors.
        """
        env = {} if env is None else env
        origin: dict[str, str] = {}
        merged: dict[str, Any] = {}
        path = config_file or env.get(f"{ENV_PREFIX}CONFIG")
        in_file: _YamlFile | None = None
        if path:
            in_file = _read_yaml(Path(path))
            for key, value in in_file.values.items():
                merged[key] = value
                origin[key] = f"config file {path}"
        _warn_unknown_env(cls, env)
        env_values = _env_values(cls, env)
        for key, value in env_values.items():
            merged[key] = _deep_merge(merged.get(key), value)
            origin[key] = f"environment {ENV_PREFIX}{key.upper()}"
        for key, value in (flags or {}).items():
            if value is None:
                continue
            merged[key] = value
            origin[key] = f"flag {(flag_names or {}).get(key) or '--' + key.replace('_', '-')}"
        try:
            return cls(**merged)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, origin, in_file, {k.upper() for k in env})) from None

    def resolved_data_dir(self, env: Mapping[str, str] | None = None) -> Path:
        """``data_dir`` or the default one."""
        return self.data_dir if self.data_dir is not None else default_data_dir(env)

    def alerts_config(self, env: Mapping[str, str] | None = None) -> AlertsConfig:
        """The alerts configuration with ``log_path`` placed under the data dir when relative."""
        log_path = self.alerts.log_path
        if not log_path.is_absolute():
            log_path = self.resolved_data_dir(env) / log_path
        return self.alerts.model_copy(update={"log_path": log_path})


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment parsing, reading a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._given = dict(env)
        super().__init__(settings_cls, env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._given, False, False, None)


# AUDITOR_* variables that are not settings: read elsewhere (the config file's path, the model
# cache, library search paths) or by the setup and image builds.
_OTHER_ENV = frozenset({"CONFIG", "CACHE_DIR", "LIBRARY_PATH", "TORCH", "TORCH_INDEX_URL", "BASE_IMAGE", "IMAGE"})


def _closest_setting(name: str) -> str | None:
    """The setting a misspelt ``name`` most likely meant, if any is close."""
    close = difflib.get_close_matches(name, list(Settings.model_fields), n=1, cutoff=0.7)
    return close[0] if close else None


def _warn_unknown_env(cls: type[Settings], env: Mapping[str, str]) -> None:
    """Say which AUDITOR_* variables are not settings (a misspelt one is otherwise ignored in
    silence, where the config file refuses the same typo)."""
    for key in env:
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        name = upper[len(ENV_PREFIX) :]
        if name in _OTHER_ENV or name.split("__")[0].lower() in cls.model_fields:
            continue
        close = _closest_setting(name.lower())
        hint = f"; did you mean {ENV_PREFIX}{close.upper()}?" if close else ""
        _log.warning("environment variable %s is not a setting and is ignored%s", key, hint)


def _env_values(cls: type[Settings], env: Mapping[str, str]) -> dict[str, Any]:
    try:
        return dict(_MappingEnvSource(cls, env)())
    except Exception as exc:  # pydantic-settings raises SettingsError on malformed JSON values
        found = re.search(r'field "(\w+)"', str(exc))
        if found is None:
            raise ConfigError(f"invalid {ENV_PREFIX}* environment variable: {exc}") from None
        field = found.group(1)
        name = f"{ENV_PREFIX}{field.upper()}"
        given = next((v for k, v in env.items() if k.upper() == name), None)
        info = cls.model_fields.get(field)
        is_list = info is not None and "list" in str(info.annotation).lower()
        kind, example = ("a list", '\'["first", "second"]\'') if is_list else ("a mapping", '\'{"key": 1}\'')
        raise ConfigError(
            f"invalid {name}={given!r}: setting {field} is {kind}, which an environment variable gives "
            f"as JSON, e.g. {name}={example}"
            + (f" (or {name}__KEY=value for one key)" if not is_list else "")
        ) from None


@dataclass
class _YamlFile:
    """A config file's settings (dashes in keys read as underscores) and where each one was written."""

    path: Path
    raw: dict[Any, Any]
    source: SourceMap
    spelling: dict[str, Any]
    """Setting name -> the key as written in the file."""

    @property
    def values(self) -> dict[str, Any]:
        """Setting name -> value."""
        return {name: self.raw[key] for name, key in self.spelling.items()}

    def position(self, loc: tuple[Any, ...], *, key: bool = False) -> str | None:
        """``FILE:LINE:COLUMN`` of the value at pydantic ``loc`` (its first item a setting name), or of
        its key (``key``: for an unknown setting)."""
        if not loc or loc[0] not in self.spelling:
            return None
        pos = self.source.locate(self.raw, (self.spelling[loc[0]], *loc[1:]), prefer_key=key)
        return f"{self.path}:{pos[0]}:{pos[1]}" if pos is not None else None


def _read_yaml(path: Path) -> _YamlFile:
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; --config (or {ENV_PREFIX}CONFIG) takes a YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (--config / {ENV_PREFIX}CONFIG)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the config file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    data, source, problems = parse_yaml(text)
    if problems:
        first = problems[0]
        where = f"{path}:{first.line}:{first.column}" if first.line is not None else str(path)
        raise ConfigError(f"{where}: {first.message}")
    if data is None:
        return _YamlFile(path, {}, source, {})
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config file must be a mapping of setting names to values")
    return _YamlFile(path, data, source, {str(k).replace("-", "_"): k for k in data})


def _deep_merge(base: Any, top: Any) -> Any:
    if isinstance(base, dict) and isinstance(top, dict):
        out = dict(base)
        for key, value in top.items():
            out[key] = _deep_merge(out.get(key), value)
        return out
    return top


def _describe(
    exc: ValidationError, origin: Mapping[str, str], in_file: _YamlFile | None = None, env_names: set[str] | None = None
) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        where = origin.get(str(err["loc"][0])) if err["loc"] else None
        if where is not None and where.startswith("environment") and len(err["loc"]) > 1:
            # A nested setting: the variable that set it (AUDITOR_ALERTS__COOLDOWN_S), else the
            # whole-object variable, else the config file the environment merged into.
            names = env_names or set()
            parts = [str(part).upper() for part in err["loc"]]
            setters = [ENV_PREFIX + "__".join(parts[:n]) for n in range(len(parts), 0, -1)]
            setter = next((name for name in setters if name in names), None)
            if setter is not None:
                where = f"environment {setter}"
            elif in_file is not None:
                where = "config file"
        if where is not None and where.startswith("config file") and in_file is not None:
            # Say where in the file (a value from the environment or a flag has no line).
            unknown = err["type"] == "extra_forbidden"
            where = f"config file {in_file.position(tuple(err['loc']), key=unknown) or in_file.path}"
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own words
        if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            close = _closest_setting(str(err["loc"][0]))
            hint = f"did you mean {close!r}? " if close else ""
            msg = f"unknown setting; {hint}known: {', '.join(sorted(Settings.model_fields))}"
        if not err["loc"]:  # a check across settings names them itself
            lines.append(msg)
            continue
        lines.append(f"setting {loc}: {msg}" + (f" (from {where})" if where else ""))
    return "invalid settings:\n  " + "\n  ".join(lines)
