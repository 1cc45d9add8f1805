"""Machinery the methods share (one implementation each):

- options:  typed hyper-parameter dataclasses overridden by LearnSpec.options
- tokens:   rare-token allocation, token-embedding rows (write / exact restore / train)
- kv:       sparse reads and writes of the K/V "neurons" with exact undo
- training: text/photo encoding, denoising + prior-preservation loss, freezing, step loop
- prior:    class images made by the base model, cached per class word
- scope:    token-scoped K/V values (a concept acts only where its token is)
- masks:    where the object is in each photo (the loss weighs it above the background)
- inputs:   photos -> latents + class-image latents, what every method's training starts from
Photo loading, validation, augmentation and captions live in methods/data.py.
"""
from .kv import (SavedValues, TrainableValues, count, kv_total, kv_weights,
                 mask_indices, read_values, restore_values, union_indices, write_values)
from .options import as_dict, parse_options
from .scope import Anchor, anchor, prompt_scope, scope_of, token_scope, training_suspended
from .masks import latent_masks, loss_weights, object_masks
from .inputs import Prepared, Prior, concept_token, prepare
from .prior import class_images, prior_prompt
from .tokens import (MAX_VECTORS, SavedRows, TrainableRows, allocate_token, concept_ids, embedding_rows,
                     rare_tokens, restore_rows, token_id, token_ids, token_words, write_rows)
from .training import (FLOAT16_LOSS_SCALE, ConceptLoss, LossParts, LossScale, denoising_losses, encode_pixels, encode_text,
                       noise_schedule, only_trainable, pipeline_modules, run_steps, step_generator,
                       tokenize)

__all__ = [
    "FLOAT16_LOSS_SCALE", "LossScale", "SavedValues", "TrainableValues", "count", "kv_total", "kv_weights", "mask_indices", "read_values",
    "restore_values", "union_indices", "write_values", "as_dict", "parse_options",
    "Prepared", "Prior", "concept_token", "prepare",
    "class_images", "prior_prompt", "MAX_VECTORS", "SavedRows", "TrainableRows", "allocate_token",
    "concept_ids", "token_words", "embedding_rows", "rare_tokens", "restore_rows", "token_id",
    "token_ids", "write_rows",
    "ConceptLoss", "LossParts", "denoising_losses", "encode_pixels", "encode_text",
    "noise_schedule", "only_trainable", "pipeline_modules", "run_steps", "step_generator",
    "tokenize", "latent_masks", "loss_weights", "object_masks", "Anchor", "anchor", "prompt_scope", "scope_of", "token_scope",
    "training_suspended",
]
