"""Few-row float32 linear layers for the auditor's own forwards on x86-64 CPUs.

A streamed audit runs the model on a chunk of about 16 new tokens; a short text is audited on
a few dozen. At so few rows the CPU's general matrix product (MKL's ``sgemm`` in torch's
wheels) reads every weight for a handful of flops and runs far below the memory's speed: the
16 stopped layers of the default model took 42-58 ms a chunk on this project's 2-core AMD
machine, against 24-31 ms for the kernel in ``skinny.c`` (``benchmarks/RESULTS.md``). That
kernel streams each weight row once and multiplies it with every input row while it sits in
L1, threads splitting the output columns.

A model converted from a 4-bit file (a Q4_0 or Q4_1 GGUF, as the default model is) has float32
weights that are exactly ``scale * q + min`` in blocks of 32 values: :func:`packed` finds that form
once per weight (checked value for value), and the kernel then reads the 4-bit codes and turns
each block's rows back into the same float32 values in L1 before multiplying: the same results
to the bit, with a fifth of the memory traffic that a 16-row product waits on.

It is C, built here on first use with the system's C compiler (``$CC`` or ``cc``; flags
``-O3 -mavx2 -mfma -mf16c -fopenmp``) into ``$AUDITOR_CACHE_DIR/kernels`` and loaded with
``ctypes``; its OpenMP calls bind to the ``libgomp`` torch has loaded, so both share one
thread pool. Without a compiler, on another CPU, or with ``AUDITOR_SKINNY_KERNEL=0``, nothing
changes: torch's own product runs, and :func:`status` says why.

Only the auditor's forwards use it: :func:`install` wraps a model's ``nn.Linear`` modules
once, and the wrappers call the kernel only inside :func:`enabled` on the same thread (the
capture functions enter it), for float32 CPU tensors of at most :data:`MAX_ROWS` rows, with
no gradient wanted. Generation, the user's own calls and everything else run the module's
``forward`` unchanged. The SAE's full-width encodes of as few rows use the kernel's second
product (:func:`encoder_product`, for ``W_enc``'s ``[d_in, d_sae]`` layout), and a TopK SAE
ranks its codes, picks the watched ones and computes its reconstruction error in one call
after it (:func:`topk_tail`). Results equal
torch's to float rounding (a different summation order, as any two BLAS libraries differ);
they do not depend on the thread count. :func:`suspended` turns both off for a block (the
benchmarks compare the two that way).

The same library holds the rest of a Llama-family decoder layer (RMS norm, rotary embedding,
attention of a few new tokens over a stream's cached keys, ``silu(gate) * up``, and whole
layers in one call), which :mod:`auditor.models.lean` runs for streamed forwards, and, built
from ``auditor/policy/_host.c``, a policy evaluation in one call (:mod:`auditor.policy._host`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "Layout", "MAX_ROWS", "Packed", "build", "checked_row", "enabled", "encoder_product", "forget", "from_codes", "generation", "install", "is_suspended", "layout", "library", "linear", "packed", "packing",
    "stale", "status", "suspended", "topk_tail", "unpacked", "wrapped",
]

_log = logging.getLogger(__name__)

MAX_ROWS = 96
"""Rows (tokens) up to which the kernel runs; above, torch's product is as fast or faster."""

# The policy evaluation's C twin (auditor.policy._host) is built into the same library.
_SOURCES = (Path(__file__).with_name("skinny.c"), Path(__file__).parents[1] / "policy" / "_host.c")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
_P, _I, _F, _T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
# Each exported function's symbol and argument types (and its result type where it has one).
_SIGNATURES: dict[str, tuple[str, list[Any]] | tuple[str, list[Any], Any]] = {
    "linear": ("auditor_skinny_linear", [_P] * 4 + [_I] * 3 + [_T]),
    "addmm_kn": ("auditor_skinny_addmm_kn", [_P] * 4 + [_I] * 3 + [_T]),
    "linear_add": ("auditor_skinny_linear_add", [_P] * 4 + [_I] * 3 + [_T]),
    "linear_q4": ("auditor_skinny_linear_q4", [_P] * 7 + [_I] * 3 + [_T, _T, _I], _T),
    "q4_pack": ("auditor_q4_pack", [_P] + [_I] * 2 + [_P] * 3 + [_T], _T),
    "rmsnorm": ("auditor_rmsnorm", [_P] * 3 + [_I] * 2 + [_F]),
    "rope": ("auditor_rope", [_P] * 3 + [_I] * 3),
    "silu_mul": ("auditor_silu_mul", [_P] * 3 + [_I]),
    "attend": ("auditor_attend", [_P] * 5 + [_I] * 6 + [_F, _P, _P, _T]),
    "layers": ("auditor_layers", [_P] + [_I] * 3 + [_P] * 2 + [_I] * 4 + [_P] * 2 + [_I] + [_P] * 13 + [_T, _I, _P], _I),
    "policy_eval": ("auditor_policy_eval", [_P] * 6 + [_I] * 2 + [_P, _T], _T),
    "topk_tail": ("auditor_topk_tail", [_P] + [_I] * 3 + [_P, _I, _P, _I] + [_P] * 3 + [_I, _F, _P], _T),
}


class _Kernels(NamedTuple):
    linear: Any  # y = x w^T (+ b), w [N, K]
    addmm_kn: Any  # y = x w (+ b), w [K, N]
    linear_add: Any  # y += x w^T (+ b)
    linear_q4: Any  # either, from a weight's 4-bit codes (pack)
    q4_pack: Any  # a weight's 4-bit codes, where it is exactly of that form
    rmsnorm: Any  # the rest of a decoder layer (auditor.models.lean)
    rope: Any
    silu_mul: Any
    attend: Any
    layers: Any  # whole decoder layers: the five above in one call
    policy_eval: Any  # a policy evaluation of a small batch (auditor.policy._host)
    topk_tail: Any  # a TopK SAE's codes, watched picks and reconstruction error after the product

_ENV = "AUDITOR_SKINNY_KERNEL"
_Q4_ENV = "AUDITOR_SKINNY_Q4"
_OFF = frozenset({"0", "false", "no", "off"})
_MARK = "_auditor_skinny"
_lock = threading.Lock()
_state = threading.local()
_loaded: tuple[Any, str] | None = None  # (the kernel functions or None, what was done or why not)


def _cache_dir(env: Mapping[str, str]) -> Path:
    from auditor.models.loading import cache_root

    return cache_root(env) / "kernels"


def _cpu_ok() -> str | None:
    """Why this CPU cannot run the kernel, or None."""
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return f"the kernel is for x86-64 CPUs (this one is {platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in {"AVX2", "AVX512"}:
        return f"the kernel needs AVX2 and FMA (torch reports {capability})"
    return None


def build(out_dir: Path, compiler: str | None = None) -> Path:
    """Compile ``skinny.c`` and ``auditor/policy/_host.c`` into one library in ``out_dir`` (once per
    sources and flags); the library's path.

    A library already built there from the same source is used without a compiler (an image
    can build it in a build stage and ship only the result). Raises ``RuntimeError`` with the
    compiler's message when it fails, ``FileNotFoundError`` when there is no compiler.
    """
    source = b"\0".join(path.read_bytes() for path in _SOURCES)
    digest = hashlib.sha256(source + b"\0" + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = out_dir / f"skinny-{digest}-{platform.machine().lower()}.so"
    if target.exists():
        return target
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise FileNotFoundError("no C compiler found (set $CC, or install gcc)")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".skinny-", suffix=".so")
    os.close(fd)
    try:
        # A command line, as $CC is by convention ("ccache gcc"), not one file name.
        done = subprocess.run([*shlex.split(cc), *_FLAGS, *map(str, _SOURCES), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {' and '.join(p.name for p in _SOURCES)}: {(done.stderr or done.stdout).strip()[-600:]}")
        # mkstemp's file is 0600 (the linker keeps it owner-only): a library built as root in an
        # image's build stage would not load for the runtime's non-root user.
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: a process building at the same time writes its own file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(env: Mapping[str, str]) -> tuple[_Kernels | None, str]:
    if env.get(_ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        return None, f"turned off ({_ENV}={env[_ENV]})"
    why = _cpu_ok()
    if why:
        return None, why
    scratch: Path | None = None  # a private build folder, removed once the library is loaded
    try:
        try:
            path = build(_cache_dir(env), env.get("CC"))
        except OSError as exc:
            # A cache this process cannot write (no permission, or a read-only mount, which is
            # EROFS and not a PermissionError): build in a private temporary folder.
            if not isinstance(exc, PermissionError) and exc.errno != errno.EROFS:
                raise
            scratch = Path(tempfile.mkdtemp(prefix="auditor-kernels-"))
            path = build(scratch, env.get("CC"))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        return None, f"could not build the kernel: {exc}"
    try:
        lib = ctypes.CDLL(str(path))
        fns = _Kernels(**{field: getattr(lib, sig[0]) for field, sig in _SIGNATURES.items()})
    except (OSError, AttributeError) as exc:
        return None, f"could not load {path}: {exc}"
    finally:
        if scratch is not None:  # a loaded library stays mapped after its file is gone
            shutil.rmtree(scratch, ignore_errors=True)
    for field, sig in _SIGNATURES.items():
        fn = getattr(fns, field)
        fn.restype = sig[2] if len(sig) > 2 else None  # type: ignore[misc]
        fn.argtypes = sig[1]
    if scratch is not None:
        return fns, f"built in a temporary folder (the cache {_cache_dir(env)} cannot be written)"
    return fns, f"built at {path}"


def library(env: Mapping[str, str] | None = None) -> _Kernels | None:
    """The kernel functions, built and loaded on first call; None where they cannot run (see :func:`status`)."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                fn, why = _load(os.environ if env is None else env)
                if fn is None:
                    _log.info("few-row kernel not used: %s; torch's matrix product runs instead", why)
                _loaded = (fn, why)
    return _loaded[0]


def status() -> dict[str, Any]:
    """Whether the kernel runs here and why (or why not): ``{"available": bool, "detail": str}``."""
    fn = library()
    assert _loaded is not None
    return {"available": fn is not None, "detail": _loaded[1]}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by the kernel: float32 CPU tensors, ``x [..., K]``, ``weight [N, K]``.

    Raises ``RuntimeError`` where the kernel is unavailable, ``ValueError`` for other inputs.
    """
    fn = library()
    if fn is None:
        raise RuntimeError(f"the few-row kernel is unavailable: {status()['detail']}")
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError("the few-row kernel takes float32 CPU tensors")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"shapes do not match a linear layer: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    out = _run(fn, x, weight, bias)
    if out is None:
        raise ValueError("the few-row kernel takes tensors with storage (not vmap's batched tensors or fake tensors)")
    return out


class Packed(NamedTuple):
    """A float32 weight ``[N, K]`` that is exactly 4-bit: every value is ``scale * q + min`` (a
    float32 product, then a float32 sum) with ``q`` in 0..15, one ``scale`` and one ``min`` per 32
    values along a row, as a model converted from a 4-bit file (Q4_0, Q4_1: the default model's
    GGUF) has. The kernel's products read these (6 bits a weight) and give the same results to the
    bit as from the float32 weight."""

    codes: torch.Tensor  # uint8 [N, K / 2]: byte j of a block of 32 holds value j (low nibble) and j + 16
    scale: torch.Tensor  # float32 [N, K / 32]
    minv: torch.Tensor  # float32 [N, K / 32]


class Layout(NamedTuple):
    """Where a tensor's values are now: its storage (weakly: a storage freed and its memory reused
    by another is a different storage), the address and view on it, and its version counter (moved
    by in-place writes, not by writes through ``.data``). Two equal layouts of a live tensor read
    the same memory in the same way, and hold the same values unless written through ``.data``."""

    storage: weakref.ref[Any]
    address: int
    offset: int
    version: int
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype

    def current(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is laid out so still."""
        try:
            return self.storage() is t.untyped_storage() and self[1:] == (
                t.data_ptr(), t.storage_offset(), t._version, t.shape, t.stride(), t.dtype
            )
        except (RuntimeError, TypeError, NotImplementedError):
            return False


def layout(t: torch.Tensor) -> Layout | None:
    """``t``'s :class:`Layout`, or None where it has none to tell (an inference tensor keeps no
    version counter; vmap's tensors have no storage; a subclass's, fake tensors', is not looked into)."""
    if not _plain(t):
        return None
    try:
        return Layout(weakref.ref(t.untyped_storage()), t.data_ptr(), t.storage_offset(), t._version, t.shape, t.stride(), t.dtype)
    except (RuntimeError, TypeError, NotImplementedError):
        return None


class _Kept:
    """A weight's 4-bit form, kept on the weight itself (``weight.__dict__``): it lives and dies
    with the tensor, needs no weak reference to it (which ``torch.utils.swap_tensors`` refuses),
    and copies and pickles of the tensor carry none (they check and pack again)."""

    __slots__ = ("layout", "form", "turn")

    def __init__(self, layout: Layout | None = None, form: Packed | None = None) -> None:
        self.layout, self.form = layout, form
        self.turn = 0  # the calls that read the form so far: which row the next one checks (checked_row)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Kept, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> _Kept:
        return _Kept()

    def __copy__(self) -> _Kept:
        return _Kept()


_KEPT_AS = "_auditor_q4"  # the attribute of a weight that holds its _Kept
_pack_lock = threading.Lock()
_generation = 0  # moved by every packing and forget(): what lean's cached pointers check


def generation() -> int:
    """A count that moves whenever :func:`packed` packs a weight or :func:`forget` drops one (a
    cache of forms' pointers made at one count holds at that count)."""
    return _generation


def _known(weight: torch.Tensor) -> tuple[bool, Packed | None]:
    if not _plain(weight):  # a subclass's own __dict__, data_ptr and storage are not looked into
        return False, None
    kept = weight.__dict__.get(_KEPT_AS)
    if kept is not None and kept.layout is not None and kept.layout.current(weight):
        return True, kept.form
    return False, None


def packed(weight: torch.Tensor) -> Packed | None:
    """``weight``'s 4-bit form (see :class:`Packed`), found once and kept on the weight while it is
    unchanged, or None: not of that form (checked bit for bit), not a contiguous 2-D float32 CPU
    tensor whose rows are a multiple of 32 long, inside :func:`unpacked`, ``AUDITOR_SKINNY_Q4=0``, or
    the kernel unavailable.

    A weight written in place or given other memory is packed again: its version counter moved
    (``copy_``, ``load_state_dict``, an optimizer's step) or its storage, address or view changed
    (``param.data = ...``; see :class:`Layout`). Writes that move no version counter (through
    ``param.data``: ``param.data.copy_(...)``, ``param.data += ...``; through a NumPy view) are not
    seen here: each product from the form first compares one row of the weight with it (turning
    over the rows, :func:`checked_row`) and drops a form found stale, but until the changed rows
    come round the products read the old values. Call :func:`forget` on the weight after such a
    write (or turn this off). A tensor made anew for each call (a parametrization's) is packed every call:
    the auditor's own layers ask only for a module's registered weight.
    """
    if not packing():
        return None
    # A form kept for this layout was made for an eligible tensor: the same storage, address, view
    # and dtype are eligible still (the checks below cost more than this lookup, 2 us a call).
    hit, form = _known(weight)
    if hit:
        return form
    if (
        not _plain(weight) or weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2
        or weight.shape[1] % 32 or not weight.is_contiguous()
    ):
        return None
    fns = _loaded[0] if _loaded is not None else library()
    where = layout(weight)  # taken before reading the values
    if fns is None or where is None:
        return None
    global _generation
    with _pack_lock:
        hit, form = _known(weight)
        if hit:
            return form
        n, k = weight.shape
        form = Packed(torch.empty((n, k // 2), dtype=torch.uint8), torch.empty((n, k // 32)), torch.empty((n, k // 32)))
        if n == 0 or fns.q4_pack(weight.data_ptr(), n, k, *(t.data_ptr() for t in form), torch.get_num_threads()):
            form = None
        weight.__dict__[_KEPT_AS] = _Kept(where, form)
        _generation += 1
    return form


def checked_row(weight: torch.Tensor) -> int:
    """The row of ``weight`` that the next product from its 4-bit form (which the caller holds, from
    :func:`packed`) compares with the codes first: all rows in turn, one a call. Row 0 where the
    form was dropped meanwhile (another thread found it stale): never none, which would read the
    codes unchecked.

    A write through ``param.data`` moves no version counter, so :func:`packed` cannot see it; this
    check finds one that touches the row checked (a merged adapter's or other dense update, at the
    next call; a write to a few rows, within as many calls as the weight has rows), and the product
    then runs from the float32 weight (:func:`stale`). :func:`forget` right after such a write is
    still what makes the next call read the new values for sure."""
    kept = weight.__dict__.get(_KEPT_AS) if _plain(weight) else None
    if kept is None or kept.form is None:
        return 0
    turn = kept.turn
    kept.turn = turn + 1  # two threads may read the same turn: both check that row
    return turn % weight.shape[0]


def from_codes(
    fns: _Kernels, weight: torch.Tensor, form: Packed, x: int, w: int, b: int | None, y: int, m: int, n: int, k: int,
    threads: int, accumulate: bool = False,
) -> bool:
    """``y = x weight^T + b`` (``y +=`` that with ``accumulate``) from ``weight``'s 4-bit ``form``
    (:func:`packed`), on data pointers (``x [m, k]``, ``y [m, n]``), after comparing the row
    :func:`checked_row` gives with the codes. False where it differs: nothing was computed, the
    form is dropped (:func:`stale`), and the caller runs the float32 product."""
    if fns.linear_q4(x, w, *(t.data_ptr() for t in form), b, y, m, n, k, threads, int(accumulate), checked_row(weight)):
        stale(weight)
        return False
    return True


_warned_stale = False


def stale(weight: torch.Tensor) -> None:
    """``weight``'s values were found to differ from its kept 4-bit form (see :func:`checked_row`):
    the form is dropped (checked and packed again when next read), with one warning a process."""
    global _warned_stale
    forget(weight)
    if not _warned_stale:
        _warned_stale = True
        _log.warning(
            "a %s weight's values no longer match its 4-bit form (written through .data, which moves no "
            "version counter, or while a product read it); the form was dropped and the weight is read anew. "
            "Call auditor.models.skinny.forget(weight) right after writes through .data: a product checks "
            "one row of its weight",
            "x".join(map(str, weight.shape)),
        )


def packing() -> bool:
    """Whether :func:`packed` gives 4-bit forms here and now (not inside :func:`unpacked`, nor with ``AUDITOR_SKINNY_Q4=0``)."""
    if getattr(_state, "unpacked", False):
        return False
    raw = os.environ.get(_Q4_ENV)
    return raw is None or raw.strip().lower() not in _OFF


def forget(weight: torch.Tensor) -> None:
    """Drop what :func:`packed` kept for ``weight`` (after writing it through ``.data``): it is
    checked and packed again when next read, here and in lean forwards' cached pointers."""
    global _generation
    with _pack_lock:
        getattr(weight, "__dict__", {}).pop(_KEPT_AS, None)
        _generation += 1


@contextmanager
def _flagged(flag: str) -> Iterator[None]:
    """This thread's ``flag`` set for the block (as it was after)."""
    before = getattr(_state, flag, False)
    setattr(_state, flag, True)
    try:
        yield
    finally:
        setattr(_state, flag, before)


def unpacked() -> AbstractContextManager[None]:
    """The float32 weights for this thread's products in the block, never their 4-bit form (for comparisons)."""
    return _flagged("unpacked")


def _plain(t: torch.Tensor) -> bool:
    """Whether ``t`` is a plain tensor or parameter, not a subclass (fake tensors and other wrapper
    subclasses have no memory of their own; a fake tensor's address is 0 and asking for it warns)."""
    return type(t) is torch.Tensor or type(t) is nn.Parameter


def _pointers(*tensors: torch.Tensor | None) -> list[int | None] | None:
    """The tensors' data pointers (None for None), or None where one has no storage to point at
    (torch.func.vmap's batched tensors, fake tensors): then torch's product runs."""
    if not all(t is None or _plain(t) for t in tensors):
        return None
    try:
        return [t.data_ptr() if t is not None else None for t in tensors]
    except RuntimeError:
        return None


def _takes(*given: torch.Tensor | None) -> bool:
    """Whether the kernel library may compute with these tensors here (None: one not given): not
    inside code torch.compile traces (a ctypes call on data pointers cannot be traced), not
    :func:`suspended`, no CPU autocast (torch's product returns the autocast dtype), float32 CPU
    tensors, no gradient wanted."""
    tensors = [t for t in given if t is not None]
    return (
        not torch.compiler.is_compiling()
        and not getattr(_state, "off", False)
        and not torch.is_autocast_enabled("cpu")
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    )


def encoder_product(
    bias: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor | Callable[[], torch.Tensor | None] | None = None,
) -> torch.Tensor | None:
    """``torch.addmm(bias, x, weight)`` for ``x [M, K]`` and ``weight [K, N]`` (an SAE encoder's layout)
    by the kernel, or None where it does not apply (more than :data:`MAX_ROWS` rows, not float32
    CPU tensors, a gradient wanted, CPU autocast on, the kernel unavailable, inside code
    torch.compile traces): the caller then runs torch's.

    ``rows``, when given, is ``weight`` transposed (``[N, K]``, contiguous, the same values), or a
    function giving it (or None), called only once the kernel is to run: the product then runs as
    a linear layer's (``x rows^T``), whose weight rows stream through in order, 1.3-1.9x faster at
    1-96 rows than the ``[K, N]`` layout's strided panels.

    Not limited to :func:`enabled`: the SAE is the auditor's own, not the user's model.
    """
    if not _takes(x, weight, bias):
        return None
    fns = _loaded[0] if _loaded is not None else library()
    if (
        fns is None
        or x.dim() != 2
        or weight.dim() != 2
        or not 0 < x.shape[0] <= MAX_ROWS
        or x.shape[1] != weight.shape[0]
        or (bias is not None and bias.shape != (weight.shape[1],))
    ):
        return None
    x = x if x.is_contiguous() else x.contiguous()
    if callable(rows):
        rows = rows()
    if rows is not None and rows.shape == (weight.shape[1], weight.shape[0]) and rows.dtype == torch.float32 and rows.device.type == "cpu":
        return _call(fns.linear, x, rows, bias, weight.shape[1])
    return _call(fns.addmm_kn, x, weight, bias, weight.shape[1])


def topk_tail(
    pre: torch.Tensor,
    k: int,
    slot: torch.Tensor,
    m: int,
    place_slot: torch.Tensor,
    x: torch.Tensor,
    w_dec: torch.Tensor | None,
    b_dec: torch.Tensor,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """What a TopK SAE's encode of at most :data:`MAX_ROWS` rows does after its product, in one
    call: the ``k`` largest of each row of ``pre [N, D]`` ReLU'd (:func:`torch.topk`'s values, NaN
    above every number; among equal values at the k-th place the earlier latents, where
    :func:`torch.topk`'s choice is unspecified), those codes at the watched latents (``slot [D]``: each
    latent's slot in ``0..m``, ``m`` for the unwatched; ``place_slot [places]``: the slot each
    watched place reads) ``[N, places]``, and with ``w_dec`` the relative reconstruction error ``[N]`` of ``x``
    from the codes' ``w_dec`` rows plus ``b_dec``, times ``scale`` (undoing a global input scaling). None where it does not apply (see
    :func:`encoder_product`): the caller then runs torch's operations."""
    if (
        not _takes(pre, x, b_dec, w_dec)
        or any(t.device.type != "cpu" or t.dtype != torch.long for t in (slot, place_slot))
        or any(t is not None and not t.is_contiguous() for t in (pre, slot, place_slot, x, b_dec, w_dec))
        or pre.dim() != 2 or not 0 < pre.shape[0] <= MAX_ROWS or not 0 < k <= pre.shape[1]
        or slot.shape != (pre.shape[1],) or x.dim() != 2 or x.shape[0] != pre.shape[0]
        or b_dec.shape != (x.shape[1],) or (w_dec is not None and w_dec.shape != (pre.shape[1], x.shape[1]))
    ):
        return None
    fns = _loaded[0] if _loaded is not None else library()
    if fns is None:
        return None
    ptrs = _pointers(pre, slot, place_slot, w_dec, b_dec, x)
    if ptrs is None:  # torch.func's batched tensors, fake tensors: no storage
        return None
    n, places = pre.shape[0], place_slot.numel()
    out = torch.empty(n * places + n, dtype=torch.float32)
    p_pre, p_slot, p_place, p_dec, p_bias, p_x = ptrs
    if fns.topk_tail(p_pre, n, pre.shape[1], k, p_slot, m, p_place, places, p_dec, p_bias, p_x, x.shape[1], scale, out.data_ptr()):
        return None  # a slot outside 0..m, or no scratch memory: torch's operations say what is wrong
    return out[: n * places].view(n, places), (out[n * places :] if w_dec is not None else None)


def _call(fn: Any, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``fn`` on contiguous ``rows [M, K]``, ``weight`` and ``bias`` into a new ``[M, n]``; None where a
    tensor has no storage (see :func:`_pointers`)."""
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    out = rows.new_empty((rows.shape[0], n))
    pointers = _pointers(rows, weight, bias, out)
    if pointers is None:
        return None
    fn(*pointers, rows.shape[0], n, rows.shape[1], torch.get_num_threads())
    return out


def _run(fns: _Kernels, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool = True) -> torch.Tensor | None:
    """``F.linear`` by the kernel (from the weight's 4-bit form where it has one and ``pack``, see
    :func:`packed`); None where a tensor has no storage (see :func:`_pointers`)."""
    n, k = weight.shape
    m = math.prod(x.shape[:-1])  # not -1: with k = 0 the row count cannot be inferred
    rows = x.view(m, k) if x.is_contiguous() else x.reshape(m, k).contiguous()
    form = packed(weight) if m and pack else None
    out = None
    if form is not None:
        done = []

        def by_codes(x: int, w: int, b: int | None, y: int, m: int, n: int, k: int, threads: int) -> None:  # linear's arguments
            done.append(from_codes(fns, weight, form, x, w, b, y, m, n, k, threads))

        out = _call(by_codes, rows, weight, bias, n)
        if out is not None and not done[0]:
            out = None
    if out is None:
        out = _call(fns.linear, rows, weight, bias, n)
    return out.view(*x.shape[:-1], n) if out is not None else None


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward``, by the kernel inside :func:`enabled` for inputs it takes."""
    weight, bias = self.weight, self.bias
    # Outside enabled() (generation, the user's calls) only the first two cheap checks run;
    # compiled code (auditor.models.compile_layers) traces torch's product, so that check comes first.
    if (
        not torch.compiler.is_compiling()
        and getattr(_state, "depth", 0) > 0
        and 0 < x.numel() <= MAX_ROWS * x.shape[-1]
        and _takes(x, weight, bias)
    ):
        fns = _loaded[0] if _loaded is not None else None
        # The 4-bit form only of the module's registered weight: a parametrization's is a new tensor each call.
        out = _run(fns, x, weight, bias, self._parameters.get("weight") is weight) if fns is not None else None
        if out is not None:
            return out
    return nn.Linear.forward(self, x)


class _KernelForward:
    """A wrapped module's ``forward``: :func:`_forward` bound to it.

    Not a bound method: that pickles as ``getattr(module, "_forward")``, which a loaded module
    does not have, so ``torch.save`` / ``pickle`` of a model the auditor captured from would
    write a file that fails to load. This pickles and deep-copies with its module (a copy binds
    to the copy's weights).
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Linear) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self.module, x)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_KernelForward, (self.module,))


def wrapped(module: nn.Module) -> bool:
    """Whether :func:`install` wrapped ``module``'s ``forward``."""
    return isinstance(vars(module).get("forward"), _KernelForward)


def install(model: nn.Module) -> int:
    """Wrap ``model``'s ``nn.Linear`` modules (once); how many were wrapped now (0 where the kernel cannot run).

    The wrappers call the kernel only inside :func:`enabled`; elsewhere they are the modules'
    own ``forward``.
    """
    if getattr(model, _MARK, False):
        return 0
    setattr(model, _MARK, True)
    if library() is None:
        return 0
    done = 0
    for module in model.modules():
        # A module whose forward is already an instance attribute (offloading hooks, say) is left alone.
        if type(module) is nn.Linear and "forward" not in vars(module):
            # Bound to the module, so that a deep copy (or a pickled copy) of the model uses its own weights.
            module.forward = _KernelForward(module)  # type: ignore[method-assign, assignment]
            done += 1
    return done


def is_suspended() -> bool:
    """Whether this thread is inside :func:`suspended`."""
    return bool(getattr(_state, "off", False))


def suspended() -> AbstractContextManager[None]:
    """Torch's own products for this thread's forwards in the block, even inside :func:`enabled` (for comparisons)."""
    return _flagged("off")


@contextmanager
def enabled() -> Iterator[None]:
    """Let this thread's forwards in the block use the kernel in wrapped modules (:func:`install`)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
