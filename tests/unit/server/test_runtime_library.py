"""The server and ``auditor audit`` pick the feature library by one rule (``resolve_library``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from auditor.errors import ConfigError
from auditor.features import load_library
from auditor.metrics import AuditorMetrics
from auditor.pipeline import resolve_library
from auditor.policy import load_policy
from auditor.server.runtime import load_runtime
from auditor.server.settings import Settings

REPO = Path(__file__).resolve().parents[3]
DEFAULT_POLICY = REPO / "policies" / "default.yaml"
TINY = REPO / "feature_libraries" / "examples" / "tiny" / "library.yaml"


def test_explicit_library_wins_when_it_describes_the_policys_sae() -> None:
    engine = load_policy(DEFAULT_POLICY)
    lib = load_library("smollm2-135m-instruct")
    assert resolve_library(lib, [engine], sae_given=False) is lib
    assert resolve_library(None, [engine], sae_given=False) is engine.library
    assert resolve_library(None, [], sae_given=True) is None
    assert resolve_library(None, [], sae_given=False).id == "smollm2-135m-instruct"  # the shipped default


def test_a_library_for_another_sae_than_the_policys_is_refused() -> None:
    engine = load_policy(DEFAULT_POLICY)
    with pytest.raises(ConfigError, match="describes SAE 'tiny-random-64', but policy 'default' was written for"):
        resolve_library(load_library(TINY), [engine], sae_given=False)


def test_the_server_refuses_the_mismatch_before_loading_the_model(tmp_path: Path) -> None:
    settings = Settings.load(
        flags={"policies": [str(DEFAULT_POLICY)], "library": str(TINY), "data_dir": str(tmp_path)}, env={}
    )
    with pytest.raises(ConfigError, match="drop --library to use the policy's"):
        load_runtime(settings, AuditorMetrics(CollectorRegistry()))


def test_a_runtime_loaded_on_a_callers_thread_leaves_its_torch_threads_alone(tmp_path: Path) -> None:
    import asyncio

    import torch

    from auditor.text import AuditInput

    before = torch.get_num_threads()
    settings = Settings.load(flags={"data_dir": str(tmp_path), "model_workers": 2}, env={})
    rt = load_runtime(settings, AuditorMetrics(CollectorRegistry()))

    async def scenario() -> list[object]:
        await rt.batcher.start()
        try:
            results, _ = await rt.audit([AuditInput(text="Send the wire transfer today.")])
            return results
        finally:
            await rt.close()

    assert torch.get_num_threads() == before  # the two workers' threads were set on the workers
    assert rt.batcher.workers.n == 2 and rt.batcher.workers.threads == max(1, before // 2)
    (result,) = asyncio.run(scenario())
    assert result.verdict is not None  # the default policy, through the batcher on a worker


def test_the_servers_cuda_graphs_setting_reaches_loaded_and_reloaded_engines(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "default.yaml").write_text(DEFAULT_POLICY.read_text())
    settings = Settings.load(flags={"data_dir": str(tmp_path), "policies": [str(policies)], "cuda_graphs": False}, env={})
    rt = load_runtime(settings, AuditorMetrics(CollectorRegistry()))
    try:
        assert rt.store is not None
        first = rt.store.current()
        assert first.cuda_graphs is False
        (policies / "default.yaml").write_text(DEFAULT_POLICY.read_text().replace("name: default", "name: default\n  # edited"))
        assert rt.store.reload().ok
        assert rt.store.current() is not first and rt.store.current().cuda_graphs is False
    finally:
        import asyncio

        asyncio.run(rt.close())


def test_the_servers_compile_setting_reaches_admitted_engines() -> None:
    from auditor.sae import load_sae
    from auditor.server.runtime import _admit

    library = load_policy(DEFAULT_POLICY).library
    sae_path = str(library.resolve_path(library.sae.path or ""))
    sae = load_sae(sae_path)
    # "aot_eager" stands for inductor (a backend that traces as inductor does, without its
    # minute of code generation on this CPU).
    for compile_program in ("aot_eager", False):
        engine = load_policy(DEFAULT_POLICY)
        _admit(sae, library, None, sae_path, cuda_graphs=False, compile_program=compile_program)(engine)
        assert engine.compile_program is compile_program and engine.cuda_graphs is False
        # A compiled engine compiled when admitted, before serving.
        assert (engine._program is not None) is bool(compile_program) and not engine._program_failed
