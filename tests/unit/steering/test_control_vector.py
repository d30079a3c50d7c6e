"""llama.cpp control-vector export: read back with the gguf package's GGUFReader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from auditor.errors import SteeringError
from auditor.steering import Steerer, resolve_interventions
from auditor.steering.control_vector import control_vector, llama_cpp_layer, read_control_vector, write_control_vector
from tests.unit.steering.conftest import HIDDEN, random_sae


def test_file_reads_back_with_gguf_reader(tmp_path: Path) -> None:
    sae = random_sae(tied=False, seed=2, hookpoint="blocks.2.hook_resid_post")
    cv = control_vector(sae, [(5, 4.0), (9, -1.5)], model_hint="llama")
    path = write_control_vector(cv, tmp_path / "cv.gguf")

    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 1
    [tensor] = reader.tensors
    assert tensor.name == "direction.2"
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
    assert list(tensor.shape) == [HIDDEN]
    expected = (4.0 * sae.W_dec[5] - 1.5 * sae.W_dec[9]).numpy()
    np.testing.assert_allclose(np.asarray(tensor.data), expected, rtol=1e-6, atol=1e-6)
    again = read_control_vector(path)
    assert again.model_hint == "llama" and set(again.directions) == {2}


def test_vector_equals_the_add_intervention_in_model_units(tmp_path: Path) -> None:
    # With expected_average_only_in, adding c to a latent moves x by c * W_dec[i] / s.
    sae = random_sae(tied=False, seed=3, normalize="expected_average_only_in", hookpoint="blocks.4.hook_resid_post")
    cv = read_control_vector(write_control_vector(control_vector(sae, [(7, 3.0)]), tmp_path / "v.gguf"))
    x = torch.randn(10, HIDDEN)
    slots = resolve_interventions(["7=add:3"], library=None, d_sae=sae.cfg.d_sae)
    steered = Steerer(sae, slots).apply(x).x
    torch.testing.assert_close(steered - x, torch.from_numpy(cv.directions[4]).expand(10, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("hookpoint", "layer"),
    [("blocks.15.hook_resid_post", 15), ("blocks.1.hook_resid_post", 1), ("blocks.7.hook_resid_pre", 6)],
)
def test_layer_numbering_follows_llama_cpp(hookpoint: str, layer: int) -> None:
    assert llama_cpp_layer(hookpoint) == layer


@pytest.mark.parametrize(
    ("hookpoint", "message"),
    [
        ("blocks.0.hook_resid_post", "blocks.0.hook_resid_post is the output of block 0; "),
        ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_pre is the output of block 0 (the input of block 1); "),
        ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre is the embeddings (the input of block 0); "),
        ("blocks.3.hook_mlp_out", "only hook_resid_post and hook_resid_pre"),
    ],
)
def test_unreachable_hookpoints_are_refused(hookpoint: str, message: str) -> None:
    with pytest.raises(SteeringError) as info:
        llama_cpp_layer(hookpoint)
    assert message in info.value.message and "block -1" not in info.value.message
    if "mlp" not in hookpoint:
        assert info.value.message.endswith(
            "llama.cpp's control vectors add to the output of block 1 or later (direction.0 is rejected by its "
            "loader), so an SAE here cannot be exported"
        )


def test_per_token_normalization_and_bad_features_are_refused() -> None:
    with pytest.raises(SteeringError, match="normalizes each token"):
        control_vector(random_sae(normalize="layer_norm", hookpoint="blocks.2.hook_resid_post"), [(1, 1.0)])
    sae = random_sae(hookpoint="blocks.2.hook_resid_post")
    with pytest.raises(SteeringError, match="out of range"):
        control_vector(sae, [(64, 1.0)])
    with pytest.raises(SteeringError, match="at least one"):
        control_vector(sae, [])
