"""A diffusers SD 1.x pipeline written back in the original (LDM) single-file layout.

Stable Diffusion checkpoints as people download them (`v1-5-pruned-emaonly.safetensors`) name
their tensors the way the original training code did; diffusers converts those names when it
loads one. To test that path offline we need such a file, so this writes one from a tiny
pipeline: the inverse of the renaming diffusers' converter applies (UNet, VAE, CLIP text
encoder), for the block layout SD 1.x uses (every down block but the last downsamples, every up
block but the last upsamples).
"""
from __future__ import annotations

import torch

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def _unet_key(key: str, per_block: int) -> str:
    """One diffusers UNet tensor name → its LDM name."""
    top = key.rsplit(".", 1)[0]
    if top in _UNET_TOP:
        return _UNET_TOP[top] + key[len(top):]
    p = key.split(".")
    if p[0] == "down_blocks":
        b, kind = int(p[1]), p[2]
        if kind == "downsamplers":  # "downsamplers.0.conv.weight" → "input_blocks.N.0.op.weight"
            return f"input_blocks.{1 + b * (per_block + 1) + per_block}.0.op.{p[-1]}"
        at = f"input_blocks.{1 + b * (per_block + 1) + int(p[3])}"
    elif p[0] == "up_blocks":
        b, kind = int(p[1]), p[2]
        if kind == "upsamplers":  # after the last layer's resnet (and attention, if any)
            last = b * (per_block + 1) + per_block
            return f"output_blocks.{last}.{{up}}.conv.{p[-1]}"
        at = f"output_blocks.{b * (per_block + 1) + int(p[3])}"
    elif p[0] == "mid_block":  # resnet, attention, resnet
        rest = ".".join(p[3:])
        if p[1] == "resnets":
            return f"middle_block.{2 * int(p[2])}.{_resnet(rest)}"
        return f"middle_block.1.{rest}"
    else:
        raise KeyError(key)
    rest = ".".join(p[4:])
    return f"{at}.0.{_resnet(rest)}" if kind == "resnets" else f"{at}.1.{rest}"


def _unet(unet) -> dict[str, torch.Tensor]:
    per_block = unet.config.layers_per_block
    out = {}
    for key, t in unet.state_dict().items():
        name = _unet_key(key, per_block)
        if "{up}" in name:  # the upsampler sits after the attention in cross-attention blocks
            block = unet.up_blocks[int(key.split(".")[1])]
            name = name.format(up=2 if "CrossAttn" in type(block).__name__ else 1)
        out["model.diffusion_model." + name] = t
    return out


def _vae_key(key: str, n_up: int) -> str:
    p = key.split(".")
    side = p[0]
    if p[1] in ("conv_norm_out",):
        return f"{side}.norm_out.{p[-1]}"
    if p[1] in ("down_blocks", "up_blocks"):
        i = int(p[2]) if p[1] == "down_blocks" else n_up - 1 - int(p[2])
        group = "down" if p[1] == "down_blocks" else "up"
        if p[3] in ("downsamplers", "upsamplers"):
            return f"{side}.{group}.{i}.{'downsample' if group == 'down' else 'upsample'}.conv.{p[-1]}"
        rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
        return f"{side}.{group}.{i}.block.{p[4]}.{rest}"
    if p[1] == "mid_block":
        if p[2] == "resnets":
            return f"{side}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}"
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
        return f"{side}.mid.attn_1.{names[p[4]]}.{p[-1]}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def _vae(vae) -> dict[str, torch.Tensor]:
    n_up = len(vae.config.up_block_types)
    out = {}
    for key, t in vae.state_dict().items():
        if ".attentions." in key and key.endswith(".weight") and t.dim() == 2:
            t = t[:, :, None, None]  # the original attention projections are 1x1 convolutions
        out["first_stage_model." + _vae_key(key, n_up)] = t
    return out


def ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of an SD 1.x pipeline under its original single-file name."""
    # Original files name the encoder's tensors as transformers 4 did ("text_model.embeddings...").
    text = {"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: t
            for k, t in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    return {k: t.detach().clone().contiguous() for k, t in {**_unet(pipe.unet), **_vae(pipe.vae), **text}.items()}
