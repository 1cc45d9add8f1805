"""Token-scoped K/V values: a concept's trained K/V values act only on the prompts that name it,
and there only on its own words and the end of the sequence.

    scope = token_scope(pipe.unet)  # one per UNet, made on first use
    scope.add("rex", anchor(tokenizer, "sks", "dog"), {tensor: (flat indices, target values)})
    with scope.prompt(ids):         # ids: (batch, tokens), laid out as the UNet's batch is
        pipe.unet(...)              # K and V += m ⊙ (X ΔWᵀ) for each concept whose token is in ids,
                                    # ΔW = its targets − the live weights there, at this prompt
    scope.remove("rex")

Why. Written into the weights (the CNS paper's way), a concept's values change the keys and
values of every prompt: on the toy world every text channel is read by every prompt (Eq. 3
base/general overlap 0.98), so each concept moved the plain prompts (prior drop 0.219 after six)
and the concepts before it (forgetting 0.594). Scoped, a prompt without the concept's token sees
the base model exactly, and a concept's values never reach a prompt that does not name it. Where
they act (docs/tuning.md "CNS scope"): the concept's words (its token and the class word after
it) and the end of the sequence (EOS and the padding), which on the toy world carries the look
(without it the look read 0.09 instead of 0.68). Not the other words of the prompt: there the
values cost two concepts in one prompt their boxes (composition 0.010 vs 0.073, placement 0.31
vs 0.38) and helped nothing. Training captions end with the class word, so this is every
position from the token on while learning.

Two concepts in one prompt share the end of the sequence: the positions from EOS on are dealt out
in turn (the first concept named gets EOS, EOS+2, ..., the second EOS+1, EOS+3, ...), so each
concept's values act on its own share and layout guidance can steer each share into its
concept's box (`shared_tails`; guidance.py). Added up on every position, two concepts' values
drew one object mixing both looks; dealt out and guided, both shapes landed in their boxes
0.396 of the time instead of 0.062 in the six-concept bench (docs/tuning.md, "Two concepts
share the end of the sequence"). A prompt with one concept keeps the whole end. In generation
the end is dealt among every concept the prompt names, of any method (`generate.prompt_tails`,
passed in as `tails`): a CNS concept beside a Cones 2 one kept all of it before, and guidance put
the other's shape in its box.

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
from cns_daemon.methods.common.tokens import concept_ids, token_ids

NO_TOKEN = -1   # pad value for ids rows that hold no token (the unconditional half of CFG)


@dataclass(frozen=True)
class Anchor:
    """Where a concept's values act in a row of token ids."""
    token_id: int
    span: int      # the token and the class word's tokens after it
    eos_id: int

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(batch, tokens) bool: the `span` positions from each occurrence of the token, and, in
        rows that hold it, every position from the first EOS on."""
        hit = ids == self.token_id
        out = hit.clone()
        for k in range(1, self.span):
            out[:, k:] |= hit[:, :-k]
        tail = (ids == self.eos_id).cumsum(1) > 0
        return out | (tail & hit.any(1, keepdim=True))


def scope_of(record) -> str:
    """Where a CNS or Cones concept's values act, from its hparams: `concept` (in the token
    scope) or `all` (written into the weights; records from before the option)."""
    return str(record.meta.hparams.get("scope", "all"))


def anchor(tokenizer, token: str, class_word: str) -> Anchor:
    """The anchor of a concept whose prompts read "<token> <class word>" (the token one rare
    word or several: the first one marks the concept, rare words being the concept's own)."""
    ids = concept_ids(tokenizer, token)
    return Anchor(ids[0], len(ids) + len(token_ids(tokenizer, class_word)),
                  int(tokenizer.eos_token_id))


def tail_shares(eos: int, n_tokens: int, k: int) -> list[range]:
    """The positions from `eos` to the end dealt out in turn to `k` concepts."""
    return [range(eos + j, n_tokens, k) for j in range(k)]


@dataclass
class _Concept:
    anchor: Anchor
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]]  # tensor → (flat indices, values)


def _on_host(idx, values, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A concept's values as the scope keeps them between prompts: in host memory, as stored
    (float16 for a CNS record), the indices as int32 where the tensor allows. Why: every
    applied concept is held for the service's life, and on a GPU its values (millions of
    positions at SD 1.5 size) would bound how many concepts fit beside the model; a prompt moves
    only the concepts it names to the device, for its own length (`TokenScope.prompt`). int32
    positions take half the bytes of int64 ones.

    Targets, not differences to the weights as they were when it was added: what lies below a
    concept can change while it is applied (an older written concept removed, a Cones concept
    written for one request), and a difference taken earlier then drew other values than its
    own until a restart rebuilt it (a review's find)."""
    kind = torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64
    return torch.as_tensor(idx).detach().to("cpu", kind), torch.as_tensor(values).detach().to("cpu")


class TokenScope:
    def __init__(self, unet):
        self.modules: dict[str, torch.nn.Linear] = {
            f"{name}.weight": module for name, module in unet.named_modules()
            if name.endswith((".attn2.to_k", ".attn2.to_v"))}
        self.concepts: dict[str, _Concept] = {}
        self._training: tuple[Anchor, dict[str, torch.Tensor]] | None = None
        # Per tensor: (row mask (batch, tokens, 1), the weight difference to apply there).
        self._active: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._training_rows: torch.Tensor | None = None   # the trained token's rows, this batch
        for tname, module in self.modules.items():
            module.register_forward_hook(self._hook(tname))

    # -- registry ---------------------------------------------------------------------------

    def add(self, name: str, where: Anchor, targets: dict[str, tuple]) -> None:
        """`targets`: tensor name → (flat positions, the values the concept holds there), as
        numpy arrays or tensors."""
        if name in self.concepts:
            raise Conflict(f"Concept {name!r} is already applied.")
        unknown = set(targets) - set(self.modules)
        if unknown:
            raise Internal(f"{name}: no cross-attention K/V tensor {sorted(unknown)[0]!r}.")
        self.concepts[name] = _Concept(where, {
            tname: _on_host(idx, values, self.modules[tname].weight.numel())
            for tname, (idx, values) in targets.items()})

    def remove(self, name: str) -> None:
        self.concepts.pop(name, None)

    def names(self) -> list[str]:
        return list(self.concepts)

    def shared_tails(self, ids_row: torch.Tensor) -> dict[str, list[int]]:
        """For one row of token ids: the positions from EOS on where each applied concept it
        names acts (`tail_shares`, in the order the concepts first occur; one concept keeps
        the whole end). Empty for a row naming none."""
        first: dict[str, int] = {}
        eos_id = None
        for name, concept in self.concepts.items():
            hit = (ids_row == concept.anchor.token_id).nonzero()
            if len(hit):
                first[name], eos_id = int(hit[0]), concept.anchor.eos_id
        eos = (ids_row == eos_id).nonzero() if eos_id is not None else []
        if not first or not len(eos):
            return {}
        order = sorted(first, key=first.get)
        shares = tail_shares(int(eos[0]), int(ids_row.shape[0]), len(order))
        return {name: list(share) for name, share in zip(order, shares)}

    @contextlib.contextmanager
    def training(self, where: Anchor, live: dict[str, torch.Tensor]):
        """Inside: the weights of the tensors in `live` hold values being trained (written in,
        as CNS trains), and `live` copies of what they held before. Every UNet call then sees
        those values only where the anchor says: elsewhere the hook takes (weight − live) back out,
        so the gradient reaches the weight from those rows alone."""
        if self._training is not None:
            raise Internal("A scoped concept is already being trained on this model.")
        self._training = (where, live)
        try:
            yield
        finally:
            self._training = None

    # -- per batch --------------------------------------------------------------------------

    @contextlib.contextmanager
    def prompt(self, ids: torch.Tensor, tails: dict[str, list[int]] | None = None):
        """Inside: every UNet call sees the concepts whose tokens occur in `ids` (one row per
        batch sample, as the UNet's batch is laid out). `tails`: the end of the sequence as the
        caller dealt it among every concept of the prompt, of any method (generation); without
        it, several of this scope's concepts in a row share it among themselves."""
        active: dict[str, list] = {}
        device = next(iter(self.modules.values())).weight.device
        rows_of = {name: concept.anchor.rows(ids) for name, concept in self.concepts.items()}
        rows_of = {name: rows for name, rows in rows_of.items() if bool(rows.any())}
        if tails is not None:
            for name, rows in rows_of.items():
                if len(tails) > 1 and name in tails:
                    rows &= _share_mask(tails, name, ids.shape[1]).to(rows.device)
        elif len(rows_of) > 1:
            _deal_tails(self, ids, rows_of)
        for name, rows in rows_of.items():
            concept = self.concepts[name]
            for tname, (idx, values) in concept.targets.items():
                weight = self.modules[tname].weight
                idx = idx.to(weight.device, torch.int64)
                below = weight.detach()   # what lies below now; while a concept trains, the
                if self._training is not None and tname in self._training[1]:   # weights without it
                    below = self._training[1][tname]
                live = below.reshape(-1).index_select(0, idx)
                dense = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
                dense.index_copy_(0, idx, values.to(weight.device, weight.dtype) - live)
                active.setdefault(tname, []).append((rows.to(device)[..., None],
                                                     dense.view_as(weight)))
        outer = self._active, self._training_rows
        self._active = active
        if self._training is not None:
            self._training_rows = self._training[0].rows(ids).to(device)[..., None]
        try:
            yield
        finally:
            self._active, self._training_rows = outer

    def as_now(self):
        """A context factory that puts the per-batch state (the active rows and values, the
        trained ones) back as it is now: gradient checkpointing recomputes a block's forward
        in backward, after this batch's `prompt` context has closed, and the hooks must act
        the same there (`recompute_context`)."""
        state = (self._active, self._training_rows, self._training)

        @contextlib.contextmanager
        def restored():
            outer = (self._active, self._training_rows, self._training)
            self._active, self._training_rows, self._training = state
            try:
                yield
            finally:
                self._active, self._training_rows, self._training = outer

        return restored

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


def _deal_tails(scope: TokenScope, ids: torch.Tensor, rows_of: dict[str, torch.Tensor]) -> None:
    """In each batch row naming several concepts, keep each concept's end-of-sequence positions
    to its own share (in place)."""
    for b in range(ids.shape[0]):
        shares = scope.shared_tails(ids[b])
        if len(shares) < 2:
            continue
        for name in shares:
            rows_of[name][b] &= _share_mask(shares, name, ids.shape[1]).to(rows_of[name].device)


def _share_mask(shares: dict[str, list[int]], name: str, n_tokens: int) -> torch.Tensor:
    """(n_tokens,) bool: every position before the end of the sequence, and `name`'s share of it."""
    keep = torch.zeros(n_tokens, dtype=torch.bool)
    # A prompt of (nearly) 77 tokens leaves some concepts no share of its end: empty ones
    keep[:min((share[0] for share in shares.values() if share), default=n_tokens)] = True
    keep[shares[name]] = True
    return keep


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


def recompute_context(unet):
    """For a checkpointed block run now: a factory of the context its recomputation runs in
    (the scope's state at this forward), or of an empty one when the UNet has no scope."""
    scope = _SCOPES.get(unet)
    return scope.as_now() if scope is not None else contextlib.nullcontext


@contextlib.contextmanager
def training_suspended(unet):
    """Inside: the UNet's scope trains nothing, for a generate that a paused learn lets run (its
    `aside`, with the trained values already taken off). Left open, the scope went on taking
    (weight − the copy from the learn's start) out of every row: a Cones concept written into
    the weights for that generate (scope `all`) was taken back out, and it drew without it (a
    review's find)."""
    scope = _SCOPES.get(unet)
    held = scope._training if scope is not None else None
    if held is not None:
        scope._training = None
    try:
        yield
    finally:
        if held is not None:
            scope._training = held


def prompt_scope(unet, ids: torch.Tensor, tails: dict[str, list[int]] | None = None):
    """`scope.prompt(ids, tails)` when the UNet has scoped concepts, else a context that does
    nothing."""
    scope = _SCOPES.get(unet)
    if scope is None or not (scope.concepts or scope._training):
        return contextlib.nullcontext()
    return scope.prompt(ids, tails)
