"""Install TransformerLens-style hooks on a Hugging Face model for the duration of a block.

One hook shape: ``fn(tensor, *, hook) -> Tensor | None``. ``tensor`` is the activation
``[B, T, d_model]`` at ``hook`` (a :class:`Hookpoint`); returning ``None`` observes, returning a
tensor of the same shape replaces the activation for the rest of the forward pass.

Example::

    def zero(acts, *, hook):
        return torch.zeros_like(acts)

    with hooks(model, {"blocks.3.hook_resid_post": zero}):
        logits = model(input_ids).logits

Threads that share one model and run forwards at the same time (the sidecar's model workers)
call :func:`isolate_this_thread` first: hooks such a thread installs fire only on its own
forwards, and its forwards skip every other thread's hooks. Other threads keep the usual
module semantics (a hook fires on every forward), so a generation started on a helper thread
(a streamer, say) is still steered by a session entered on the main thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from auditor.errors import HookpointError, ModelError
from auditor.models.adapters import ArchitectureAdapter, get_adapter, replace_output, unwrap_output
from auditor.models.hookpoints import Hookpoint, parse_hookpoint

__all__ = ["HookFn", "hook_fires_here", "hooks", "isolate_this_thread", "resolve_hookpoints", "scoped", "thread_is_isolated"]

F = TypeVar("F", bound=Callable[..., Any])


class HookFn(Protocol):
    """``fn(tensor, *, hook) -> Tensor | None``: observe (None) or replace the activation."""

    def __call__(self, tensor: torch.Tensor, *, hook: Hookpoint) -> torch.Tensor | None: ...


HookSpec = Mapping[str | Hookpoint, HookFn] | Iterable[tuple[str | Hookpoint, HookFn]]


def resolve_hookpoints(
    model: nn.Module, names: Iterable[str | Hookpoint], adapter: ArchitectureAdapter | None = None
) -> list[Hookpoint]:
    """Parse ``names`` and check each layer against ``model``; raises :class:`HookpointError`."""
    adapter = adapter or get_adapter(model)
    n_layers = adapter.n_layers(model)
    model_name = _model_name(model)
    return [parse_hookpoint(name, n_layers, model_name) for name in names]


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", "") or ""
    return name or type(model).__name__


def _checked(result: torch.Tensor | None, original: torch.Tensor, hook: Hookpoint) -> torch.Tensor | None:
    if result is None:
        return None
    if not isinstance(result, torch.Tensor) or result.shape != original.shape:
        got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise HookpointError(
            f"hook on {hook.name} must return None or a tensor of shape {tuple(original.shape)}, got {got}"
        )
    return result


_local = threading.local()


def isolate_this_thread() -> None:
    """From now on, hooks installed on this thread fire only on its forwards, which skip other threads' hooks."""
    _local.isolated = True


def thread_is_isolated() -> bool:
    """Whether this thread called :func:`isolate_this_thread`."""
    return bool(getattr(_local, "isolated", False))


def scoped(hook: F, *, this_thread: bool = False) -> F:
    """Wrap a raw ``nn.Module`` hook with the thread rule of this module (see its docstring).

    :func:`hooks` wraps its own; use it for any other hook a caller registers on a shared model.
    ``this_thread``: fire only on forwards of the thread installing it, isolated or not (an
    audit's recording hook, which must neither fire in nor stop another thread's forward).
    """
    owner = threading.get_ident() if this_thread or thread_is_isolated() else None

    def run(*args: Any, **kwargs: Any) -> Any:
        if owner is None:
            if thread_is_isolated():
                return None
        elif threading.get_ident() != owner:
            return None
        return hook(*args, **kwargs)

    run._auditor_owner = owner  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]


_RAW = object()


def hook_fires_here(hook: Callable[..., Any]) -> bool:
    """Whether a hook registered on a module would run in this thread's forwards: one that
    :func:`scoped` wrapped by its thread rule, any other always."""
    owner = getattr(hook, "_auditor_owner", _RAW)
    if owner is _RAW:
        return True
    if owner is None:
        return not thread_is_isolated()
    return bool(owner == threading.get_ident())


def _pre_hook(fn: HookFn, hook: Hookpoint) -> Callable[..., Any]:
    # The decoder loops of all supported families pass hidden_states positionally, but a
    # caller (or a future release) may pass it by keyword: handle both.
    def run(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            hidden = args[0]
        elif "hidden_states" in kwargs:
            hidden = kwargs["hidden_states"]
        else:
            raise ModelError(f"cannot find hidden_states in the inputs of {type(module).__name__} for {hook.name}")
        new = _checked(fn(hidden, hook=hook), hidden, hook)
        if new is None:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    return run


def _post_hook(fn: HookFn, hook: Hookpoint) -> Callable[..., Any]:
    def run(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        tensor = unwrap_output(output)
        new = _checked(fn(tensor, hook=hook), tensor, hook)
        if new is None:
            return None
        return replace_output(output, new)

    return run


def _install(
    model: nn.Module, adapter: ArchitectureAdapter, hook: Hookpoint, fn: HookFn, this_thread: bool = False
) -> RemovableHandle:
    if hook.kind == "resid_pre":
        return adapter.layer(model, hook.layer).register_forward_pre_hook(
            scoped(_pre_hook(fn, hook), this_thread=this_thread), with_kwargs=True
        )
    if hook.kind == "resid_post":
        module = adapter.layer(model, hook.layer)
    elif hook.kind == "attn_out":
        module = adapter.attn_module(model, hook.layer)
    else:
        module = adapter.mlp_module(model, hook.layer)
    return module.register_forward_hook(scoped(_post_hook(fn, hook), this_thread=this_thread))


@contextmanager
def hooks(
    model: nn.Module, fns: HookSpec, *, adapter: ArchitectureAdapter | None = None, this_thread: bool = False
) -> Iterator[None]:
    """Install ``fns`` (hookpoint name -> hook function) on ``model`` for the ``with`` block.

    All names are validated before anything is installed; the hooks are always removed on
    exit, also when the block raises. Several hooks on one hookpoint run in the given order
    (pass ``(name, fn)`` pairs), each seeing the previous one's replacement. On a thread that
    called :func:`isolate_this_thread`, or with ``this_thread``, they fire only on that
    thread's forwards.
    """
    adapter = adapter or get_adapter(model)
    pairs = list(fns.items()) if isinstance(fns, Mapping) else list(fns)
    points = resolve_hookpoints(model, [name for name, _ in pairs], adapter)
    handles: list[RemovableHandle] = []
    try:
        for point, (_, fn) in zip(points, pairs):
            handles.append(_install(model, adapter, point, fn, this_thread))
        yield
    finally:
        for handle in handles:
            handle.remove()
