from __future__ import annotations

import pytest

from auditor.errors import HookpointError
from auditor.models.hookpoints import HOOK_KINDS, Hookpoint, parse_hookpoint


@pytest.mark.parametrize(
    ("name", "layer", "kind"),
    [
        ("blocks.0.hook_resid_pre", 0, "resid_pre"),
        ("blocks.3.hook_resid_post", 3, "resid_post"),
        ("blocks.12.hook_mlp_out", 12, "mlp_out"),
        ("blocks.29.hook_attn_out", 29, "attn_out"),
        (" blocks.1.hook_resid_post ", 1, "resid_post"),
    ],
)
def test_parse_valid(name: str, layer: int, kind: str) -> None:
    point = parse_hookpoint(name)
    assert point == Hookpoint(layer, kind)  # type: ignore[arg-type]
    assert point.name == name.strip()
    assert parse_hookpoint(point.name) == point


@pytest.mark.parametrize(
    "name",
    [
        "",
        "blocks.3",
        "blocks.3.hook_resid",
        "blocks.-1.hook_resid_post",
        "blocks.01.hook_resid_post",
        "blocks.x.hook_resid_post",
        "layers.3",
        "blocks.3.hook_resid_post.extra",
        "model.layers.3.hook_resid_post",
        "blocks.3.attn.hook_z",
    ],
)
def test_parse_malformed_lists_accepted_forms(name: str) -> None:
    with pytest.raises(HookpointError) as info:
        parse_hookpoint(name)
    message = str(info.value)
    assert repr(name) in message
    for kind in HOOK_KINDS:
        assert f"blocks.<layer>.hook_{kind}" in message


@pytest.mark.parametrize(("layer", "ok"), [(0, True), (29, True), (30, False), (31, False)])
def test_layer_range(layer: int, ok: bool) -> None:
    name = f"blocks.{layer}.hook_resid_post"
    if ok:
        assert parse_hookpoint(name, n_layers=30).layer == layer
    else:
        message = r"out of range for TinyModel, which has 30 layers \(valid layers: 0\.\.29\)"
        with pytest.raises(HookpointError, match=message):
            parse_hookpoint(name, n_layers=30, model_name="TinyModel")


@pytest.mark.parametrize(("layer", "kind"), [(-1, "resid_post"), (1, "resid_mid"), (True, "resid_post")])
def test_hookpoint_rejects_bad_fields(layer: int, kind: str) -> None:
    with pytest.raises(HookpointError):
        Hookpoint(layer, kind)  # type: ignore[arg-type]


def test_depth_follows_forward_order() -> None:
    names = [
        "blocks.1.hook_resid_post",
        "blocks.1.hook_mlp_out",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_attn_out",
    ]
    ordered = sorted((parse_hookpoint(n) for n in names), key=lambda p: p.depth)
    assert [p.name for p in ordered] == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_resid_post",
    ]
