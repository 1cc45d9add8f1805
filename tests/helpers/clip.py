"""A tiny CLIP for the evaluation tests."""
from __future__ import annotations

import torch


def tiny_clip_model():
    """A tiny randomly initialised transformers CLIP (seeded), built from a config: no download."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16)
    return CLIPModel(cfg)
