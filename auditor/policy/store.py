"""The loaded policy set, swapped atomically on reload.

A :class:`PolicyStore` holds one :class:`~auditor.policy.engine.PolicyEngine`
per policy name. ``reload()`` builds a complete new set first and swaps it in
with one reference assignment; when any file fails, the previous set stays in
service, the problems are kept in ``last_error`` and counted as a failure (an
unexpected exception while loading a file fails the reload the same way: the
watcher and the metrics must see it, and ``reload()`` never raises). The
store has no metrics dependency: the server reads :meth:`PolicyStore.status`
(the set in service and the reloads' outcome as one consistent record) or
registers ``on_reload`` listeners, which are called in the order of the reloads.

Example::

    store = PolicyStore(["policies/"], default="default")
    verdicts = store.current().evaluate(batch)
    store.watch(2.0)          # poll file mtimes; reload on change
    ...
    store.stop()
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from auditor.errors import AuditorError, PolicyError, PolicyErrors
from auditor.policy.engine import PolicyEngine, load_policy

__all__ = ["PolicyStore", "ReloadResult", "StoreStatus", "policy_files"]

_SUFFIXES = (".yaml", ".yml")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadResult:
    """What one reload did."""

    ok: bool
    """True when the new set was swapped in."""
    errors: list[PolicyError] = field(default_factory=list)
    """Every problem found (empty when ok)."""
    hash: str = ""
    """Hash of the set in service after the reload (the old one when it failed)."""
    changed: bool = False
    """True when the set in service changed (ok and a different hash)."""
    names: tuple[str, ...] = ()
    """Names of the policies of that set (``hash``'s)."""


@dataclass(frozen=True)
class StoreStatus:
    """The set in service and the reloads' outcome, as of one moment (:meth:`PolicyStore.status`)."""

    engines: Mapping[str, PolicyEngine]
    """Name -> engine of the set in service."""
    hash: str
    """Its hash."""
    default: str | None
    """The policy of requests that name none."""
    reloads: Mapping[str, int]
    """Reload attempts by result (``success``, ``failure``); the initial load counts."""
    last_reload_ok: bool
    """Whether the latest reload succeeded."""
    last_error: PolicyErrors | None
    """The latest reload's problems when it failed, else None."""


def policy_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and folders (``*.yaml`` / ``*.yml`` directly inside, sorted) into policy files.

    Raises :class:`PolicyErrors` naming a folder that cannot be listed (no permission, or gone
    while it was read).
    """
    files, problems = _expand(paths)
    if problems:
        raise PolicyErrors(problems)
    return files


def _expand(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[PolicyError]]:
    """:func:`policy_files`, with the folders that cannot be listed as problems instead of raising."""
    out: list[Path] = []
    problems: list[PolicyError] = []
    for p in paths:
        path = Path(p)
        try:
            if path.is_dir():
                out.extend(sorted(f for f in path.iterdir() if f.suffix in _SUFFIXES and f.is_file()))
            else:
                out.append(path)
        except OSError as exc:
            problems.append(
                PolicyError(str(path), None, None, f"cannot list the policy folder: {exc.strerror or exc}; check that it exists and is readable")
            )
    return list(dict.fromkeys(out)), problems


def set_hash(engines: Mapping[str, PolicyEngine]) -> str:
    """sha256 over the (name, engine hash) pairs of a policy set, in name order."""
    h = hashlib.sha256()
    for name in sorted(engines):
        h.update(f"{name}\0{engines[name].hash}\n".encode())
    return h.hexdigest()


class PolicyStore:
    """Policies loaded from files and folders; thread-safe atomic reload.

    ``paths``: policy files and/or folders of ``*.yaml``. ``default``: the policy
    name ``current()`` returns when asked for none (else a policy called
    ``default``, else the first one loaded). ``check(engine)`` is called on every
    loaded engine before a swap and raises :class:`AuditorError` when the engine
    cannot serve (a server checks it fits its SAE); the reload then fails like an
    invalid file. The constructor loads the set and raises :class:`PolicyErrors`
    when it is invalid (there is nothing to keep).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        default: str | None = None,
        search_dirs: Sequence[str | os.PathLike[str]] | None = None,
        env: Mapping[str, str] | None = None,
        check: Callable[[PolicyEngine], None] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self._default = default
        self.check = check
        """Per-engine check run before every swap (may be set after construction)."""
        self._search_dirs = search_dirs
        self._env = env
        self._reload_lock = threading.Lock()  # one reload at a time; readers never take it
        # Listeners run outside the reload lock (a slow one does not hold the next reload up), in
        # the reloads' order: a reload queues its result under the reload lock, lets it go, then
        # takes the notify lock and hears out everything queued (its own result, and any queued
        # before it). A reload never waits for the notify lock while it holds the reload lock: a
        # listener that reloads would wait for the reload lock there, and neither would go on.
        self._notify_lock = threading.Lock()
        self._pending: deque[tuple[ReloadResult, list[Callable[[ReloadResult], None]]]] = deque()
        self._notifier: int | None = None  # the thread hearing out the queue, while it does
        self._status: StoreStatus | None = None  # replaced whole by each reload: readers see one reload's view
        self._listeners: list[Callable[[ReloadResult], None]] = []
        self._mtimes: dict[Path, tuple[int, int] | None] = {}
        self._unreadable: set[str] = set()  # policy folders the latest reload could not list
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        result = self.reload()
        if not result.ok:
            raise PolicyErrors(result.errors)

    # ------------------------------------------------------------ reading

    def _snap(self) -> StoreStatus:
        return self.status()

    @property
    def reloads(self) -> Mapping[str, int]:
        """Reload attempts by result (the initial load counts)."""
        return self.status().reloads

    @property
    def last_error(self) -> PolicyErrors | None:
        """Problems of the latest failed reload; None after a successful one."""
        return self.status().last_error

    @property
    def last_reload_ok(self) -> bool:
        """Whether the latest reload succeeded."""
        return self.status().last_reload_ok

    @property
    def hash(self) -> str:
        """Hash of the policy set in service."""
        return self._snap().hash

    @property
    def engines(self) -> Mapping[str, PolicyEngine]:
        """Read-only name -> engine mapping of the set in service (one consistent snapshot)."""
        return self._snap().engines

    @property
    def names(self) -> list[str]:
        """Names of the loaded policies."""
        return list(self._snap().engines)

    def current(self, name: str | None = None) -> PolicyEngine:
        """The engine called ``name`` (or the default one) from the set in service."""
        snap = self._snap()
        key = name if name is not None else snap.default
        engine = snap.engines.get(key) if key is not None else None
        if engine is None:
            raise AuditorError(f"unknown policy {key!r}; loaded policies: {', '.join(snap.engines) or 'none'}")
        return engine

    def status(self) -> StoreStatus:
        """The set in service with the reloads' counts and the latest one's outcome, all as of the
        same reload (reading ``engines``, ``hash`` and ``last_error`` one by one may straddle one)."""
        status = self._status
        if status is None:  # only during a failed construction
            raise AuditorError("no policies are loaded")
        return status

    def on_reload(self, callback: Callable[[ReloadResult], None]) -> None:
        """Call ``callback(result)`` after every reload attempt, in the order of the reloads;
        :meth:`status` then reads as of that reload or a later one. It is called from a reloading
        thread: the reload's own, or that of a reload before it whose listeners were still running
        (a reload returns once its listeners ran, except one made from a listener, whose listeners
        run after the current listeners finish)."""
        self._listeners.append(callback)

    # ------------------------------------------------------------ reloading

    def reload(self) -> ReloadResult:
        """Load every file into a new set and swap it in; on any problem keep the current set."""
        with self._reload_lock:
            files, unreadable = _expand(self.paths)
            # Stat'ed before anything is read: a file rewritten while this reload reads the set
            # keeps its earlier stat, so the next check sees the change (stat'ing after loading
            # recorded the new write as seen while the set held the old content).
            before = {p: _stat(p) for p in {*files, *self._mtimes}}
            errors: list[PolicyError] = list(unreadable)
            self._unreadable = {e.path for e in unreadable}
            engines: dict[str, PolicyEngine] = {}
            sources: set[Path] = set()
            if not files and not unreadable:
                errors.append(
                    PolicyError(", ".join(map(str, self.paths)) or "<none>", None, None, "no policy files found")
                )
            for f in files:
                try:
                    engine = load_policy(f, search_dirs=self._search_dirs, env=self._env)
                except PolicyErrors as exc:
                    errors.extend(exc.errors)
                    continue
                except AuditorError as exc:
                    errors.append(PolicyError(str(f), None, None, exc.message))
                    continue
                except Exception as exc:  # a bug must fail this reload like a bad file, not escape it
                    errors.append(_unexpected(f, "loading", exc))
                    continue
                sources.update(engine.sources)
                if self.check is not None:
                    try:
                        self.check(engine)
                    except AuditorError as exc:
                        errors.append(PolicyError(str(f), None, None, exc.message))
                        continue
                    except Exception as exc:
                        errors.append(_unexpected(f, "checking", exc))
                        continue
                if engine.name in engines:
                    errors.append(
                        PolicyError(
                            str(f),
                            None,
                            None,
                            f"policy name {engine.name!r} is also used by {engines[engine.name].path}; "
                            "loaded policies need distinct metadata.name",
                        )
                    )
                    continue
                engines[engine.name] = engine
            sources.update(files)
            self._mtimes = {p: before[p] if p in before else _stat(p) for p in sources}
            default = self._default
            if not errors and default is not None and default not in engines:
                errors.append(
                    PolicyError(
                        ", ".join(str(p) for p in self.paths),
                        None,
                        None,
                        f"default policy {default!r} is not among the loaded policies ({', '.join(engines)}); "
                        "restore its file or change --default-policy",
                    )
                )
            old = self._status
            counts = dict(old.reloads) if old is not None else {"success": 0, "failure": 0}
            if errors:
                counts["failure"] += 1
                if old is not None:  # else the constructor raises
                    self._status = replace(
                        old, reloads=MappingProxyType(counts), last_reload_ok=False, last_error=PolicyErrors(errors)
                    )
                result = ReloadResult(
                    ok=False, errors=errors, hash=old.hash if old is not None else "",
                    names=tuple(old.engines) if old is not None else (),
                )
            else:
                if default is None:
                    default = "default" if "default" in engines else next(iter(engines))
                    if old is not None and old.default != default:
                        # With no default named, deleting or renaming the default file moves every
                        # request that names no policy to another one: say so.
                        _log.warning(
                            "requests that name no policy now use policy %r (was %r); name one with "
                            "--default-policy to keep it",
                            default,
                            old.default,
                        )
                counts["success"] += 1
                new = StoreStatus(MappingProxyType(engines), set_hash(engines), default, MappingProxyType(counts), True, None)
                self._status = new  # the swap: one reference assignment, readers see old or new
                result = ReloadResult(
                    ok=True, hash=new.hash, changed=old is None or old.hash != new.hash, names=tuple(new.engines)
                )
            self._pending.append((result, list(self._listeners)))
        self._notify()
        return result

    def _notify(self) -> None:
        """Call the listeners of every queued reload, in the reloads' order."""
        me = threading.get_ident()
        if self._notifier == me:
            # A listener reloaded: this thread's loop below is hearing the queue out, and calls the
            # listeners of this reload after those of the reloads before it (not in the middle).
            return
        with self._notify_lock:
            self._notifier = me
            try:
                while self._pending:
                    result, listeners = self._pending.popleft()
                    for callback in listeners:
                        try:
                            callback(result)
                        except Exception:  # a broken listener must not break reloading
                            _log.exception("policy reload listener %r failed", callback)
            finally:
                self._notifier = None

    def changed_files(self) -> list[Path]:
        """Files (policies, libraries, probes, new files in watched folders) changed since the last reload."""
        files, unreadable = _expand(self.paths)
        changed = [p for p, st in self._mtimes.items() if _stat(p) != st]
        changed.extend(p for p in files if p not in self._mtimes)
        # A folder that became unreadable, or readable again, is a change (the reload records it);
        # one that stays unreadable is not reloaded again on every poll.
        now = {e.path for e in unreadable}
        changed.extend(Path(p) for p in now ^ self._unreadable)
        return sorted(set(changed))

    def check_for_changes(self) -> ReloadResult | None:
        """Reload when a source file changed; None when nothing changed."""
        return self.reload() if self.changed_files() else None

    def watch(self, interval_s: float = 2.0) -> None:
        """Poll for changes every ``interval_s`` seconds in a daemon thread (until :meth:`stop`)."""
        if interval_s <= 0:
            raise AuditorError(f"watch interval must be > 0 seconds, got {interval_s}")
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.check_for_changes()
                except Exception:  # keep watching: the set in service is untouched
                    _log.exception("policy reload failed unexpectedly")

        self._thread = threading.Thread(target=loop, name="policy-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watch thread (no-op when not watching)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()


def _unexpected(path: Path, doing: str, exc: Exception) -> PolicyError:
    """A failure that is not an :class:`AuditorError` (a bug): logged with its traceback, reported like a bad file."""
    _log.error("unexpected error while %s policy %s", doing, path, exc_info=exc)
    return PolicyError(
        str(path),
        None,
        None,
        f"unexpected error while {doing} the policy: {type(exc).__name__}: {exc} "
        "(a bug in the auditor; the log has its traceback)",
    )


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size
