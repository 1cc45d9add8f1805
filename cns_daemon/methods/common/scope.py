"""Token-scoped K/V values: a concept's trained K/V values act only on the prompts that name it,
and there only from its token's position on.

    scope = token_scope(pipe.unet)  # one per UNet, made on first use
    scope.add("rex", token_id, {tensor: (flat indices, value differences)})
    with scope.prompt(ids):         # ids: (batch, tokens), laid out as the UNet's batch is
        pipe.unet(...)              # K and V += m ⊙ (X ΔWᵀ) for each concept whose token is in ids
    scope.remove("rex")

Why. Written into the weights (the CNS paper's way), a concept's values change the keys and
values of every prompt: on the toy world every text channel is read by every prompt (Eq. 3
base/general overlap 0.98), so each concept moved the plain prompts (prior drop 0.219 after six)
and the concepts before it (forgetting 0.594). Scoped, a prompt without the concept's token sees
the base model exactly, and a concept's values never reach a prompt that does not name it. The
positions are those a causal text encoder lets the token influence: the token itself, the words
after it, EOS and the padding (docs/tuning.md "CNS scope": the token alone learned less, 0.469
vs 0.656 on c1).

How. Forward hooks on every cross-attention to_k / to_v (attn2): they compose with any attention
processor, layout guidance's included. Outside a `prompt` context, and for batch rows that hold
no concept token, a hook adds nothing.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cns_daemon.api.errors import Conflict, Internal

NO_TOKEN = -1   # pad value for ids rows that hold no token (the unconditional half of CFG)


def positions(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """(batch, tokens) bool: True from the first occurrence of `token_id` in a row to its end."""
    return (ids == token_id).cumsum(1) > 0


@dataclass
class _Concept:
    token_id: int
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]  # tensor → (flat indices, differences)


class TokenScope:
    def __init__(self, unet):
        self.modules: dict[str, torch.nn.Linear] = {
            f"{name}.weight": module for name, module in unet.named_modules()
            if name.endswith((".attn2.to_k", ".attn2.to_v"))}
        self.concepts: dict[str, _Concept] = {}
        self._training: tuple[int, dict[str, torch.Tensor]] | None = None
        # Per tensor: (row mask (batch, tokens, 1), the weight difference to apply there).
        self._active: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._training_rows: torch.Tensor | None = None   # the trained token's rows, this batch
        for tname, module in self.modules.items():
            module.register_forward_hook(self._hook(tname))

    # -- registry ---------------------------------------------------------------------------

    def add(self, name: str, token_id: int,
            deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        if name in self.concepts:
            raise Conflict(f"Concept {name!r} is already applied.")
        unknown = set(deltas) - set(self.modules)
        if unknown:
            raise Internal(f"{name}: no cross-attention K/V tensor {sorted(unknown)[0]!r}.")
        self.concepts[name] = _Concept(token_id, dict(deltas))

    def remove(self, name: str) -> None:
        self.concepts.pop(name, None)

    def names(self) -> list[str]:
        return list(self.concepts)

    @contextlib.contextmanager
    def training(self, token_id: int, live: dict[str, torch.Tensor]):
        """Inside: the weights of the tensors in `live` hold values being trained (written in,
        as CNS trains), and `live` copies of what they held before. Every UNet call then sees
        those values only on the token's rows: elsewhere the hook takes (weight − live) back out,
        so the gradient reaches the weight from those rows alone."""
        if self._training is not None:
            raise Internal("A scoped concept is already being trained on this model.")
        self._training = (token_id, live)
        try:
            yield
        finally:
            self._training = None

    # -- per batch --------------------------------------------------------------------------

    @contextlib.contextmanager
    def prompt(self, ids: torch.Tensor):
        """Inside: every UNet call sees the concepts whose tokens occur in `ids` (one row per
        batch sample, as the UNet's batch is laid out)."""
        active: dict[str, list] = {}
        device = next(iter(self.modules.values())).weight.device
        for concept in self.concepts.values():
            rows = positions(ids, concept.token_id)
            if not bool(rows.any()):
                continue
            for tname, (idx, diff) in concept.deltas.items():
                weight = self.modules[tname].weight
                dense = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
                dense.index_copy_(0, idx.to(weight.device), diff.to(weight.device, weight.dtype))
                active.setdefault(tname, []).append((rows.to(device)[..., None],
                                                     dense.view_as(weight)))
        outer = self._active, self._training_rows
        self._active = active
        if self._training is not None:
            self._training_rows = positions(ids, self._training[0]).to(device)[..., None]
        try:
            yield
        finally:
            self._active, self._training_rows = outer

    def _hook(self, tname: str):
        def hook(module, args, out):
            entries = self._active.get(tname, ())
            trained = self._training is not None and tname in self._training[1]
            if not entries and not trained:
                return None
            x = args[0]
            for rows, diff in entries:
                _check(rows, x)
                out = out + rows.to(out.dtype) * F.linear(x, diff)
            if trained:
                off = F.linear(x, module.weight - self._training[1][tname])
                rows = self._training_rows
                if rows is None:
                    out = out - off
                else:
                    _check(rows, x)
                    out = out - (1 - rows.to(out.dtype)) * off
            return out
        return hook


def _check(rows: torch.Tensor, x: torch.Tensor) -> None:
    if rows.shape[:2] != x.shape[:2]:
        raise Internal(f"Scoped K/V: the UNet's text batch is {tuple(x.shape[:2])}, "
                       f"the token ids {tuple(rows.shape[:2])}.")


_SCOPES: "weakref.WeakKeyDictionary[torch.nn.Module, TokenScope]" = weakref.WeakKeyDictionary()


def token_scope(unet) -> TokenScope:
    """The UNet's scope (made, and its hooks installed, on first use)."""
    scope = _SCOPES.get(unet)
    if scope is None:
        scope = _SCOPES[unet] = TokenScope(unet)
    return scope


def prompt_scope(unet, ids: torch.Tensor):
    """`scope.prompt(ids)` when the UNet has scoped concepts, else a context that does nothing."""
    scope = _SCOPES.get(unet)
    if scope is None or not (scope.concepts or scope._training):
        return contextlib.nullcontext()
    return scope.prompt(ids)
