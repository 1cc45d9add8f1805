"""Layout guidance (Cones 2, Eq. 7): steer each concept into its box through cross-attention.

In every cross-attention layer (`attn2`), for the conditional half of the classifier-free-guidance
batch only, the attention logits S = QKᵀ·scale get a bias before the softmax:

    S' = S + η(t) · M,      η(t) = w · log(1 + σ_t²) · std(S),      σ_t² = (1 − ᾱ_t) / ᾱ_t

M has one row per image position of the layer and one column per text token. For a concept with
a box, its token columns hold γ⁺ (default 2.5) at positions inside its box and γ⁻ where it must
not be: with `suppress = "outside"` (the default) everywhere outside its own box, as the public
Cones 2 code does (there with a weight of −1e8), with `suppress = "others"` inside the other
concepts' boxes only (its own box wins where boxes overlap; everything else is 0). For two boxes
that tile the image they are one bias, and with margins they measured alike; a box alone moves
its concept only with "outside" (docs/tuning.md, "One box").

Choices the paper leaves open, fixed here:
- γ⁻ = −1e4. With η(t) around 0.1–3 for SD-like logits, η·γ⁻ is −1e3…−3e4: the concept gets no
  attention in the other boxes (exp underflows) while staying finite in fp16 (max 65504), so no
  softmax row can turn into NaN. Near the end of sampling σ_t → 0, so the bias fades out.
- std(S) is taken per (sample, head) over the logits of a strided subsample of at most
  `std_rows` image positions (all of them at low resolutions). A 256-row sample estimates the
  std of a 4096-row map to within a few percent and costs 1/16 of the logits of a 64×64 layer,
  so a guided step costs one SDPA call with an additive mask plus that, not a second UNet pass.
- The bias goes to F.scaled_dot_product_attention as `attn_mask`, with the layer's own scale;
  the unconditional half of a CFG batch is a separate unmasked call (fast kernels, no zeros).
- Boxes are resampled to a layer's grid by rounding their edges to the nearest cell edge, and
  always keep at least one cell; a layer's grid (h, w) is the latent grid downsampled by the
  power of two whose ceil-rounded size has h·w equal to the layer's query length (SD's stride-2
  convolutions round up), which also covers non-square images.
- A token-scoped CNS concept carries its look at the end of the sequence too (EOS on; see
  methods/common/scope.py), so its column holds those positions as well as its words (`tails`):
  all of them for the one such concept of a prompt, a share each when several share it. Without
  them one CNS concept's box moved nothing (docs/tuning.md, "One box").
- Guidance runs for the first `steps` denoising steps (None: all of them, as the paper does);
  later steps, and layers/calls without text (self-attention), use the layer's previous
  processor unchanged.

The processor learns the step from a GuidanceState that the generation routine advances from the
pipeline's `callback_on_step_end`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cns_daemon.api.errors import BadInput, Internal
from cns_daemon.prompts import ExpandedPrompt, Layout

GAMMA_POS = 2.5
GAMMA_NEG = -1e4
SUPPRESS = ("others", "outside")


@dataclass
class GuidanceConfig:
    weight: float = 0.075          # w in η(t); the paper's range is 0.05–0.1
    steps: int | None = None       # guide the first N steps; None = every step
    gamma_pos: float = GAMMA_POS
    gamma_neg: float = GAMMA_NEG
    suppress: str = "outside"      # where γ⁻ goes: everywhere outside its own box | other concepts' boxes
    std_rows: int = 256            # image positions sampled for std(QKᵀ)

    def __post_init__(self):
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise BadInput(f"Guidance weight must be a finite number >= 0, not {self.weight}.")
        if self.steps is not None and self.steps < 0:
            raise BadInput(f"Guidance steps must be >= 0, not {self.steps}.")
        if self.std_rows < 1:
            raise BadInput(f"std_rows must be >= 1, not {self.std_rows}.")
        if self.suppress not in SUPPRESS:
            raise BadInput(f"Guidance suppress must be one of {', '.join(SUPPRESS)}, not {self.suppress!r}.")


@dataclass
class GuidanceState:
    """What the processors share for one request: the step, each step's σ_t², whether the UNet
    batch is [uncond, cond] (CFG) or conditional only, and the latent grid."""
    sigma2: list[float]            # σ_t² of each denoising step, in sampling order
    latent_hw: tuple[int, int]
    cfg: bool = True
    step: int = 0

    @classmethod
    def for_scheduler(cls, scheduler, num_steps: int, latent_hw: tuple[int, int],
                      cfg: bool) -> "GuidanceState":
        """Precompute σ_t² for the timesteps the pipeline will use (set_timesteps is
        deterministic; the pipeline calls it again with the same arguments)."""
        scheduler.set_timesteps(num_steps)
        alphas = scheduler.alphas_cumprod.to(torch.float64)
        sigma2 = [float((1 - alphas[int(t)]) / alphas[int(t)]) for t in scheduler.timesteps]
        return cls(sigma2, latent_hw, cfg)

    def on_step_end(self, step_index: int) -> None:
        self.step = step_index + 1


def box_cells(box, h: int, w: int) -> torch.Tensor:
    """(h, w) bool grid of the cells a box covers at this resolution."""
    def span(a: float, b: float, n: int) -> tuple[int, int]:
        lo, hi = round(a * n), round(b * n)
        lo = min(lo, n - 1)
        return lo, max(hi, lo + 1)
    r0, r1 = span(box.y0, box.y1, h)
    c0, c1 = span(box.x0, box.x1, w)
    grid = torch.zeros(h, w, dtype=torch.bool)
    grid[r0:r1, c0:c1] = True
    return grid


def layer_grid(n_queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of a layer with `n_queries` image positions."""
    h, w = latent_hw
    for _ in range(12):
        if h * w == n_queries:
            return h, w
        h, w = -(-h // 2), -(-w // 2)
    raise Internal(f"Cannot place {n_queries} attention positions on a {latent_hw} latent grid.")


@dataclass
class LayoutBias:
    """M for one prompt and layout, built once per layer resolution."""
    layout: Layout
    expanded: ExpandedPrompt
    n_tokens: int
    config: GuidanceConfig
    tails: dict[str, list[int]] = field(default_factory=dict)   # concept → its end-of-sequence share
    _cache: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def matrix(self, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(h·w, n_tokens) float32 matrix M, kept per device (a GPU gets it copied once)."""
        key = (h, w, str(device))
        if key not in self._cache:
            base = self._cache.get((h, w, "cpu"))
            if base is None:
                base = self._cache[(h, w, "cpu")] = self._build(h, w)
            self._cache[key] = base.to(device)
        return self._cache[key]

    def _build(self, h: int, w: int) -> torch.Tensor:
        cells = {b.name: box_cells(b, h, w).flatten() for b in self.layout.boxes}
        m = torch.zeros(h * w, self.n_tokens)
        for name, inside in cells.items():
            if self.config.suppress == "outside":
                others = ~inside
            else:
                others = torch.zeros(h * w, dtype=torch.bool)
                for other, o_inside in cells.items():
                    if other != name:
                        others |= o_inside
            column = torch.zeros(h * w)
            column[others] = self.config.gamma_neg
            column[inside] = self.config.gamma_pos   # own box wins over others'
            own = set(self.expanded.positions(name)) | set(self.tails.get(name, ()))
            cols = sorted(p for p in own if p < self.n_tokens)
            m[:, cols] = column[:, None]
        return m


def logit_std(query: torch.Tensor, key: torch.Tensor, scale: float, rows: int) -> torch.Tensor:
    """std of QKᵀ·scale per (sample, head), over a strided subsample of at most `rows` queries.
    query (B, H, N, D), key (B, H, T, D) → (B, H, 1, 1)."""
    n = query.shape[2]
    stride = max(1, -(-n // rows))
    sample = query[:, :, ::stride].float() @ key.float().transpose(-1, -2) * scale
    return sample.std(dim=(-2, -1), correction=0, keepdim=True)


class LayoutAttnProcessor:
    """Cross-attention with the layout bias on the conditional half; otherwise `fallback`."""

    def __init__(self, bias: LayoutBias, state: GuidanceState, config: GuidanceConfig, fallback):
        self.bias, self.state, self.config, self.fallback = bias, state, config, fallback

    def eta_factor(self) -> float | None:
        """w · log(1 + σ_t²) for the current step, or None when this step is not guided."""
        step = self.state.step
        limit = len(self.state.sigma2) if self.config.steps is None else self.config.steps
        if step >= min(limit, len(self.state.sigma2)):
            return None
        return self.config.weight * math.log1p(self.state.sigma2[step])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        factor = self.eta_factor()
        if factor is None or encoder_hidden_states is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 *args, **kwargs)
        return self.guided(attn, hidden_states, encoder_hidden_states, attention_mask, temb, factor)

    def guided(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, factor):
        # Same steps as diffusers' SDPA processor, with the bias added to the mask.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, n_queries, _ = hidden_states.shape
        n_tokens = encoder_hidden_states.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, n_tokens, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attend(query, key, value, attention_mask, attn.scale, factor)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(self, query, key, value, attention_mask, scale: float, factor: float):
        """SDPA with η·M added on the conditional samples. With CFG the unconditional half is a
        separate, unmasked call, so it keeps the fast kernels and no zero mask is built for it."""
        batch, heads, n_queries, _ = query.shape
        first = 0
        if self.state.cfg:
            if batch % 2:
                raise Internal(f"A CFG batch must be even, got {batch}.")
            first = batch // 2
        h, w = layer_grid(n_queries, self.state.latent_hw)
        m = self.bias.matrix(h, w, query.device)
        q, k, v = query[first:], key[first:], value[first:]
        eta = factor * logit_std(q, k, scale, self.config.std_rows)
        bias = (eta * m).to(query.dtype)
        if attention_mask is not None:
            bias = bias + attention_mask[first:]
        cond = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0,
                                              is_causal=False, scale=scale)
        if not first:
            return cond
        plain_mask = attention_mask[:first] if attention_mask is not None else None
        uncond = F.scaled_dot_product_attention(query[:first], key[:first], value[:first],
                                                attn_mask=plain_mask, dropout_p=0.0,
                                                is_causal=False, scale=scale)
        return torch.cat([uncond, cond])


def cross_attention_modules(unet) -> dict[str, torch.nn.Module]:
    """The UNet's cross-attention (`attn2`) modules by name."""
    return {name: mod for name, mod in unet.named_modules()
            if name.endswith("attn2") and getattr(mod, "is_cross_attention", False)}


@contextmanager
def layout_guidance(unet, bias: LayoutBias, state: GuidanceState, config: GuidanceConfig):
    """Install the layout processor on every attn2 layer for one request; the previous
    processors (the very same objects) are back afterwards, whatever happens."""
    modules = cross_attention_modules(unet)
    previous = {name: mod.processor for name, mod in modules.items()}
    try:
        for name, mod in modules.items():
            mod.set_processor(LayoutAttnProcessor(bias, state, config, previous[name]))
        yield
    finally:
        for name, mod in modules.items():
            mod.set_processor(previous[name])
