"""A character-level GPT that reads like the lecture, with every internal on view.

Follows Andrej Karpathy's lecture "Let's build GPT: from scratch, in code, spelled out"
(https://www.youtube.com/watch?v=kCc8FmEb1nY) and his nanoGPT model.py.

Notable features
- One model class for every stage of the lecture: switches in `GPTConfig` turn on
  self-attention, the feed-forward layer, residual connections and LayerNorm one by one,
  and `PRESETS` names each stage (bigram ... full).
- `model(idx, targets, cache=dict())` fills `cache` with every intermediate tensor, named
  as TransformerLens names them (`blocks.0.attn.hook_pattern`, ...). With `cache=None`
  attention runs the fused kernel (F.scaled_dot_product_attention); with a cache it runs
  the lecture's explicit path (q @ k^T, scale, masked_fill with -inf, softmax). Both give
  the same logits.
- nanoGPT's shape options (GELU, bias, tied embeddings) are switches too, so nanoGPT
  checkpoints convert to this model.
- `generate` / `generate_stream` sample with temperature, top-k and top-p.
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn import functional as F

Cache = dict[str, torch.Tensor]


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 64  # the longest context the model sees (T)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128  # C; each head gets n_embd // n_head dimensions
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorm
    # The lecture's steps, switched on one by one (see PRESETS).
    attention: bool = True  # False: the bigram model, a (vocab x vocab) lookup table
    feed_forward: bool = True  # an MLP after attention in every block
    residual: bool = True  # skip connections, with an output projection in attention
    layer_norm: bool = True  # pre-norm LayerNorm in every block and before lm_head
    # nanoGPT's shape options.
    activation: str = "relu"  # the lecture uses ReLU, nanoGPT GELU
    tie_weights: bool = False  # lm_head shares the token embedding matrix

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            lower = self.n_embd - self.n_embd % self.n_head
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) so each "
                f"head gets the same size; try n_embd={lower or self.n_head} "
                f"or {lower + self.n_head}, or another n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.tie_weights and not self.attention:
            raise ValueError("tie_weights needs attention=True (the bigram table has no lm_head)")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model settings: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}

_OFF = dict(feed_forward=False, residual=False, layer_norm=False)
# The lecture's stages, in order, with the sizes the lecture uses for each. Every preset is
# the same GPT class with more switched on; pass overrides to compare stages at one shape.
PRESETS: dict[str, dict] = {
    # "The simplest baseline": each character predicts the next from a lookup table.
    "bigram": dict(attention=False, n_layer=1, n_head=1, n_embd=32, block_size=8, **_OFF),
    # "Self-attention": one head of size n_embd over token + position embeddings.
    "one_head": dict(n_layer=1, n_head=1, n_embd=32, block_size=8, **_OFF),
    # "Multi-headed self-attention": 4 heads of size 8 side by side, concatenated.
    "multi_head": dict(n_layer=1, n_head=4, n_embd=32, block_size=8, **_OFF),
    # "Feedforward layers": tokens think on what they gathered (communication, then computation).
    "ffn": dict(n_layer=1, n_head=4, n_embd=32, block_size=8, feed_forward=True, residual=False, layer_norm=False),
    # "Residual connections": a stack of 3 blocks that trains because of the skip connections.
    "residual": dict(n_layer=3, n_head=4, n_embd=32, block_size=8, layer_norm=False),
    # "LayerNorm": pre-norm in each block and a final LayerNorm before lm_head.
    "layernorm": dict(n_layer=3, n_head=4, n_embd=32, block_size=8),
    # "Scaling up the model": dropout, 6 layers, 6 heads, 384 dims, 256 characters of context.
    "full": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
}


class CausalSelfAttention(nn.Module):
    """n_head heads of self-attention in parallel.

    The lecture gives each head its own key, query and value Linear layers; here the three
    matrices of all heads are stacked into one Linear (qkv) so a single matmul computes them.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.head_size
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # The output projection back into the residual stream comes with the skip connections.
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias) if config.residual else nn.Identity()
        self.dropout = config.dropout
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # The lecture's lower-triangular mask: position t may only look at positions <= t.
        self.register_buffer("tril", torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, prefix: str = "",
                kv: "LayerKV | None" = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, self.head_size)  # (B, T, nh, hs)
        k = k.view(B, T, self.n_head, self.head_size)
        v = v.view(B, T, self.n_head, self.head_size)
        if cache is not None:
            out = self._explicit(q, k, v, cache, prefix)
        else:
            out = self._fused(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kv)
        out = out.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.proj(out))

    def _fused(self, q, k, v, kv: "LayerKV | None") -> torch.Tensor:
        """Fast path: one kernel computes softmax(q k^T / sqrt(hs)) v under the causal mask.
        With kv (sampling), the keys and values of earlier positions come from the cache."""
        past = 0
        if kv is not None:
            if kv.k is not None:
                past = kv.k.shape[2]
                k, v = torch.cat([kv.k, k], dim=2), torch.cat([kv.v, v], dim=2)
            kv.k, kv.v = k, v
        T = q.shape[2]
        mask = self.tril[past:past + T, :past + T] if past else None  # new queries see all of the past
        return _attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=not past,
        )  # (B, nh, T, hs)

    def _explicit(self, q, k, v, cache: Cache, prefix: str) -> torch.Tensor:
        """The lecture's path, step by step, recording each step."""
        T = q.shape[1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        wei = q @ k.transpose(-2, -1) * self.head_size**-0.5  # affinities (B, nh, T, T)
        wei = wei.masked_fill(~self.tril[:T, :T], float("-inf"))  # the future cannot talk to the past
        scores = wei
        wei = F.softmax(wei, dim=-1)  # each row sums to 1
        pattern = wei
        wei = self.attn_dropout(wei)
        out = wei @ v  # weighted sum of values (B, nh, T, hs)
        cache[f"{prefix}hook_q"] = q.transpose(1, 2).detach()  # [batch, pos, head, d_head]
        cache[f"{prefix}hook_k"] = k.transpose(1, 2).detach()
        cache[f"{prefix}hook_v"] = v.transpose(1, 2).detach()
        cache[f"{prefix}hook_attn_scores"] = scores.detach()  # [batch, head, query_pos, key_pos]
        cache[f"{prefix}hook_pattern"] = pattern.detach()
        cache[f"{prefix}hook_z"] = out.transpose(1, 2).detach()
        return out


class FeedForward(nn.Module):
    """A linear layer, a nonlinearity, and a projection back: computation on each token alone."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]()
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, prefix: str = "") -> torch.Tensor:
        pre = self.fc(x)  # (B, T, 4C)
        post = self.act(pre)
        if cache is not None:
            cache[f"{prefix}hook_pre"] = pre.detach()
            cache[f"{prefix}hook_post"] = post.detach()
        return self.dropout(self.proj(post))


class Block(nn.Module):
    """Communication (attention) followed by computation (feed-forward)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.residual = config.residual
        self.ln1 = nn.LayerNorm(config.n_embd, bias=config.bias) if config.layer_norm else None
        self.sa = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=config.bias) if config.layer_norm and config.feed_forward else None
        self.ffwd = FeedForward(config) if config.feed_forward else None

    def forward(self, x: torch.Tensor, cache: Cache | None = None, prefix: str = "",
                kv: "LayerKV | None" = None) -> torch.Tensor:
        _record(cache, f"{prefix}hook_resid_pre", x)
        x = self._sublayer(x, self.ln1, lambda h: self.sa(h, cache, f"{prefix}attn.", kv), cache, f"{prefix}ln1.")
        if self.ffwd is not None:
            _record(cache, f"{prefix}hook_resid_mid", x)
            x = self._sublayer(x, self.ln2, lambda h: self.ffwd(h, cache, f"{prefix}mlp."), cache, f"{prefix}ln2.")
        _record(cache, f"{prefix}hook_resid_post", x)
        return x

    def _sublayer(self, x, ln, layer, cache, ln_prefix):
        h = x
        if ln is not None:
            h = ln(x)
            _record(cache, f"{ln_prefix}hook_normalized", h)
        h = layer(h)
        return x + h if self.residual else h


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        if not config.attention:
            # The bigram model: row i of the table holds the logits of the character after i.
            self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)
        else:
            self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
            self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
            self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias) if config.layer_norm else nn.Identity()
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
            if config.tie_weights:
                self.lm_head.weight = self.token_embedding_table.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        # nanoGPT's initialisation: small normal weights, zero biases.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Cache | None = None,
                kv: "KVCache | None" = None):
        """idx, targets: (B, T) integer tensors. Returns logits (B, T, vocab) and the loss (or None).

        cache: a dict to fill with every internal (the explicit attention path).
        kv: keys and values of earlier positions (sampling); idx then holds only the new ones.
        """
        B, T = idx.shape
        past = kv.length if kv is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence length {past + T} exceeds block_size {self.config.block_size}")
        if cache is not None and kv is not None:
            raise ValueError("fill a cache or use kv, not both")
        if not self.config.attention:
            logits = self.token_embedding_table(idx)  # (B, T, vocab)
        else:
            tok_emb = self.token_embedding_table(idx)  # (B, T, C)
            pos_emb = self.position_embedding_table(torch.arange(past, past + T, device=idx.device))  # (T, C)
            _record(cache, "hook_embed", tok_emb)
            _record(cache, "hook_pos_embed", pos_emb.expand(B, T, -1))
            x = self.drop(tok_emb + pos_emb)
            for i, block in enumerate(self.blocks):
                x = block(x, cache, f"blocks.{i}.", kv.layers[i] if kv is not None else None)
            x = self.ln_f(x)
            if self.config.layer_norm:
                _record(cache, "ln_final.hook_normalized", x)
            logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the position table (as nanoGPT does)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.attention:
            n -= self.position_embedding_table.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token: 6N plus attention (PaLM, appendix B)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        attention = 12 * cfg.n_layer * cfg.n_embd * T if cfg.attention else 0
        return 6 * self.num_params(non_embedding=True) + attention

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, kv_cache: bool = True) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T) and return the longer (B, T+n)."""
        stream = self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator, kv_cache)
        new = [tok for tok, _ in stream]
        return torch.cat([idx, *new], dim=1) if new else idx

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        generator: torch.Generator | None = None,
                        kv_cache: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (next token (B, 1), the distribution it was drawn from (B, vocab)) one at a time.

        temperature 0 is greedy: the token is the argmax of the yielded softmax.
        The context is cropped to block_size, as in the lecture, with one difference: when the
        window is full it slides by half a block at once rather than by one character, so that
        with kv_cache each new character needs only its own position computed (plus one
        recompute of the window per half block). kv_cache=False recomputes the same window at
        every step: the same characters for the same seed, much slower.
        """
        _check_sampling(max_new_tokens, temperature, top_k, top_p, self.config.vocab_size)
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError("idx must be a (B, T) tensor with at least one token")
        block = self.config.block_size
        use_kv = kv_cache and self.config.attention
        start = max(0, idx.shape[1] - block)  # a long prompt is cropped to its last block
        kv = None
        for _ in range(max_new_tokens):
            if idx.shape[1] - start > block:  # the window is full: slide it
                start, kv = idx.shape[1] - max(1, block // 2), None
            if kv is not None:
                logits, _ = self(idx[:, -1:], kv=kv)  # only the newest position
            else:
                kv = KVCache(self.config.n_layer) if use_kv else None
                logits, _ = self(idx[:, start:], kv=kv)  # the whole window
            logits = logits[:, -1, :]  # the last position predicts the next character
            if temperature == 0:
                probs = F.softmax(logits, dim=-1)
                next_tok = probs.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(_filter_logits(logits / temperature, top_k, top_p), dim=-1)
                next_tok = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, next_tok], dim=1)
            yield next_tok, probs


@dataclass
class LayerKV:
    """One layer's keys and values of the positions seen so far, each (B, nh, T_seen, hs)."""
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


class KVCache:
    """Keys and values of every layer, so that sampling computes only the newest position."""

    def __init__(self, n_layer: int):
        self.layers = [LayerKV() for _ in range(n_layer)]

    @property
    def length(self) -> int:
        k = self.layers[0].k
        return 0 if k is None else k.shape[2]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention, kept in float32 on a CPU under autocast: there its
    bfloat16 kernel is the slow part (plain autocast made nanoGPT's loop 0.74x as fast; with
    attention in float32 the trainer is 1.33x: benchmarks/README.md, goal 1)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _record(cache: Cache | None, name: str, tensor: torch.Tensor) -> None:
    if cache is not None:
        cache[name] = tensor.detach()


def _check_sampling(max_new_tokens, temperature, top_k, top_p, vocab_size):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top k, and outside the smallest set holding top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - F.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already enough
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits
