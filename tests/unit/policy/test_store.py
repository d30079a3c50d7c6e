"""PolicyStore: atomic reload, keeping the last good set, counters, watching, concurrent readers."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from auditor.errors import AuditorError, PolicyErrors
from auditor.policy.engine import AuditBatch
from auditor.policy.store import PolicyStore, ReloadResult, set_hash

LIBRARY = {
    "apiVersion": "auditor/v1",
    "kind": "FeatureLibrary",
    "id": "store-lib",
    "sae": {"id": "s", "model": "m", "hookpoint": "blocks.0.hook_resid_post"},
    "features": [
        {"name": "a.one", "index": 2, "category": "alpha"},
        {"name": "b.two", "index": 5, "category": "beta"},
    ],
}


def policy_text(name: str, threshold: float, feature: str = "a.one") -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "auditor/v1",
            "kind": "Policy",
            "metadata": {"name": name},
            "library": "lib/library.yaml",
            "rules": [
                {"id": "r", "severity": "high", "category": "alpha", "condition": {"feature": feature, "threshold": threshold}}
            ],
        },
        sort_keys=False,
    )


def write(path: Path, text: str) -> None:
    """Write and move the mtime forward, so a change is visible even on coarse clocks."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    st = path.stat()
    if st.st_mtime_ns <= before:
        os.utime(path, ns=(st.st_atime_ns, before + 1_000_000))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "library.yaml").write_text(yaml.safe_dump(LIBRARY))
    write(tmp_path / "default.yaml", policy_text("default", 1.0))
    write(tmp_path / "other.yaml", policy_text("other", 2.0, "b.two"))
    return tmp_path


def test_loads_a_folder_and_picks_the_default(folder: Path) -> None:
    store = PolicyStore([folder])
    assert store.names == ["default", "other"]
    assert store.current().name == "default" and store.current("other").name == "other"
    assert store.reloads == {"success": 1, "failure": 0} and store.last_error is None
    assert store.hash == set_hash(store.engines)
    assert PolicyStore([folder], default="other").current().name == "other"
    with pytest.raises(AuditorError, match="unknown policy 'nope'; loaded policies: default, other"):
        store.current("nope")


def test_losing_the_default_file_says_where_unnamed_requests_go(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    store = PolicyStore([folder])
    (folder / "default.yaml").unlink()
    assert store.reload().ok and store.current().name == "other"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("requests that name no policy now use policy 'other' (was 'default')" in m for m in warned), warned
    write(folder / "third.yaml", policy_text("third", 3.0))
    named = PolicyStore([folder], default="other")
    (folder / "other.yaml").rename(folder / "renamed.yml.bak")
    result = named.reload()
    assert not result.ok and "restore its file or change --default-policy" in result.errors[0].message
    assert result.errors[0].path == str(folder)


def test_valid_reload_swaps_and_changes_the_hash(folder: Path) -> None:
    store = PolicyStore([folder])
    seen: list[ReloadResult] = []
    store.on_reload(seen.append)
    old_hash, old_engine = store.hash, store.current()
    write(folder / "default.yaml", policy_text("default", 3.0))
    result = store.reload()
    assert result.ok and result.changed and result.hash == store.hash != old_hash
    assert store.current() is not old_engine
    assert store.current().compiled.leaf_threshold.tolist() == [3.0]
    assert store.current("other") is not None and seen == [result]
    again = store.reload()
    assert again.ok and not again.changed and again.hash == result.hash
    assert store.reloads == {"success": 3, "failure": 0}
    # A result names the policies of the set whose hash it gives.
    write(folder / "third.yaml", policy_text("third", 4.0))
    added = store.reload()
    assert added.ok and added.names == ("default", "other", "third") and result.names == ("default", "other")


def test_invalid_file_keeps_the_previous_set(folder: Path) -> None:
    store = PolicyStore([folder])
    old_hash, old_engines = store.hash, dict(store.engines)
    write(folder / "default.yaml", policy_text("default", 1.0).replace("severity: high", "severity: urgent"))
    result = store.reload()
    assert not result.ok and result.hash == old_hash and not result.changed
    assert store.hash == old_hash and dict(store.engines) == old_engines
    assert result.names == tuple(old_engines) == ("default", "other")  # the set that stays
    assert store.reloads == {"success": 1, "failure": 1} and not store.last_reload_ok
    (err,) = result.errors
    assert err.path.endswith("default.yaml") and err.line is not None and "severity" in err.message
    assert store.last_error is not None and store.last_error.errors == result.errors
    # Fixing the file recovers.
    write(folder / "default.yaml", policy_text("default", 1.5))
    assert store.reload().ok and store.last_error is None and store.reloads == {"success": 2, "failure": 1}


def test_a_failing_check_refuses_the_reload_and_keeps_the_set(folder: Path) -> None:
    """A server's check (the policy must fit its SAE) fails a reload like an invalid file."""
    from auditor.errors import ConfigError

    def fits_6_latents(engine: Any) -> None:
        if int(engine.watched.max()) >= 6:
            raise ConfigError(f"policy {engine.name!r} watches latent {int(engine.watched.max())}; the SAE has 6")

    store = PolicyStore([folder])
    store.check = fits_6_latents
    old_hash = store.hash
    lib = dict(LIBRARY, features=[*LIBRARY["features"], {"name": "c.far", "index": 9, "category": "gamma"}])
    (folder / "lib" / "library.yaml").write_text(yaml.safe_dump(lib))
    write(folder / "other.yaml", policy_text("other", 2.0, "c.far"))
    result = store.reload()
    assert not result.ok and store.hash == old_hash and store.reloads["failure"] == 1
    (err,) = result.errors
    assert err.path.endswith("other.yaml") and "watches latent 9" in err.message
    write(folder / "other.yaml", policy_text("other", 2.0, "b.two"))
    assert store.reload().ok


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda f: write(f / "dup.yaml", policy_text("other", 1.0)), "policy name 'other' is also used by"),
        (lambda f: write(f / "bad.yaml", "rules: [\n"), "bad.yaml"),
        (lambda f: write(f / "unknown.yaml", policy_text("x", 1.0, "a.onee")), "did you mean 'a.one'"),
    ],
)
def test_reload_failures_are_reported(folder: Path, setup: object, message: str) -> None:
    store = PolicyStore([folder])
    old = store.hash
    setup(folder)  # type: ignore[operator]
    result = store.reload()
    assert not result.ok and store.hash == old
    assert any(message in e.message for e in result.errors)


def test_a_control_character_fails_the_reload_and_keeps_the_set(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The hot reloader: a NUL in a policy is a failed reload (counted, reported, logged), never an exception."""
    import logging

    from prometheus_client import CollectorRegistry

    from auditor.metrics import AuditorMetrics
    from auditor.server.runtime import _on_reload

    store = PolicyStore([folder])
    registry = CollectorRegistry()
    metrics = AuditorMetrics(registry)
    seen: list[ReloadResult] = []
    store.on_reload(seen.append)
    store.on_reload(lambda result: _on_reload(metrics, store, result))
    old_hash, old_engines = store.hash, dict(store.engines)
    write(folder / "other.yaml", "\x00" + policy_text("other", 5.0, "b.two"))
    result = store.check_for_changes()
    assert result is not None and not result.ok and not result.changed and result.hash == old_hash
    assert store.hash == old_hash and dict(store.engines) == old_engines
    assert store.reloads == {"success": 1, "failure": 1} and not store.last_reload_ok
    assert [e.message for e in result.errors] == [
        f"{folder / 'other.yaml'}:1:1: control character U+0000 is not allowed in YAML; "
        "remove it or write it as the escape \\0 inside a double-quoted string"
    ]
    assert store.last_error is not None and store.last_error.errors == result.errors
    assert seen == [result]
    assert registry.get_sample_value("auditor_policy_reloads_total", {"result": "failure"}) == 1
    assert registry.get_sample_value("auditor_policy_last_reload_success") == 0
    assert store.check_for_changes() is None  # the failed file was seen; no reload loop until it changes
    refused = [r for r in caplog.records if r.levelno == logging.WARNING and "policy reload refused" in r.getMessage()]
    assert len(refused) == 1 and "other.yaml:1:1: control character U+0000" in refused[0].getMessage()
    write(folder / "other.yaml", policy_text("other", 5.0, "b.two"))
    caplog.set_level(logging.INFO, logger="auditor.server")
    assert store.reload().ok and registry.get_sample_value("auditor_policy_last_reload_success") == 1
    assert any("policies reloaded: " in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_an_unexpected_exception_fails_the_reload_instead_of_escaping(folder: Path) -> None:
    store = PolicyStore([folder])
    seen: list[ReloadResult] = []
    store.on_reload(seen.append)
    old_hash = store.hash

    def broken(engine: Any) -> None:
        raise RuntimeError("check crashed")

    store.check = broken
    result = store.reload()
    assert not result.ok and store.hash == old_hash and store.reloads == {"success": 1, "failure": 1}
    assert seen == [result] and len(result.errors) == 2
    assert result.errors[0].message == (
        f"{folder / 'default.yaml'}: unexpected error while checking the policy: RuntimeError: check crashed "
        "(a bug in the auditor; the log has its traceback)"
    )


def test_constructor_raises_when_nothing_valid(tmp_path: Path) -> None:
    with pytest.raises(PolicyErrors, match="no policy files found"):
        PolicyStore([tmp_path])
    with pytest.raises(PolicyErrors, match="default policy 'missing'"):
        (tmp_path / "lib").mkdir()
        (tmp_path / "lib" / "library.yaml").write_text(yaml.safe_dump(LIBRARY))
        write(tmp_path / "p.yaml", policy_text("p", 1.0))
        PolicyStore([tmp_path], default="missing")


def test_check_for_changes_sees_policies_libraries_and_new_files(folder: Path) -> None:
    store = PolicyStore([folder])
    assert store.check_for_changes() is None
    write(folder / "default.yaml", policy_text("default", 4.0))
    result = store.check_for_changes()
    assert result is not None and result.ok and result.changed
    assert store.check_for_changes() is None
    lib = yaml.safe_load((folder / "lib" / "library.yaml").read_text())
    lib["features"][0]["index"] = 9
    write(folder / "lib" / "library.yaml", yaml.safe_dump(lib))
    result = store.check_for_changes()
    assert result is not None and result.changed and store.current().watched.tolist() == [9]
    write(folder / "third.yaml", policy_text("third", 1.0))
    result = store.check_for_changes()
    assert result is not None and result.ok and "third" in store.names


def test_an_edit_written_while_a_reload_reads_the_files_is_not_lost(folder: Path) -> None:
    # A deploy writes several files one after another; the watcher's reload, started by the first,
    # has already read default.yaml when the next write replaces it. That write's mtime was
    # recorded as seen (the files were stat'ed after loading), so the edit was never loaded.
    store = PolicyStore([folder])
    edited: list[bool] = []

    def edit_during_reload(engine: Any) -> None:
        if engine.name == "other" and not edited:  # default.yaml (sorted first) is read by now
            write(folder / "default.yaml", policy_text("default", 9.0))
            edited.append(True)

    store.check = edit_during_reload
    write(folder / "default.yaml", policy_text("default", 4.0))
    first = store.check_for_changes()
    assert first is not None and first.ok and edited
    assert store.current().compiled.leaf_threshold.tolist() == [4.0]  # what that reload read
    again = store.check_for_changes()
    assert again is not None and again.ok and again.changed
    assert store.current().compiled.leaf_threshold.tolist() == [9.0]
    assert store.check_for_changes() is None


def test_watch_thread_reloads_and_stops(folder: Path) -> None:
    store = PolicyStore([folder])
    done = threading.Event()
    store.on_reload(lambda r: done.set())
    store.watch(0.02)
    try:
        write(folder / "other.yaml", policy_text("other", 7.0, "b.two"))
        assert done.wait(5.0)
        assert store.current("other").compiled.leaf_threshold.tolist() == [7.0]
    finally:
        store.stop()
    with pytest.raises(AuditorError, match="interval"):
        store.watch(0)


def test_concurrent_evaluation_never_sees_a_half_set(folder: Path) -> None:
    store = PolicyStore([folder])
    versions = {}
    for thr in (1.0, 5.0):
        write(folder / "default.yaml", policy_text("default", thr))
        write(folder / "other.yaml", policy_text("other", thr, "b.two"))
        assert store.reload().ok
        versions[store.hash] = thr
    stop = threading.Event()
    problems: list[str] = []
    checked = [0]

    def reader() -> None:
        batch = AuditBatch(torch.full((1, 3, 1), 3.0), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool))
        while not stop.is_set():
            engines = store.engines  # one snapshot
            h = set_hash(engines)
            thresholds = {e.compiled.leaf_threshold.item() for e in engines.values()}
            actions = {e.evaluate(batch)[0].action for e in engines.values()}
            if h not in versions or thresholds != {versions[h]} or len(actions) != 1:
                problems.append(f"mixed set: {h[:8]} {thresholds} {actions}")
            checked[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            thr = (1.0, 5.0)[i % 2]
            write(folder / "default.yaml", policy_text("default", thr))
            write(folder / "other.yaml", policy_text("other", thr, "b.two"))
            assert store.reload().ok
            time.sleep(0.002)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert problems == [] and checked[0] > 0


def test_status_is_one_reloads_view_and_listeners_hear_reloads_in_order(folder: Path) -> None:
    # Two threads reload while a third rewrites a file between a valid and a broken version, and a
    # slow listener records what it hears. Every status read is one reload's: the hash is its
    # set's, the outcome and the problems agree, the counts never go back; the listener hears every
    # reload, in order, so the last thing it heard is the outcome status reports.
    store = PolicyStore([folder])
    heard: list[tuple[bool, int]] = []

    def listener(result: ReloadResult) -> None:
        time.sleep(0.001 * (len(heard) % 3))  # slow, unevenly: reloads overtake each other otherwise
        heard.append((result.ok, sum(store.status().reloads.values())))

    store.on_reload(listener)
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def writer() -> None:
        i = 0
        while not stop.is_set():
            write(folder / "other.yaml", policy_text("other", 2.0 + i % 2, "b.two") if i % 3 else "kind: Polcy\n")
            i += 1
            time.sleep(0.001)

    def reloader() -> None:
        for _ in range(15):
            store.reload()

    def reader() -> None:
        last = 0
        while not stop.is_set():
            st = store.status()
            total = sum(st.reloads.values())
            if st.hash != set_hash(st.engines) or st.default not in st.engines:
                problems.append(f"mixed set: {st.hash[:8]}")
            if st.last_reload_ok != (st.last_error is None) or total < last:
                problems.append(f"mixed outcome: {st.last_reload_ok} {st.last_error} {dict(st.reloads)}")
            last = total
            reads[0] += 1

    others = [threading.Thread(target=writer), threading.Thread(target=reader)]
    reloaders = [threading.Thread(target=reloader) for _ in range(2)]
    for t in others + reloaders:
        t.start()
    for t in reloaders:
        t.join()
    stop.set()
    for t in others:
        t.join()
    st = store.status()
    assert problems == [] and reads[0] > 0
    assert sum(st.reloads.values()) == 31 and len(heard) == 30  # the initial load has no listener yet
    assert {ok for ok, _ in heard} == {True, False}  # the writer's broken version was seen, and the valid one
    assert heard[-1][0] == st.last_reload_ok
    assert all(total >= i + 2 for i, (_, total) in enumerate(heard))  # reload i + 1 (after the initial one) or a later one
    assert [total for _, total in heard] == sorted(total for _, total in heard)


def test_a_later_reloads_listeners_wait_for_an_earlier_ones(folder: Path) -> None:
    # The metrics listener sets "the latest reload succeeded": heard out of order, a refused edit
    # could read as taken. The first reload's listener is held; a second, failing reload meanwhile
    # swaps nothing and must not be heard before the first.
    store = PolicyStore([folder])
    gate, entered = threading.Event(), threading.Event()
    heard: list[bool] = []

    def listener(result: ReloadResult) -> None:
        if not entered.is_set():
            entered.set()
            assert gate.wait(10)
        heard.append(result.ok)

    store.on_reload(listener)
    first = threading.Thread(target=store.reload)
    first.start()
    assert entered.wait(10)
    write(folder / "other.yaml", "kind: Polcy\n")
    second = threading.Thread(target=store.reload)
    second.start()
    second.join(0.5)
    assert second.is_alive()  # its reload is done; its listeners wait their turn
    assert store.status().last_reload_ok is False and heard == []
    gate.set()
    first.join()
    second.join()
    assert heard == [True, False]


def test_a_listener_that_reloads_while_another_thread_reloads_does_not_deadlock(folder: Path) -> None:
    # The first reload's listener reloads (from its own thread) while a second thread's reload is
    # waiting its turn to notify. The waiting reload must not hold what the listener's reload needs.
    store = PolicyStore([folder])
    entered, go = threading.Event(), threading.Event()
    heard: list[str] = []

    def listener(result: ReloadResult) -> None:
        heard.append(threading.current_thread().name)
        if threading.current_thread().name == "first" and not entered.is_set():
            entered.set()
            assert go.wait(10)
            store.reload()  # a listener that reloads

    store.on_reload(listener)
    first = threading.Thread(target=store.reload, name="first", daemon=True)
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=store.reload, name="second", daemon=True)
    second.start()
    time.sleep(0.3)  # the second reload is done loading and waits to notify
    go.set()
    first.join(5)
    second.join(5)
    assert not first.is_alive() and not second.is_alive(), "deadlock: reload lock vs notify lock"
    assert len(heard) == 3 and sum(store.status().reloads.values()) == 4


def test_the_reload_log_names_the_policies_of_the_set_it_gives_the_hash_of(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A listener may hear a reload after a later one swapped another set in: the log line pairs
    # the result's hash with the result's policies, not with whatever set is in service by then.
    import logging

    from prometheus_client import CollectorRegistry

    from auditor.metrics import AuditorMetrics
    from auditor.server.runtime import _on_reload

    store = PolicyStore([folder])
    write(folder / "third.yaml", policy_text("third", 4.0))
    first = store.reload()
    (folder / "third.yaml").unlink()
    later = store.reload()
    assert first.names == ("default", "other", "third") and later.names == ("default", "other")
    caplog.set_level(logging.INFO, logger="auditor.server")
    _on_reload(AuditorMetrics(CollectorRegistry()), store, first)  # heard late
    (line,) = [r.getMessage() for r in caplog.records if "policies reloaded: " in r.getMessage()]
    assert line == f"policies reloaded: default, other, third (set {first.hash[:12]})"


def _unlistable_folder(tmp_path: Path) -> Path:
    """A folder that this process cannot list: mode 000 for a user, for root one that the kernel refuses to list."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0)
        return locked
    for candidate in (Path("/proc/1/map_files"),):  # needs CAP_SYS_ADMIN, which containers' root lacks
        try:
            os.listdir(candidate)
        except PermissionError:
            if candidate.is_dir():
                return candidate
        except OSError:
            pass
    pytest.skip("no folder here that this process cannot list")


def test_a_policy_folder_that_cannot_be_listed_fails_the_reload_and_keeps_the_set(folder: Path, tmp_path: Path) -> None:
    """A mounted folder swapped for one the sidecar cannot read: the reload fails with the folder
    named, the set in service stays, and the watcher does not reload it again on every poll."""
    extra = tmp_path / "extra"
    extra.mkdir()
    write(extra / "third.yaml", policy_text("third", 3.0).replace("lib/library.yaml", str(folder / "lib" / "library.yaml")))
    link = tmp_path / "mounted"
    link.symlink_to(extra)
    store = PolicyStore([folder, link])
    before = store.status()
    assert set(store.names) == {"default", "other", "third"} and store.changed_files() == []
    locked = _unlistable_folder(tmp_path)
    try:
        link.unlink()
        link.symlink_to(locked)
        assert link in store.changed_files()
        result = store.reload()
        assert not result.ok and result.hash == before.hash and result.names == tuple(before.engines)
        (err,) = result.errors
        assert err.path == str(link) and "cannot list the policy folder" in err.message and "readable" in err.message
        assert store.reloads == {"success": 1, "failure": 1} and store.last_error is not None
        assert store.changed_files() == []  # still unreadable: no reload on every poll
        with pytest.raises(PolicyErrors, match="cannot list the policy folder"):
            from auditor.policy.store import policy_files

            policy_files([link])
        # Readable again: a change, and the reload takes the set back.
        link.unlink()
        link.symlink_to(extra)
        assert link in store.changed_files()
        assert store.reload().ok and set(store.names) == {"default", "other", "third"} and store.changed_files() == []
    finally:
        if locked.parent == tmp_path:
            locked.chmod(0o700)
