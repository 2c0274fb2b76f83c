"""Read a filled cache: the steps of attention, the logit lens, and where things live.

Everything here works on the dict that `model(idx, cache=cache)` fills; nothing reruns the
model except `run_with_cache`, which is the one call the app and notebooks need.
"""

import torch
from torch.nn import functional as F

from .model import GPT, Cache

ATTENTION_STEPS = ("raw", "scaled", "masked", "softmax")


@torch.no_grad()
def run_with_cache(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, Cache]:
    """Forward pass in eval mode along the explicit path; returns (logits, cache)."""
    was_training = model.training
    model.eval()
    cache: Cache = {}
    try:
        logits, _ = model(idx, cache=cache)
    finally:
        model.train(was_training)
    return logits, cache


def attention_step(cache: Cache, layer: int, step: str) -> torch.Tensor:
    """One step of the attention computation of a layer, (B, H, T, T).

    raw: q . k^T; scaled: divided by sqrt(head_size); masked: -inf above the diagonal
    (what the model feeds to softmax); softmax: the attention weights.
    """
    prefix = f"blocks.{layer}.attn."
    if f"{prefix}hook_pattern" not in cache:
        raise KeyError(f"the cache has no attention for layer {layer}")
    if step == "masked":
        return cache[f"{prefix}hook_attn_scores"]
    if step == "softmax":
        return cache[f"{prefix}hook_pattern"]
    q = cache[f"{prefix}hook_q"].transpose(1, 2)  # (B, H, T, hs)
    k = cache[f"{prefix}hook_k"].transpose(1, 2)
    raw = q @ k.transpose(-2, -1)
    if step == "raw":
        return raw
    if step == "scaled":
        return raw * q.shape[-1] ** -0.5
    raise ValueError(f"step must be one of {ATTENTION_STEPS}, got {step!r}")


def n_attention_layers(cache: Cache) -> int:
    return sum(1 for name in cache if name.endswith(".attn.hook_pattern"))


@torch.no_grad()
def logit_lens(model: GPT, cache: Cache) -> torch.Tensor:
    """Next-token probabilities read off the residual stream after the embeddings and after
    each layer, through the model's final LayerNorm and lm_head: (n_layer + 1, B, T, vocab).
    The last entry equals the model's own output distribution.
    """
    if not model.config.attention:
        raise ValueError("the bigram model has no layers to look through")
    n = model.config.n_layer
    streams = [cache["blocks.0.hook_resid_pre"]] + [cache[f"blocks.{i}.hook_resid_post"] for i in range(n)]
    return torch.stack([F.softmax(model.lm_head(model.ln_f(x)), dim=-1) for x in streams])
