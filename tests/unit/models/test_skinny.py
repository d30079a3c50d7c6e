"""The few-row kernel: built with the system's compiler, equal to torch's products to float
rounding, and used only inside the auditor's own forwards."""

from __future__ import annotations

import copy
import errno
import os
import platform
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auditor.models import capture, skinny
from tests.unit.models.conftest import VOCAB, build_model

CAN_BUILD = (
    platform.machine().lower() in {"x86_64", "amd64"}
    and torch.backends.cpu.get_cpu_capability() in {"AVX2", "AVX512"}
    and bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
)
IN_USE = CAN_BUILD and os.environ.get("AUDITOR_SKINNY_KERNEL", "1").strip().lower() not in {"0", "false", "no", "off"}
needs_kernel = pytest.mark.skipif(not IN_USE, reason="needs an x86-64 CPU with AVX2, a C compiler, and the kernel not turned off")


def test_the_kernel_is_built_wherever_it_can_be() -> None:
    """On an AVX2 machine with a compiler (this project's CI) a failed build is a failure, not a fallback."""
    state = skinny.status()
    assert state["available"] == IN_USE, state["detail"]
    if IN_USE:
        assert state["detail"].startswith("built at ")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 17, 96])
@pytest.mark.parametrize(("n", "k"), [(1, 8), (2, 1), (3, 7), (4, 9), (5, 16), (7, 33), (64, 576), (97, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_torch(rows: int, n: int, k: int, with_bias: bool) -> None:
    """Every remainder: rows past a group of four, columns past a block of three, K past eight lanes."""
    gen = torch.Generator().manual_seed(rows * 1000 + n * 10 + k)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if with_bias else None
    got = skinny.linear(x, w, b)
    want = F.linear(x.double(), w.double(), b.double() if b is not None else None).float()
    assert got.shape == (rows, n)
    # Float32 rounding of a length-k dot product, relative to the sum of the magnitudes.
    scale = (x.abs() @ w.abs().T) + (b.abs() if b is not None else 0)
    assert bool(((got - want).abs() <= 1e-6 * (k**0.5 + 1) * scale + 1e-6).all())


@needs_kernel
def test_linear_takes_batched_and_strided_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 5, generator=gen).transpose(1, 2)  # [2, 5, 40], not contiguous
    w = torch.randn(11, 40, generator=gen)
    torch.testing.assert_close(skinny.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert skinny.linear(x, w).shape == (2, 5, 11)


@needs_kernel
def test_results_do_not_depend_on_the_thread_count() -> None:
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(16, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = skinny.linear(x, w)
        torch.set_num_threads(2)
        two = skinny.linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernel
def test_linear_refuses_what_it_does_not_compute() -> None:
    with pytest.raises(ValueError, match="float32 CPU"):
        skinny.linear(torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="shapes do not match"):
        skinny.linear(torch.randn(2, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match="shapes do not match"):
        skinny.linear(torch.randn(2, 8), torch.randn(3, 8), torch.randn(4))


def _differing_input(layer: nn.Linear) -> torch.Tensor:
    """Rows for which the kernel's and torch's sums round differently (so the tests can tell which ran)."""
    for seed in range(20):
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(seed))
        if not torch.equal(skinny.linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias)):
            return x
    raise AssertionError("the kernel and torch agreed bit for bit on every input tried")


@needs_kernel
def test_wrapped_modules_use_the_kernel_only_when_enabled_on_this_thread() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1536, 200), nn.ReLU(), nn.Linear(200, 7, bias=False))
    assert not skinny.wrapped(model[0])
    assert skinny.install(model) == 2
    assert skinny.install(model) == 0  # once
    assert skinny.wrapped(model[0]) and skinny.wrapped(model[2]) and not skinny.wrapped(model[1])
    layer = model[0]
    x = _differing_input(layer)
    kernel, plain = skinny.linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias)
    with torch.inference_mode():
        assert torch.equal(layer(x), plain)
        with skinny.enabled():
            assert torch.equal(layer(x), kernel)
            with skinny.suspended():
                assert torch.equal(layer(x), plain)
            assert torch.equal(layer(x), kernel)
            # Another thread's forward is not the auditor's: torch's product.
            seen: list[torch.Tensor] = []
            worker = threading.Thread(target=lambda: seen.append(layer(x)))
            worker.start()
            worker.join()
            assert torch.equal(seen[0], plain)
            # More rows than MAX_ROWS: torch's product.
            many = x.repeat(skinny.MAX_ROWS, 1)
            assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))
        assert torch.equal(layer(x), plain)
    # A deep copy computes with its own weights.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.mul_(2)
    with torch.inference_mode(), skinny.enabled():
        assert torch.equal(twin[0](x), skinny.linear(x, twin[0].weight, twin[0].bias))
        assert torch.equal(layer(x), kernel)


@needs_kernel
def test_a_forward_that_wants_gradients_keeps_torch_product() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 5)
    skinny.install(layer)
    x = torch.randn(2, 64, requires_grad=True)
    with skinny.enabled():
        out = layer(x)
    out.sum().backward()  # the kernel has no backward: it must not have run
    assert x.grad is not None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, 64))


@needs_kernel
def test_capture_uses_the_kernel_and_agrees_with_torch_products() -> None:
    model = build_model("llama")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    hook = "blocks.1.hook_resid_post"
    fast = capture(model, ids, None, [hook])[hook]
    with skinny.suspended():
        plain = capture(model, ids, None, [hook])[hook]
    assert not torch.equal(fast, plain)  # the kernel ran
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)
    # The model's own forward is untouched by the wrapping.
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(plain, hidden)


def test_build_caches_by_source_and_reports_compiler_errors(tmp_path: Path) -> None:
    if not CAN_BUILD:
        pytest.skip("needs an x86-64 CPU with AVX2 and a C compiler")
    first = skinny.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert skinny.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # not built again
    failing = tmp_path / "cc-that-fails"
    failing.write_text("#!/bin/sh\necho 'skinny.c:1: error: no such intrinsic' >&2\nexit 1\n")
    failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(RuntimeError, match="no such intrinsic"):
        skinny.build(tmp_path / "other", compiler=str(failing))
    with pytest.raises(FileNotFoundError):
        skinny.build(tmp_path / "other", compiler=str(tmp_path / "no-such-cc"))
    assert not list((tmp_path / "other").glob("*.so")) and not list((tmp_path / "other").glob(".skinny-*"))


def test_turned_off_or_unbuildable_means_torch_products(tmp_path: Path) -> None:
    fn, why = skinny._load({"AUDITOR_SKINNY_KERNEL": "0"})
    assert fn is None and "AUDITOR_SKINNY_KERNEL=0" in why
    fn, why = skinny._load({"AUDITOR_CACHE_DIR": str(tmp_path), "CC": str(tmp_path / "no-such-cc")})
    if CAN_BUILD:
        assert fn is None and why.startswith("could not build the kernel")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 16, 96])
@pytest.mark.parametrize("n", [1, 23, 24, 50, 4608])
def test_encoder_product_matches_addmm(rows: int, n: int) -> None:
    """Weights stored [K, N] (an SAE's W_enc): whole panels of 24 columns and the columns past them."""
    gen = torch.Generator().manual_seed(rows * 7 + n)
    x, w, b = torch.randn(rows, 576, generator=gen), torch.randn(576, n, generator=gen), torch.randn(n, generator=gen)
    got = skinny.encoder_product(b, x, w)
    assert got is not None and got.shape == (rows, n)
    want = torch.addmm(b.double(), x.double(), w.double()).float()
    scale = x.abs() @ w.abs() + b.abs()
    assert bool(((got - want).abs() <= 1e-6 * (576**0.5 + 1) * scale + 1e-6).all())
    no_bias = skinny.encoder_product(None, x, w)
    assert no_bias is not None
    torch.testing.assert_close(no_bias, x @ w, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_encoder_product_declines_what_torch_should_run() -> None:
    x, w, b = torch.randn(4, 32), torch.randn(32, 48), torch.randn(48)
    assert skinny.encoder_product(b, torch.randn(skinny.MAX_ROWS + 1, 32), w) is None
    assert skinny.encoder_product(b, x.double(), w.double()) is None
    assert skinny.encoder_product(b, x, torch.randn(31, 48)) is None
    assert skinny.encoder_product(torch.randn(47), x, w) is None
    wants_grad = w.clone().requires_grad_()
    assert skinny.encoder_product(b, x, wants_grad) is None
    with torch.no_grad():
        assert skinny.encoder_product(b, x, wants_grad) is not None
    with skinny.suspended():
        assert skinny.encoder_product(b, x, w) is None


@needs_kernel
@pytest.mark.parametrize("architecture", ["topk", "standard", "jumprelu"])
def test_sae_full_encodes_of_few_rows_use_the_kernel(architecture: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from auditor.sae import SAE
    from tests.conftest import make_random_sae

    sae = SAE.load(make_random_sae(tmp_path / "sae", d_in=64, d_sae=200, architecture=architecture, seed=3))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(6)) * 3
    # Every architecture's encode must take the kernel's product (not only standard's, whose
    # result is compared bit for bit below): count the products it computed.
    computed: list[bool] = []
    real = skinny.encoder_product

    def counting(*args: torch.Tensor | None) -> torch.Tensor | None:
        out = real(*args)
        computed.append(out is not None)
        return out

    monkeypatch.setattr(skinny, "encoder_product", counting)
    with torch.inference_mode():
        fast = sae.encode(x)
        assert computed == [True], computed
        with skinny.suspended():
            plain = sae.encode(x)
        assert computed == [True, False], computed
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert bool((fast > 0).any())
    if architecture == "standard":  # no input normalization, b_dec zero: the kernel's product, relu'd
        # The SAE hands the kernel W_enc transposed (its rows, read as a linear layer's weight).
        rows = sae._encoder_rows()
        assert rows is not None and torch.equal(rows, sae.W_enc.detach().t())
        kernel = skinny.encoder_product(sae.b_enc.detach(), x, sae.W_enc.detach(), rows)
        assert kernel is not None and torch.equal(fast, kernel.relu_())
        assert not torch.equal(fast, plain)  # and not torch's (they round differently here)


@needs_kernel
@pytest.mark.parametrize("m", [1, 4, 5, 21, 96])
def test_encoder_product_from_the_transposed_weight_equals_the_panels(m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    x, w, b = torch.randn(m, 67, generator=gen), torch.randn(67, 203, generator=gen), torch.randn(203, generator=gen)
    want = (x.double() @ w.double() + b.double()).float()
    panels = skinny.encoder_product(b, x, w)
    rows = skinny.encoder_product(b, x, w, w.t().contiguous())
    assert panels is not None and rows is not None
    torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(panels, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows, skinny.linear(x, w.t().contiguous(), b))  # the linear layer's product
    # A transpose of the wrong shape is not used: the panels run.
    assert torch.equal(skinny.encoder_product(b, x, w, torch.zeros(5, 5)), panels)


def test_sae_keeps_its_encoder_transposed_until_the_weights_change(tmp_path: Path) -> None:
    from auditor.sae import SAE
    from auditor.sae import sae as sae_module
    from tests.conftest import make_random_sae

    sae = SAE.load(make_random_sae(tmp_path / "sae", d_in=16, d_sae=40, architecture="standard", seed=1))
    rows = sae._encoder_rows()
    assert rows is not None and rows.is_contiguous() and torch.equal(rows, sae.W_enc.detach().t())
    assert sae._encoder_rows() is rows  # kept
    with torch.no_grad():
        sae.W_enc.mul_(2.0)  # an in-place change (fold_activation_norm_scaling does this)
    fresh = sae._encoder_rows()
    assert fresh is not rows and torch.equal(fresh, sae.W_enc.detach().t())
    with torch.no_grad():
        sae.W_enc.copy_(torch.ones_like(sae.W_enc))  # load_state_dict's way
    assert torch.equal(sae._encoder_rows(), torch.ones(40, 16))
    x = torch.randn(3, 16)
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ sae.W_enc.detach() + sae.b_enc.detach()))
    # None where the copy is not made: above the size limit, off float32.
    limit = sae_module._ENCODER_ROWS_MAX_BYTES
    try:
        sae_module._ENCODER_ROWS_MAX_BYTES = 16 * 40 * 4 - 1
        assert sae._encoder_rows() is None
    finally:
        sae_module._ENCODER_ROWS_MAX_BYTES = limit
    assert sae.to(torch.float64)._encoder_rows() is None


@needs_kernel
def test_sae_drops_its_transposed_encoder_on_to_and_leaves_it_out_of_copies(tmp_path: Path) -> None:
    import copy
    import pickle

    from auditor.sae import SAE
    from tests.conftest import make_random_sae

    sae = SAE.load(make_random_sae(tmp_path / "sae", d_in=16, d_sae=1024, architecture="standard", seed=2))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    # Built only when the kernel runs: not for more rows than it takes.
    sae.encode(torch.randn(skinny.MAX_ROWS + 1, 16))
    assert "_encoder_rows_kept" not in sae.__dict__
    sae.encode(x)
    assert "_encoder_rows_kept" in sae.__dict__
    # .to() sets .data (version counters unchanged; the new storage may reuse the old address):
    # the kept copy goes with the old weights, whatever the allocator does.
    with torch.no_grad():
        sae.to(torch.bfloat16)
        sae.W_enc.mul_(-1.0)
        sae.to(torch.float32)
    assert "_encoder_rows_kept" not in sae.__dict__
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), torch.relu(x @ sae.W_enc + sae.b_enc))
    assert "_encoder_rows_kept" in sae.__dict__
    for clone in (copy.deepcopy(sae), pickle.loads(pickle.dumps(sae))):
        assert "_encoder_rows_kept" not in clone.__dict__ and "_columns_cache" not in clone.__dict__
        with torch.no_grad():
            assert torch.equal(clone.encode(x), sae.encode(x))


def test_the_built_library_is_readable_by_other_users(tmp_path: Path) -> None:
    """The image builds the kernel as root and runs as uid 10001: a library only its owner can
    read (mkstemp's 0600) fails to load there, and the sidecar silently runs without it."""
    if not CAN_BUILD:
        pytest.skip("needs an x86-64 CPU with AVX2 and a C compiler")
    mode = skinny.build(tmp_path).stat().st_mode
    assert mode & 0o444 == 0o444, oct(mode)  # dlopen maps the file: it must be readable


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS])
def test_a_cache_that_cannot_be_written_builds_in_a_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    """No permission (EACCES) or a read-only mount (EROFS, a read-only root file system or
    volume): both build in a private temporary folder instead of going without the kernel."""
    if not CAN_BUILD:
        pytest.skip("needs an x86-64 CPU with AVX2 and a C compiler")
    cache = tmp_path / "cache"
    real = skinny.build

    def build(out_dir: Path, compiler: str | None = None) -> Path:
        if cache in out_dir.parents:
            raise OSError(err, os.strerror(err), str(out_dir))
        return real(out_dir, compiler)

    monkeypatch.setattr(skinny, "build", build)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    fns, why = skinny._load({"AUDITOR_CACHE_DIR": str(cache)})
    assert fns is not None and why.startswith("built in a temporary folder"), why
    assert str(cache) in why
    # The library works after its temporary folder is gone (it stays mapped), and nothing is left behind.
    assert list((tmp_path / "tmp").iterdir()) == []
    x, w = torch.randn(3, 16), torch.randn(5, 16)
    out = torch.empty(3, 5)
    fns.linear(x.data_ptr(), w.data_ptr(), None, out.data_ptr(), 3, 5, 16, 1)
    torch.testing.assert_close(out, x @ w.T, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_bias_that_wants_a_gradient_keeps_torch_product() -> None:
    """Frozen weight, trainable bias (bias-only fine-tuning): the output must carry the graph."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 5)
    layer.weight.requires_grad_(False)
    skinny.install(layer)
    with skinny.enabled():
        out = layer(torch.randn(2, 64))
    assert out.requires_grad
    out.sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((5,), 2.0))


@needs_kernel
def test_a_wrapped_model_can_be_saved_and_loaded_whole() -> None:
    """capture() wraps the caller's model: torch.save / pickle of it must still round-trip
    (a bound method of a module-level function pickles as getattr(module, '_forward'), which
    the loaded module does not have), and the loaded copy computes with its own weights."""
    import io
    import pickle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1536, 200), nn.ReLU(), nn.Linear(200, 7))
    assert skinny.install(model) == 2
    x = _differing_input(model[0])
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    twin = pickle.loads(pickle.dumps(model))
    for copy_ in (loaded, twin):
        with torch.no_grad():
            copy_[0].weight.mul_(2)
        with torch.inference_mode(), skinny.enabled():
            assert torch.equal(copy_[0](x), skinny.linear(x, copy_[0].weight, copy_[0].bias))
            assert torch.equal(model[0](x), skinny.linear(x, model[0].weight, model[0].bias))
        with torch.inference_mode():
            torch.testing.assert_close(copy_(x), F.linear(F.relu(F.linear(x, copy_[0].weight, copy_[0].bias)), copy_[2].weight, copy_[2].bias))


@needs_kernel
def test_linear_of_empty_inputs_matches_torch() -> None:
    """No input features (K=0: the bias alone), no rows, no outputs: torch's shapes and values."""
    b = torch.randn(4)
    for x, w, bias in [
        (torch.randn(3, 0), torch.randn(4, 0), b),
        (torch.randn(2, 3, 0), torch.randn(4, 0), None),
        (torch.randn(0, 5), torch.randn(4, 5), b),
        (torch.randn(3, 5), torch.randn(0, 5), None),
    ]:
        got, want = skinny.linear(x, w, bias), F.linear(x, w, bias)
        assert got.shape == want.shape and torch.equal(got, want)


def test_a_compiler_command_with_arguments_builds(tmp_path: Path) -> None:
    """$CC is a command line by convention ("ccache gcc", "gcc -m64"), not one file name."""
    if not CAN_BUILD:
        pytest.skip("needs an x86-64 CPU with AVX2 and a C compiler")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    fns, why = skinny._load({"AUDITOR_CACHE_DIR": str(tmp_path), "CC": f"{cc} -DAUDITOR_TEST_FLAG=1"})
    assert fns is not None and why.startswith(f"built at {tmp_path}"), why


@needs_kernel
def test_compiled_sae_encodes_trace_torch_products(tmp_path: Path) -> None:
    """Like the wrapped modules, the encoder product steps aside while dynamo traces: a
    ctypes call on data pointers cannot be traced, so a compiled (fullgraph) encode failed."""
    from auditor.sae import SAE
    from tests.conftest import make_random_sae

    skinny.library()
    sae = SAE.load(make_random_sae(tmp_path / "sae", d_in=64, d_sae=200, architecture="topk", seed=3))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(6))
    torch._dynamo.reset()
    compiled = torch.compile(sae.encode, backend="eager", fullgraph=True)
    with torch.inference_mode():
        got = compiled(x)
        with skinny.suspended():
            want = sae.encode(x)
    torch.testing.assert_close(got, want)


@needs_kernel
def test_tensors_without_storage_take_torch_products(tmp_path: Path) -> None:
    """torch.func.vmap hands the encode (and the layers) batched tensors, which have no data
    pointer: torch's products run (an SAE encode under vmap raised before)."""
    from auditor.sae import SAE
    from tests.conftest import make_random_sae

    sae = SAE.load(make_random_sae(tmp_path / "sae", d_in=64, d_sae=200, architecture="standard", seed=3))
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    layer = nn.Linear(64, 8)
    skinny.install(layer)
    with torch.inference_mode():
        torch.testing.assert_close(torch.func.vmap(sae.encode)(x), torch.stack([sae.encode(r) for r in x]), rtol=1e-5, atol=1e-5)
        with skinny.enabled():
            torch.testing.assert_close(torch.func.vmap(layer)(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="storage"):
        torch.func.vmap(lambda r: skinny.linear(r, layer.weight.detach()))(x)


@needs_kernel
def test_cpu_autocast_keeps_torch_products_and_their_dtype(tmp_path: Path) -> None:
    """Under torch.autocast("cpu") torch's products return bfloat16; the float32 kernel must not
    change what dtype an SAE encode (always eligible) or a wrapped layer returns."""
    from auditor.sae import SAE
    from tests.conftest import make_random_sae

    sae = SAE.load(make_random_sae(tmp_path / "sae", d_in=64, d_sae=200, architecture="standard", seed=3))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    layer = nn.Linear(64, 8)
    skinny.install(layer)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with skinny.suspended():
            want_sae, want_layer = sae.encode(x), layer(x)
        got_sae = sae.encode(x)
        with skinny.enabled():
            got_layer = layer(x)
    assert want_sae.dtype == want_layer.dtype == torch.bfloat16
    assert torch.equal(got_sae, want_sae) and torch.equal(got_layer, want_layer)


# ---------------------------------------------------------------- weights read in their 4-bit form


def four_bit(n: int, k: int, kind: str = "Q4_1", seed: int = 0) -> torch.Tensor:
    """A float32 ``[n, k]`` weight as a 4-bit GGUF file gives it: random values quantized to ``kind``
    by ``gguf``'s own code and read back (what ``transformers`` loads from such a file)."""
    from gguf import GGMLQuantizationType, quants

    kind_ = GGMLQuantizationType[kind]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).numpy() * 0.05
    back = quants.dequantize(quants.quantize(w, kind_), kind_)
    return torch.from_numpy(back.astype("float32").reshape(n, k).copy())


@needs_kernel
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize(("n", "k"), [(1, 32), (5, 96), (7, 64), (97, 576), (576, 1536)])
def test_weights_from_a_4bit_file_are_read_packed_with_the_same_products_to_the_bit(kind: str, n: int, k: int) -> None:
    w = four_bit(n, k, kind, seed=n + k)
    form = skinny.packed(w)
    assert form is not None
    assert form.codes.shape == (n, k // 2) and form.scale.shape == form.minv.shape == (n, k // 32)
    # The codes give the weight back: value j of a block in the low nibble of byte j, j + 16 in the high.
    low, high = (form.codes & 15).view(n, k // 32, 16), (form.codes >> 4).view(n, k // 32, 16)
    q = torch.cat([low, high], dim=2).float()
    back = (q * form.scale[..., None]) + form.minv[..., None]  # a product, then a sum, each rounded
    assert torch.equal(back.view(n, k), w)
    assert skinny.packed(w) is form  # kept, not packed again
    b = torch.randn(n, generator=torch.Generator().manual_seed(1))
    for rows in (1, 4, 5, 16, 96):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        with skinny.unpacked():
            assert skinny.packed(w) is None
            want = skinny.linear(x, w, b)
        assert torch.equal(skinny.linear(x, w, b), want)
        torch.testing.assert_close(skinny.linear(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_4bit_products_add_in_place_and_do_not_depend_on_the_thread_count() -> None:
    fns = skinny.library()
    assert fns is not None
    w = four_bit(97, 576, seed=5)
    form = skinny.packed(w)
    assert form is not None
    x, y0 = torch.randn(16, 576), torch.randn(16, 97)
    results = []
    for threads in (1, 2):
        y = y0.clone()
        assert fns.linear_q4(x.data_ptr(), w.data_ptr(), *(t.data_ptr() for t in form), None, y.data_ptr(), 16, 97, 576, threads, 1, threads * 40) == 0
        results.append(y)
    with skinny.unpacked():
        assert torch.equal(results[0], y0 + skinny.linear(x, w))
    assert torch.equal(results[0], results[1])


@needs_kernel
def test_a_4bit_product_checks_its_row_first_and_computes_nothing_where_it_differs() -> None:
    fns = skinny.library()
    assert fns is not None
    w = four_bit(40, 64, "Q4_0", seed=6)  # Q4_0: zeros of both signs
    form = skinny.packed(w)
    assert form is not None
    codes = [t.data_ptr() for t in form]
    x = torch.randn(3, 64)

    def product(check: int) -> tuple[int, torch.Tensor]:
        y = torch.full((3, 40), 7.0)
        return fns.linear_q4(x.data_ptr(), w.data_ptr(), *codes, None, y.data_ptr(), 3, 40, 64, 2, 0, check), y

    with skinny.unpacked():
        want = skinny.linear(x, w)
    for check in (-1, 0, 17, 39, 40):  # a row out of 0..39 checks nothing
        done, y = product(check)
        assert done == 0 and torch.equal(y, want)
    # The codes give +0 for a zero; the weight holds -0 at some of them (Q4_0's d * (q - 8) with
    # d < 0): the same value (see auditor_q4_pack), every row passes.
    assert ((w == 0) & torch.signbit(w)).any()
    assert all(product(row)[0] == 0 for row in range(40))
    w.view(torch.int32)[17, 63] += 1  # one float step off: not 4-bit any more (the call reads no version counter)
    done, y = product(17)
    assert done == 1 and torch.equal(y, torch.full((3, 40), 7.0))  # nothing computed
    assert product(16)[0] == 0  # other rows still match


@needs_kernel
def test_weights_not_exactly_4bit_are_read_as_float32() -> None:
    w = four_bit(8, 64)
    nudged = w.clone()
    nudged[3, 40] = torch.nextafter(nudged[3, 40], torch.tensor(1.0))  # one value one float step off its level
    with_nan = w.clone()
    with_nan[0, 0] = float("nan")
    for weight in (
        torch.randn(8, 64),  # plain float32
        nudged,
        with_nan,
        w.double(),
        four_bit(8, 64)[:, :48].contiguous(),  # rows not a multiple of 32 long
        w.t().contiguous().t(),  # not contiguous
        w[0],  # not 2-D
    ):
        assert skinny.packed(weight) is None
    x = torch.randn(5, 64)
    torch.testing.assert_close(skinny.linear(x, nudged), F.linear(x, nudged), rtol=1e-4, atol=1e-4)
    subnormal = w.clone()
    subnormal[2, 5] = 1e-40
    assert skinny.packed(subnormal) is None
    # A Q4_0 weight's exact zero made subnormal: on a thread that reads subnormals as zero it would
    # fit the block (as 0) and be decoded as 0; the check reads bits, so it refuses the weight.
    q4_0 = four_bit(4, 64, "Q4_0", seed=3)
    zeros = (q4_0 == 0).nonzero()
    assert len(zeros)
    q4_0[tuple(zeros[0])] = 1e-40
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the pack runs on this thread, the one flushing
        torch.set_flush_denormal(True)
        assert skinny.packed(q4_0) is None
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


@needs_kernel
def test_a_weight_changed_in_place_or_replaced_is_packed_again() -> None:
    layer = nn.Linear(64, 9, bias=False)
    first, second, third = four_bit(9, 64, seed=1), four_bit(9, 64, seed=2), four_bit(9, 64, seed=3)
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer.weight.copy_(first)
        form = skinny.packed(layer.weight)
        assert form is not None
        layer.weight.copy_(second)  # the version counter moves
        assert skinny.packed(layer.weight) is not form
        assert torch.equal(skinny.linear(x, layer.weight), skinny.linear(x, second))
        layer.weight.data = third.clone()  # new storage
        assert torch.equal(skinny.linear(x, layer.weight), skinny.linear(x, third))
        # A write through .data moves no version counter, but each product compares one row with
        # the codes first: a write to every row is found at the next call, which reads the float32
        # weight (and the next packs again).
        layer.weight.data.copy_(first)
        with skinny.unpacked():
            want = skinny.linear(x, first)
        assert torch.equal(skinny.linear(x, layer.weight), want)
        assert skinny.packed(layer.weight) is not None
        assert torch.equal(skinny.linear(x, layer.weight), want)
        # One row written: found when the turn reaches it, within as many calls as there are rows.
        layer.weight.data[6] = second[6]
        with skinny.unpacked():
            want = skinny.linear(x, layer.weight)
        calls = 0
        while not torch.equal(skinny.linear(x, layer.weight), want):
            calls += 1
            assert calls < 9
        for _ in range(20):  # packed again, with the new row, and read as it is now from then on
            assert torch.equal(skinny.linear(x, layer.weight), want)
        assert skinny.packed(layer.weight) is not None
        # forget() makes the next call read a write through .data for sure.
        layer.weight.data[2] = third[2]
        skinny.forget(layer.weight)
        with skinny.unpacked():
            want = skinny.linear(x, layer.weight)
        assert torch.equal(skinny.linear(x, layer.weight), want)
        # The same view on other memory, and other memory at the same address (two storages on
        # one NumPy buffer), are packed again.
        square = nn.Linear(64, 64, bias=False)
        values = four_bit(64, 64, seed=7)
        square.weight.data = values.clone()
        assert skinny.packed(square.weight) is not None
        square.weight.data = square.weight.data.t()  # same pointer and version, another view
        assert skinny.packed(square.weight) is None  # not contiguous
        torch.testing.assert_close(skinny.linear(x, square.weight), F.linear(x, values.t()), rtol=1e-4, atol=1e-4)
        buffer = values.numpy().copy()
        square.weight.data = torch.from_numpy(buffer)
        old, address, version = skinny.packed(square.weight), square.weight.data_ptr(), square.weight._version
        buffer[:] = four_bit(64, 64, seed=8).numpy()  # no version counter sees this
        square.weight.data = torch.from_numpy(buffer)  # a new storage at the same address
        assert (square.weight.data_ptr(), square.weight._version) == (address, version)
        assert skinny.packed(square.weight) is not old
        with skinny.unpacked():
            want = skinny.linear(x, square.weight)
        assert torch.equal(skinny.linear(x, square.weight), want)


@needs_kernel
def test_a_form_dropped_by_another_thread_mid_call_is_still_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between this thread's ``packed`` and its ``checked_row`` another thread finds the weight stale
    and drops its form: the product this thread runs from the form it holds still checks a row."""
    old, new = four_bit(9, 64, seed=1), four_bit(9, 64, seed=2)
    w = old.clone()
    assert skinny.packed(w) is not None
    x = torch.randn(4, 64)
    with skinny.unpacked():
        want = skinny.linear(x, new)
    w.data.copy_(new)  # through .data: no version counter moves
    real = skinny.checked_row

    def interleaved(weight: torch.Tensor) -> int:
        skinny.forget(weight)  # what the other thread's skinny.stale(weight) does, at this point
        return real(weight)

    monkeypatch.setattr(skinny, "checked_row", interleaved)
    assert torch.equal(skinny.linear(x, w), want)


@needs_kernel
def test_packing_can_be_turned_off_and_forms_live_on_their_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import pickle

    w = four_bit(4, 32)
    monkeypatch.setenv("AUDITOR_SKINNY_Q4", "0")
    assert not skinny.packing() and skinny.packed(w) is None
    monkeypatch.delenv("AUDITOR_SKINNY_Q4")
    assert skinny.packing() and skinny.packed(w) is not None
    # No weak reference to the weight (torch.utils.swap_tensors refuses those); copies and pickles
    # carry no form, and check and pack again.
    layer = nn.Linear(32, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
        form = skinny.packed(layer.weight)
        assert form is not None
    torch.utils.swap_tensors(layer.weight, nn.Parameter(w * 2))
    with torch.no_grad():
        assert skinny.packed(layer.weight) is not form
        assert torch.equal(skinny.linear(torch.ones(1, 32), layer.weight), (w * 2).sum(1)[None])
        twin = copy.deepcopy(layer)
        assert skinny.packed(twin.weight) is not skinny.packed(layer.weight)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(loaded.weight, layer.weight) and skinny.packed(loaded.weight) is not None
        assert pickle.loads(pickle.dumps(w)).equal(w)


@needs_kernel
def test_tensors_without_an_address_are_not_packed_and_take_torch_products() -> None:
    """A fake tensor's (and other wrapper subclasses') address is 0 (and asking for it warns):
    nothing asks for it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real, x = four_bit(16, 64, seed=4), torch.randn(3, 64)
    mode = FakeTensorMode()
    fake, fake_x = mode.from_tensor(real), mode.from_tensor(x)
    assert skinny.packed(fake) is None
    with mode, pytest.raises(ValueError, match="storage"):
        skinny.linear(fake_x, fake)


@needs_kernel
def test_a_parametrized_weight_is_not_packed_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.nn.utils import parametrize

    class Same(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w + 0.0  # a new tensor every call

    layer = nn.Linear(64, 9)
    with torch.no_grad():
        layer.weight.copy_(four_bit(9, 64, seed=4))
    skinny.install(layer)
    parametrize.register_parametrization(layer, "weight", Same())
    calls = spy_on(monkeypatch, "q4_pack")
    x = torch.randn(3, 64)
    with torch.inference_mode(), skinny.enabled():
        for _ in range(3):
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert calls == []


def spy_on(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[Any, ...]]:
    """Every call's arguments to the kernel library's function ``name`` (which still runs), from now on in this test."""
    assert skinny._loaded is not None and skinny._loaded[0] is not None
    fns, detail = skinny._loaded
    real, calls = getattr(fns, name), []

    def spy(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(skinny, "_loaded", (fns._replace(**{name: spy}), detail))
    return calls


@needs_kernel
def test_wrapped_layers_read_their_weights_packed_inside_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = nn.Linear(64, 9)
    with torch.no_grad():
        layer.weight.copy_(four_bit(9, 64, seed=4))
    skinny.install(layer)
    calls = spy_on(monkeypatch, "linear_q4")
    x = torch.randn(3, 64)
    with torch.inference_mode(), skinny.enabled():
        got = layer(x)
        assert [c[7:10] for c in calls] == [(3, 9, 64)]  # rows, columns, depth
        with skinny.unpacked():
            want = layer(x)
        assert len(calls) == 1
    assert torch.equal(got, want)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-4, atol=1e-4)
