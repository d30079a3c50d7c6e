"""``auditor.attach(model, tokenizer)``: audit and steer a user's own ``transformers`` model in place.

The session installs one hook at the SAE hookpoint and one forward pre-hook on
the model. Every forward pass, including each step inside ``model.generate``,
computes the SAE features the policy watches, evaluates the policy's rules
that have ``steer`` actions on each sequence so far and applies the session's
steering: such a rule switches its interventions on for the rest of that
sequence. ``session.verdicts`` evaluates the whole policy on the sequences so
far when read. A forward without a KV cache (or with an empty one) starts new
sequences; a forward that continues a cache extends them. All hooks are removed
when the ``with`` block ends.

Example::

    import auditor

    with auditor.attach(model, tokenizer, policy="policies/default.yaml") as session:
        session.steer("deception.false_notice=clamp:0")
        out = model.generate(**tokenizer("Tell me how to", return_tensors="pt"), max_new_tokens=20)
        print(session.last_verdict.action)
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from auditor.errors import ConfigError
from auditor.steering._hook import SteeringHook, Trigger
from auditor.steering.interventions import Intervention, SteeringLimits, resolve_interventions

if TYPE_CHECKING:
    from auditor.features import FeatureLibrary
    from auditor.policy import PolicyEngine, Verdict
    from auditor.sae import SAE

__all__ = ["Session", "attach"]

_SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152}


def _is_default_model(model: Any) -> bool:
    """SmolLM2-135M(-Instruct), recognized by name or by its shape (a GGUF load has no hub name)."""
    cfg = getattr(model, "config", None)
    name = str(getattr(cfg, "name_or_path", "") or "").lower()
    if "smollm2-135m" in name:
        return True
    return cfg is not None and all(getattr(cfg, k, None) == v for k, v in _SMOLLM2.items())


class Session:
    """A model with auditing and steering hooks installed; use as a context manager (see :func:`attach`)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        sae: SAE,
        *,
        hookpoint: str,
        library: FeatureLibrary | None,
        policy: PolicyEngine | None,
        limits: SteeringLimits | None = None,
        policy_every: int = 1,
    ) -> None:
        from auditor.models import resolve_hookpoints

        resolve_hookpoints(model, [hookpoint])
        self.model = model
        self.tokenizer = tokenizer
        self.sae = sae
        self.hookpoint = hookpoint
        self.library = library
        self.policy = policy
        self.limits = limits
        self.policy_every = policy_every
        self._interventions: list[Intervention | dict[str, Any] | str] = []
        self._special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)
        self._stack: ExitStack | None = None
        self._hook = self._build_hook()

    # ------------------------------------------------------------------ public

    def steer(self, *interventions: Intervention | dict[str, Any] | str) -> Session:
        """Add interventions for every following forward pass (checked against the limits).

        Call it between generations: it starts a fresh record, so the verdicts of
        the sequence in progress restart from the next forward.
        """
        candidate = [*self._interventions, *interventions]
        resolve_interventions(candidate, library=self.library, d_sae=self.sae.cfg.d_sae, limits=self.limits)
        self._interventions = candidate
        self._hook = self._build_hook()
        return self

    def clear_steering(self) -> None:
        """Remove the interventions added with :meth:`steer` (policy-triggered ones reset per sequence)."""
        self._interventions = []
        self._hook = self._build_hook()

    @property
    def verdicts(self) -> list[Verdict]:
        """The policy's verdict on each sequence of the latest batch, as generated so far (evaluated on access)."""
        return list(self._hook.evaluate() or [])

    @property
    def last_verdict(self) -> Verdict | None:
        """The verdict on the last sequence of the latest batch (None without a policy or before a forward)."""
        v = self._hook.evaluate()
        return v[-1] if v else None

    @property
    def triggered(self) -> list[Trigger]:
        """Rules that switched steering on in the latest batch."""
        return list(self._hook.triggers)

    def features(self) -> Tensor | None:
        """The recorded activations ``[B, T, U]`` of the latest batch (steered and watched latents)."""
        return self._hook.history()["features"] if self._hook._feats else None

    @property
    def latents(self) -> list[int]:
        """The latent index of each column of :meth:`features`."""
        return [int(i) for i in self._hook.steerer.latents.tolist()]

    def close(self) -> None:
        """Remove every hook (also done on leaving the ``with`` block)."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def __enter__(self) -> Session:
        from auditor.models import hooks
        from auditor.models.hooks import scoped

        if self._stack is not None:
            # A second set of hooks would replace the first's handles, which then stayed on the model.
            raise ConfigError(
                "this session is already attached (its with block is open); use it as it is, "
                "or call auditor.attach(...) again for a second session"
            )
        stack = ExitStack()
        try:
            # Dispatch through a method so steer() can swap the hook object mid-session.
            stack.enter_context(hooks(self.model, {self.hookpoint: self._on_hookpoint}))
            handle = self.model.register_forward_pre_hook(scoped(self._on_forward), with_kwargs=True)
            stack.callback(handle.remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ hooks

    def _build_hook(self) -> SteeringHook:
        user = resolve_interventions(
            self._interventions, library=self.library, d_sae=self.sae.cfg.d_sae, limits=self.limits
        )
        return SteeringHook(
            self.sae,
            user,
            engine=self.policy,
            library=self.library,
            limits=self.limits,
            policy_every=self.policy_every,
        )

    def _on_hookpoint(self, tensor: Tensor, *, hook: Any) -> Tensor:
        return self._hook(tensor, hook=hook)

    def _on_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            # inputs_embeds: no token ids to tell special tokens apart; every position counts.
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                return
            ids = torch.full(embeds.shape[:2], -1, dtype=torch.long, device=embeds.device)
        b, t = ids.shape
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        length = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        new = cache is None or length == 0
        attn = kwargs.get("attention_mask")
        real = attn[:, -t:].to(torch.bool) if attn is not None and attn.shape[-1] >= t else torch.ones(b, t, dtype=torch.bool, device=ids.device)
        mask = real & ~torch.isin(ids, self._special.to(ids.device))
        if new:
            user_rows = torch.ones(b, dtype=torch.bool) if self._interventions else torch.zeros(b, dtype=torch.bool)
            self._hook.reset(b, user_rows)
            # The first real token of each row is the attention sink: never content.
            first = real.to(torch.long).cumsum(dim=1) == 1
            mask = mask & ~first
        self._hook.set_positions(mask, torch.full((b, t), not new, dtype=torch.bool, device=ids.device))


def attach(
    model: Any,
    tokenizer: Any,
    *,
    sae: SAE | str | os.PathLike[str] | None = None,
    library: FeatureLibrary | str | os.PathLike[str] | None = None,
    policy: PolicyEngine | str | os.PathLike[str] | None = None,
    hookpoint: str | None = None,
    limits: SteeringLimits | None = None,
    policy_every: int = 1,
) -> Session:
    """Attach the auditor to a user's ``transformers`` model; use the result in a ``with`` block.

    ``sae``, ``library`` and ``policy`` are objects or paths; without a ``sae``, the
    SAE comes from the library (the policy's, or ``library``), and for
    SmolLM2-135M from the default library. ``hookpoint`` defaults to the SAE's.

    ``model`` is a supported ``transformers`` model object (it stays as it is: device, dtype,
    train or eval mode, gradients) and ``tokenizer`` its own tokenizer, which tells special
    tokens apart from content; raises :class:`~auditor.errors.ModelError` otherwise.
    """
    from auditor.features import FeatureLibrary, load_library
    from auditor.models import check_model_and_tokenizer
    from auditor.policy import PolicyEngine, load_policy
    from auditor.sae import SAE, load_sae

    check_model_and_tokenizer(model, tokenizer, "attach()")
    engine = policy if isinstance(policy, PolicyEngine) or policy is None else load_policy(policy)
    lib: FeatureLibrary | None
    if isinstance(library, FeatureLibrary):
        lib = library
    elif library is not None:
        lib = load_library(library)
    else:
        lib = engine.library if engine is not None else None
    if lib is None and sae is None:
        if not _is_default_model(model):
            raise ConfigError(
                "attach() needs an SAE for this model: pass sae=PATH (or an SAE) and optionally "
                "library=PATH; only SmolLM2-135M has a default"
            )
        from auditor.pipeline import DEFAULT_LIBRARY

        lib = load_library(DEFAULT_LIBRARY)
    device = next(iter(model.parameters())).device
    if isinstance(sae, SAE):
        sae_obj = sae
    elif sae is not None:
        sae_obj = load_sae(str(sae), device=device, dtype=torch.float32)
    elif lib is not None:
        sae_obj = load_sae(str(lib.resolve_path(lib.sae.path)), device=device, dtype=torch.float32)
    else:
        raise ConfigError("attach() needs sae=PATH or a library that names its SAE")
    hook = hookpoint or sae_obj.cfg.metadata.hook_name or (lib.sae.hookpoint if lib is not None else None)
    if not hook:
        raise ConfigError("the SAE does not say which hookpoint it reads; pass hookpoint='blocks.N.hook_resid_post'")
    d_model = getattr(getattr(model, "config", None), "hidden_size", None)
    if d_model is not None and d_model != sae_obj.cfg.d_in:
        raise ConfigError(
            f"the SAE reads d_in={sae_obj.cfg.d_in} but the model's hidden size is {d_model}; "
            "use an SAE trained on this model"
        )
    from auditor.pipeline import check_fit

    check_fit(sae_obj, library=lib, policy=engine, hookpoint=hook)  # the parts belong together
    return Session(model, tokenizer, sae_obj, hookpoint=hook, library=lib, policy=engine, limits=limits, policy_every=policy_every)

