"""Read a filled cache: the steps of attention, the logit lens, and where things live.

Everything here works on the dict that `model(idx, cache=cache)` fills (or, for embeddings,
on a weight matrix); nothing reruns the model except `run_with_cache`, which is the one call
the app and notebooks need. Pure torch: no user interface.
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


def cache_nbytes(cache: Cache) -> int:
    """The memory a cache holds, each storage counted once: q, k and v are views of one qkv
    output, and a block's hook_resid_post is the next block's hook_resid_pre."""
    storages = {}
    for t in cache.values():
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def act_name(name: str, layer: int | None = None, part: str = "") -> str:
    """A cached tensor's name: act_name("hook_pattern", 0, "attn") is "blocks.0.attn.hook_pattern".
    The one place outside model.py that spells how names are built."""
    if layer is None:
        return name
    return f"blocks.{layer}.{part}.{name}" if part else f"blocks.{layer}.{name}"


def resid_pre_name(layer: int) -> str:
    """The residual stream a block reads."""
    return act_name("hook_resid_pre", layer)


def z_name(layer: int) -> str:
    """Each head's weighted sum of values in a layer, [batch, pos, head, d_head]."""
    return act_name("hook_z", layer, "attn")


def mlp_post_name(layer: int) -> str:
    """A block's feed-forward units after the nonlinearity, [batch, pos, d_mlp]."""
    return act_name("hook_post", layer, "mlp")


def n_layers(cache: Cache) -> int:
    """How many blocks' attention the cache holds (0 for the bigram model)."""
    return sum(1 for name in cache if name.endswith(".attn.hook_pattern"))


def attention_step(cache: Cache, layer: int, step: str) -> torch.Tensor:
    """One step of the attention computation of a layer, (B, H, T, T).

    raw: q . k^T; scaled: divided by sqrt(head_size); masked: -inf above the diagonal
    (what the model feeds to softmax); softmax: the attention weights.
    """
    if act_name("hook_pattern", layer, "attn") not in cache:
        raise KeyError(f"the cache has no attention for layer {layer}")
    if step == "masked":
        return cache[act_name("hook_attn_scores", layer, "attn")]
    if step == "softmax":
        return pattern(cache, layer)
    q = cache[act_name("hook_q", layer, "attn")].transpose(1, 2)  # (B, H, T, hs)
    k = cache[act_name("hook_k", layer, "attn")].transpose(1, 2)
    raw = q @ k.transpose(-2, -1)
    if step == "raw":
        return raw
    if step == "scaled":
        return raw * q.shape[-1] ** -0.5
    raise ValueError(f"step must be one of {ATTENTION_STEPS}, got {step!r}")


def pattern(cache: Cache, layer: int) -> torch.Tensor:
    """A layer's attention weights: [batch, head, query_pos, key_pos]."""
    return cache[act_name("hook_pattern", layer, "attn")]


def patterns(cache: Cache, batch: int = 0) -> torch.Tensor:
    """Every layer's attention weights for one sequence of the batch: (L, H, T, T)."""
    return torch.stack([pattern(cache, i)[batch] for i in range(n_layers(cache))])


def values(cache: Cache, layer: int) -> torch.Tensor:
    """A layer's values: [batch, pos, head, d_head]."""
    return cache[act_name("hook_v", layer, "attn")]


def head_outputs(cache: Cache, layer: int) -> torch.Tensor:
    """Each head's weighted sum of values (hook_z): [batch, pos, head, d_head]."""
    return cache[z_name(layer)]


def mlp_post(cache: Cache, layer: int) -> torch.Tensor:
    """A block's feed-forward units after the nonlinearity: [batch, pos, d_mlp]."""
    return cache[mlp_post_name(layer)]


def is_per_head(name: str) -> bool:
    """Whether a cached tensor has a head axis (q, k, v, z, scores, patterns)."""
    return name.rsplit(".", 1)[-1] in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_attn_scores", "hook_pattern")


def is_quadratic(name: str) -> bool:
    """Whether a cached tensor grows with the square of the prompt: T x T per head."""
    return name.endswith(("hook_attn_scores", "hook_pattern"))


def residual_streams(cache: Cache) -> torch.Tensor:
    """The residual stream after the embeddings and after each block: (n_layer + 1, B, T, C)."""
    n = sum(1 for name in cache if name.endswith(".hook_resid_post"))
    if n == 0:
        raise KeyError("the cache has no residual stream (the bigram model has none)")
    return torch.stack([cache[act_name("hook_resid_pre", 0)]] + [cache[act_name("hook_resid_post", i)] for i in range(n)])


@torch.no_grad()
def logit_lens(model: GPT, cache: Cache) -> torch.Tensor:
    """Next-token probabilities read off the residual stream after the embeddings and after
    each layer, through the model's final LayerNorm and lm_head: (n_layer + 1, B, T, vocab).
    The last entry equals the model's own output distribution.
    """
    if not model.config.attention:
        raise ValueError("the bigram model has no layers to look through")
    return F.softmax(model.lm_head(model.ln_f(residual_streams(cache))), dim=-1)


def layer_norms(cache: Cache) -> list[str]:
    """The LayerNorms that ran, in order: 'blocks.0.ln1', 'blocks.0.ln2', ..., 'ln_final'."""
    return [name.removesuffix(".hook_normalized") for name in cache if name.endswith(".hook_normalized")]


def layer_norm_io(cache: Cache, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What a LayerNorm (named as layer_norms names it) read and what it wrote, each (B, T, C)."""
    after = cache[f"{name}.hook_normalized"]
    if name == "ln_final":
        return residual_streams(cache)[-1], after
    block, ln = name.rsplit(".", 1)  # ln1 reads the block's input, ln2 the stream after attention
    return cache[f"{block}.hook_resid_pre" if ln == "ln1" else f"{block}.hook_resid_mid"], after


def row_entropy(pattern: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of attention weights (..., T, T) -> (..., T).
    A query that spreads evenly over its t+1 keys scores log(t+1); one that picks a single key, 0."""
    return -torch.special.xlogy(pattern, pattern).sum(-1)


def head_stats(pattern: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a head does, in four numbers: attention weights (..., T, T) -> each statistic (...).

    entropy: mean row entropy (nats); mean_distance: how many positions back a query looks,
    weighted by attention; prev_char / first_char: the weight on the previous and on the first
    position, averaged over queries 1..T-1 (query 0 can only look at itself). NaN when T = 1.
    """
    T = pattern.shape[-1]
    pos = torch.arange(T)
    distance = (pos[:, None] - pos[None, :]).clamp_min(0).to(pattern.dtype)  # (T, T): query - key
    return {
        "entropy": row_entropy(pattern).mean(-1),
        "mean_distance": (pattern * distance).sum(-1).mean(-1),
        # The mean of no queries is NaN, which is what a one-character prompt gives here.
        "prev_char": pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1),
        "first_char": pattern[..., 1:, 0].mean(-1),  # queries 1.. on key 0
    }


def head_matrix(cache: Cache, name: str, head: int = 0) -> torch.Tensor:
    """A cached tensor as a 2-D matrix, for the first sequence of the batch. Per-head tensors
    (the 4-D ones) give the chosen head: (query, key) for scores and patterns, (pos, d_head)
    for q, k, v and z. The others are (pos, d_model) or (pos, d_mlp) already."""
    t = cache[name][0]
    if t.dim() == 2:
        return t
    if is_quadratic(name):
        return t[head]  # [head, query_pos, key_pos]
    return t[:, head]  # [pos, head, d_head]


def pca_2d(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Rows of x (N, D) projected on their two main directions: (N, 2), and the fraction of the
    variance those two directions hold."""
    centered = x - x.mean(0)
    U, S, _ = torch.linalg.svd(centered, full_matrices=False)
    k = min(2, S.numel())
    points = torch.zeros(x.shape[0], 2)
    points[:, :k] = U[:, :k] * S[:k]
    total = (S**2).sum()
    return points, float((S[:k] ** 2).sum() / total) if total > 0 else 1.0


def cosine_similarity(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of rows of x (N, D): (N, N)."""
    unit = F.normalize(x, dim=-1)
    return unit @ unit.T
