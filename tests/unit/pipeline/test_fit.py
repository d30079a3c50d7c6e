"""A library or policy for another SAE is refused when the parts are put together, before any audit."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from auditor.cli import main
from auditor.errors import ConfigError
from auditor.features import load_library
from auditor.metrics import AuditorMetrics
from auditor.pipeline import check_fit
from auditor.policy import load_policy
from auditor.sae import SAE, load_sae
from auditor.server.runtime import load_runtime
from auditor.server.settings import Settings
from tests.conftest import make_random_sae

HOOK = "blocks.5.hook_resid_post"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parents[3]
DEFAULT_POLICY = REPO / "policies" / "default.yaml"


def _library(folder: Path, *, d_sae: int | None = 64, hookpoint: str = HOOK, model: str = MODEL, top: int = 40) -> Path:
    declared = f", d_sae: {d_sae}" if d_sae is not None else ""
    path = folder / "library.yaml"
    path.write_text(
        "apiVersion: auditor/v1\nkind: FeatureLibrary\nid: fit\n"
        f"sae: {{id: fit-sae, model: {model}, hookpoint: {hookpoint}, path: sae{declared}}}\n"
        "features:\n"
        "  - {name: deception.fraud, index: 3, category: deception}\n"
        f"  - {{name: deception.far, index: {top}, category: deception}}\n",
        encoding="utf-8",
    )
    return path


def _policy(folder: Path, condition: str) -> Path:
    path = folder / "policy.yaml"
    path.write_text(
        "apiVersion: auditor/v1\nkind: Policy\nmetadata: {name: fit-policy}\nlibrary: library.yaml\n"
        f"rules:\n  - {{id: r1, severity: high, category: deception, condition: {condition}}}\n",
        encoding="utf-8",
    )
    return path


def _probe(folder: Path, **fields: object) -> None:
    probe = {"kind": "logistic", "pool": "mean", "intercept": 0.0, **fields}
    (folder / "probe.json").write_text(json.dumps(probe), encoding="utf-8")


@pytest.fixture(scope="module")
def sae(tmp_path_factory: pytest.TempPathFactory) -> SAE:
    return load_sae(str(make_random_sae(tmp_path_factory.mktemp("fit") / "sae", d_in=576, d_sae=64, hookpoint=HOOK)))


FEATURE = "{feature: deception.far, threshold: 1.0}"


def test_parts_that_fit_give_the_hookpoint(tmp_path: Path, sae: SAE) -> None:
    _library(tmp_path)
    _probe(tmp_path, inputs="hookpoint", coef=[0.0] * 576)
    engine = load_policy(_policy(tmp_path, "{any: [" + FEATURE + ", {probe: {path: probe.json, threshold: 0.5}}]}"))
    assert check_fit(sae, library=engine.library, policy=engine, sae_name="s") == HOOK
    assert check_fit(sae, hookpoint=HOOK, policy=engine) == HOOK
    assert check_fit(sae) == HOOK  # nothing to check against


@pytest.mark.parametrize(
    ("library", "condition", "probe", "message"),
    [
        (
            {"d_sae": 128},
            FEATURE,
            None,
            "policy 'fit-policy' uses feature library 'fit' ({lib}), which describes an SAE with 128 latents (sae.d_sae), "
            "but the SAE at SAE_DIR has 64 latents: pass the matching --sae or another --policy",
        ),
        (
            {"d_sae": None, "top": 4565},
            FEATURE,
            None,
            "policy 'fit-policy' watches latent 4565 (deception.far) but the SAE at SAE_DIR has 64 latents; its feature "
            "library 'fit' ({lib}) describes another SAE: pass the matching --sae or another --policy",
        ),
        (
            {"d_sae": None, "top": 70},
            "{probe: {path: probe.json, threshold: 0.5}}",
            {"inputs": "features", "features": ["deception.fraud", "deception.far"], "coef": [1.0, 1.0]},
            "policy 'fit-policy' watches latent 70 (deception.far) but the SAE at SAE_DIR has 64 latents",
        ),
        (
            {"hookpoint": "blocks.10.hook_resid_post"},
            FEATURE,
            None,
            "policy 'fit-policy' uses feature library 'fit' ({lib}), which labels the latents of an SAE at "
            f"blocks.10.hook_resid_post, but the SAE at SAE_DIR reads {HOOK}, where those labels mean nothing: "
            "pass the matching --sae or another --policy (or correct the library's sae.hookpoint if that is what is wrong)",
        ),
        ({"hookpoint": "h"}, FEATURE, None, f"which labels the latents of an SAE at h, but the SAE at SAE_DIR reads {HOOK}"),
        (
            {},
            "{probe: {path: probe.json, threshold: 0.5}}",
            {"inputs": "hookpoint", "coef": [1.0, 2.0, 3.0]},
            "policy 'fit-policy' has hookpoint probe {probe} of width 3, but the SAE at SAE_DIR reads "
            f"{HOOK} of width 576 (the model's)",
        ),
    ],
    ids=["library-d_sae", "latent-beyond-the-sae", "feature-probe-beyond-the-sae", "hookpoint", "no-hookpoint-name", "probe-width"],
)
def test_a_policy_for_another_sae_is_refused(
    tmp_path: Path, sae: SAE, library: dict[str, object], condition: str, probe: dict[str, object] | None, message: str
) -> None:
    lib = _library(tmp_path, **library)  # type: ignore[arg-type]
    if probe is not None:
        _probe(tmp_path, **probe)
    engine = load_policy(_policy(tmp_path, condition))
    with pytest.raises(ConfigError) as info:
        check_fit(sae, library=engine.library, policy=engine, sae_name="SAE_DIR")
    assert message.format(lib=lib.resolve(), probe=(tmp_path / "probe.json").resolve()) in info.value.message


def test_a_library_alone_and_a_hookpoint_override_are_checked(tmp_path: Path, sae: SAE) -> None:
    lib = load_library(_library(tmp_path, d_sae=32, top=20))
    with pytest.raises(ConfigError, match=r"has 64 latents: pass the matching --sae or another --library$"):
        check_fit(sae, library=lib)
    lib = load_library(_library(tmp_path))
    with pytest.raises(ConfigError, match=f"{HOOK}, but --hookpoint asks for blocks.7.hook_resid_post"):
        check_fit(sae, library=lib, hookpoint="blocks.7.hook_resid_post")
    assert check_fit(sae, library=lib, hookpoint=HOOK) == HOOK


def test_a_library_for_another_model_is_a_warning(tmp_path: Path, sae: SAE, caplog: pytest.LogCaptureFixture) -> None:
    lib = load_library(_library(tmp_path, model="openai-community/gpt2"))
    with caplog.at_level(logging.WARNING, logger="auditor"):
        assert check_fit(sae, library=lib, model_name="SmolLM2-135M-Instruct") == HOOK
    [record] = caplog.records
    assert record.getMessage().startswith(
        f"feature library 'fit' ({lib.path}) describes an SAE of model openai-community/gpt2, but the model is "
        "SmolLM2-135M-Instruct"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="auditor"):
        check_fit(sae, library=load_library(_library(tmp_path)), model_name="SmolLM2-135M-Instruct")  # owner left out
    assert caplog.records == []


def test_the_cli_prints_the_warning_as_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    from auditor.cli import _package_warnings_on_stderr

    with _package_warnings_on_stderr("audit"):
        logging.getLogger("auditor.pipeline").warning("the library fits %s", "another model")
    logging.getLogger("auditor.pipeline").warning("after the command")  # its handler is gone
    assert capsys.readouterr().err == "warning: the library fits another model\n"


def test_audit_refuses_a_policy_for_another_sae_before_the_model_loads(
    tmp_path: Path, sae: SAE, capsys: pytest.CaptureFixture[str]
) -> None:
    sae_dir = make_random_sae(tmp_path / "sae64", d_in=576, d_sae=64, hookpoint="blocks.15.hook_resid_post")
    assert main(["audit", "Send me your password", "--policy", str(DEFAULT_POLICY), "--sae", str(sae_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: policy 'default' uses feature library 'smollm2-135m-instruct' (")
    assert f"which describes an SAE with 4608 latents (sae.d_sae), but the SAE at {sae_dir} has 64 latents" in err


def test_the_server_refuses_a_policy_for_another_sae_before_the_model_loads(tmp_path: Path) -> None:
    sae_dir = make_random_sae(tmp_path / "sae64", d_in=576, d_sae=64, hookpoint=HOOK)
    _library(tmp_path, d_sae=None, top=4565)
    policy = _policy(tmp_path, FEATURE)
    flags = {"policies": [str(policy)], "sae": str(sae_dir), "data_dir": str(tmp_path / "data")}
    with pytest.raises(ConfigError, match=f"^policy 'fit-policy' watches latent 4565 .* but the SAE at {sae_dir} has 64 latents"):
        load_runtime(Settings.load(flags=flags, env={}), AuditorMetrics(CollectorRegistry()))


def test_the_server_refuses_a_library_at_another_hookpoint(tmp_path: Path) -> None:
    sae_dir = make_random_sae(tmp_path / "sae64", d_in=576, d_sae=64, hookpoint=HOOK)
    _library(tmp_path, hookpoint="blocks.10.hook_resid_post")
    policy = _policy(tmp_path, FEATURE)
    flags = {"policies": [str(policy)], "sae": str(sae_dir), "data_dir": str(tmp_path / "data")}
    with pytest.raises(ConfigError, match=f"^policy 'fit-policy' uses .* SAE at blocks.10.hook_resid_post, but the SAE at {sae_dir} reads {HOOK}"):
        load_runtime(Settings.load(flags=flags, env={}), AuditorMetrics(CollectorRegistry()))


def test_an_sae_that_names_no_hookpoint_reads_its_librarys(tmp_path: Path) -> None:
    """OpenAI-format files and many others carry no hookpoint: the library's is the one read,
    by check_fit given only the policy and by the server, at load and at every reload."""
    hookless = load_sae(str(make_random_sae(tmp_path / "sae", d_in=576, d_sae=64, hookpoint=HOOK)))
    hookless.cfg.metadata.hook_name = None
    _library(tmp_path)
    engine = load_policy(_policy(tmp_path, FEATURE))
    assert check_fit(hookless, policy=engine) == HOOK

    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg.setdefault("metadata", {}).pop("hook_name", None)
    cfg.pop("hook_name", None)
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(str(tmp_path / "sae")).cfg.metadata.hook_name is None
    flags = {"policies": [str(tmp_path / "policy.yaml")], "sae": str(tmp_path / "sae"), "data_dir": str(tmp_path / "data")}
    runtime = load_runtime(Settings.load(flags=flags, env={}), AuditorMetrics(CollectorRegistry()))
    try:
        assert runtime.auditor.hookpoint == HOOK
        assert runtime.store is not None and runtime.store.reload().ok
    finally:
        import asyncio

        asyncio.run(runtime.close())
