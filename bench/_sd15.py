"""An SD 1.5-shaped pipeline with seeded random weights, built from configs (no download), and
a scaled-down variant of the same architecture for smoke tests.

SD 1.5: UNet2DConditionModel with blocks (320, 640, 1280, 1280), 2 layers per block, 8 heads,
cross-attention width 768, CrossAttnDownBlock2D x3 + DownBlock2D / UpBlock2D + CrossAttnUpBlock2D
x3 (859.5M parameters; 32 K/V tensors, 19,169,280 K/V parameters); CLIPTextModel with width 768,
12 layers, 12 heads, MLP 3072; the SD VAE (blocks 128/256/512/512, 8x downsampling). Timings and
memory depend on shapes, not on weight values, so random weights measure what real ones would.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SD15_KV_PARAMS = 19_169_280


@dataclass(frozen=True)
class Shape:
    blocks: tuple[int, int, int, int]
    width: int            # text encoder width = cross-attention width
    text_layers: int
    text_heads: int
    text_mlp: int
    vae_blocks: tuple[int, int, int, int]
    groups: int


SD15 = Shape((320, 640, 1280, 1280), 768, 12, 12, 3072, (128, 256, 512, 512), 32)
# Same architecture at about 1/10 width: builds and steps in well under a second.
SMALL = Shape((32, 64, 128, 128), 96, 2, 12, 192, (32, 32, 32, 32), 16)


def _fill(modules, seed: int) -> None:
    """Cheap seeded random weights for modules built on the meta device: default init draws
    860M random numbers (about a minute on a busy 2-core CPU, per process); here each weight
    tensor is a slice of one random pool of 2^22 uniforms at a per-tensor offset, scaled by
    1/sqrt(fan_in) as PyTorch's default init is; norm scales are 1 and biases 0."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.rand(1 << 22, generator=gen) * 2 - 1
    with torch.no_grad():
        for module in modules:
            module.to_empty(device="cpu")
            for name, p in module.named_parameters():
                flat = p.view(-1)
                if p.dim() >= 2:
                    pos = int(torch.randint(0, pool.numel(), (1,), generator=gen))
                    done = 0
                    while done < flat.numel():  # consecutive pool slices, wrapping around
                        take = min(flat.numel() - done, pool.numel() - pos)
                        flat[done:done + take] = pool[pos:pos + take]
                        done, pos = done + take, 0
                    flat.mul_(p[0].numel() ** -0.5)
                else:
                    flat.fill_(1.0 if name.endswith("weight") else 0.0)
            for name, b in module.named_buffers():
                if name.endswith("position_ids"):
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))


def build(shape: Shape = SD15, image_size: int = 256, seed: int = 0):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from cns_daemon.tokenizer import clip_tokenizer

    with torch.device("meta"):
        unet, vae, text = _modules(shape, image_size)
    _fill((unet, vae, text), seed)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _modules(shape: Shape, image_size: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=shape.blocks, cross_attention_dim=shape.width, attention_head_dim=8,
        norm_num_groups=shape.groups,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=shape.vae_blocks, norm_num_groups=shape.groups, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=shape.width, intermediate_size=shape.text_mlp,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=shape.width, hidden_act="quick_gelu"))
    return unet, vae, text
