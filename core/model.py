"""A character-level GPT that reads like the lecture, with every internal on view.

Follows Andrej Karpathy's lecture "Let's build GPT: from scratch, in code, spelled out"
(https://www.youtube.com/watch?v=kCc8FmEb1nY) and his nanoGPT model.py.

Notable features
- One model class for every stage of the lecture: switches in `GPTConfig` turn on
  self-attention, the feed-forward layer, residual connections and LayerNorm one by one;
  core.stages names each stage (bigram ... full) with its parameters exactly as the lecture's.
- Internals in plain sight: every named point of the forward pass goes through `hooks(name, x)`.
  `model(idx, cache={})` fills the dict with every intermediate tensor, named as TransformerLens
  names them (`blocks.0.attn.hook_pattern`, ...); `model(idx, edits={name: fn})` changes any of
  them on the way (knock out a head, patch in another run's activations). With neither, the
  hooks do nothing and attention runs the fused kernel (F.scaled_dot_product_attention); with a
  cache it runs the lecture's explicit path (q @ k^T, scale, masked_fill with -inf, softmax).
  Both give the same logits. `forward_from(layer, resid)` runs the blocks from one layer on, so
  an experiment on that layer reuses a cached run of the layers below (core.experiments).
- nanoGPT's shape options (GELU, bias, tied embeddings) are switches too, so nanoGPT
  checkpoints convert to this model.
- `KVCache`: keys and values of earlier positions, allocated once, with a length per row, so
  that sampling computes only the newest position, for many rows of different lengths at once.
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

from .stages import PRESETS

Cache = dict[str, torch.Tensor]
Edits = dict[str, Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 64  # the longest context the model sees (T)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128  # C; each head gets n_embd // n_head dimensions
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorm
    qkv_bias: bool = True  # biases on keys, queries and values too (nanoGPT's; the lecture's Head has none)
    # The lecture's steps, switched on one by one (see core.stages).
    attention: bool = True  # False: the bigram model, a (vocab x vocab) lookup table
    feed_forward: bool = True  # an MLP after attention in every block
    residual: bool = True  # skip connections, with output projections and a 4x wider MLP
    layer_norm: bool = True  # pre-norm LayerNorm in every block and before lm_head
    # nanoGPT's shape options.
    activation: str = "relu"  # the lecture uses ReLU, nanoGPT GELU
    tie_weights: bool = False  # lm_head shares the token embedding matrix
    mlp_ratio: int = 4  # the feed-forward layer's inner size, in multiples of n_embd (the lecture's 4)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
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

    @property
    def mlp_size(self) -> int:
        """The feed-forward layer's inner size: n_embd until the residual stage makes it 4x
        (mlp_ratio)."""
        return self.mlp_ratio * self.n_embd if self.residual else self.n_embd

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


class Hooks:
    """The named points of a forward pass. `hooks(name, x)` returns x, changed by `edits[name]`
    if there is one, and records it in `cache` if there is one. `at(prefix)` gives a module the
    same hooks under its own names ("blocks.0.attn." + "hook_z")."""

    def __init__(self, cache: Cache | None = None, edits: Edits | None = None, prefix: str = ""):
        self.cache, self.edits, self.prefix = cache, edits or {}, prefix

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        name = self.prefix + name
        if name in self.edits:
            x = self.edits[name](x)
        if self.cache is not None:
            self.cache[name] = x.detach()
        return x

    def at(self, prefix: str) -> "Hooks":
        return Hooks(self.cache, self.edits, self.prefix + prefix)

    def explicit(self) -> bool:
        """Whether attention must compute its weights step by step: to record them or change them."""
        return self.cache is not None or any(self.prefix + n in self.edits for n in ("hook_attn_scores", "hook_pattern"))


class NoHooks(Hooks):
    """The fast path: nothing recorded, nothing changed."""

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def at(self, prefix: str) -> "Hooks":
        return self

    def explicit(self) -> bool:
        return False


NO_HOOKS = NoHooks()


class CausalSelfAttention(nn.Module):
    """n_head heads of self-attention in parallel.

    The lecture gives each head its own key, query and value Linear layers; here the three
    matrices of all heads are stacked into one Linear (qkv) so a single matmul computes them.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.head_size
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias and config.qkv_bias)
        # The output projection back into the residual stream comes with the skip connections.
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias) if config.residual else nn.Identity()
        self.dropout = config.dropout
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # The lecture's lower-triangular mask: position t may only look at positions <= t.
        self.register_buffer("tril", torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor, hooks: Hooks = NO_HOOKS, kv: "LayerKV | None" = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q = hooks("hook_q", q.view(B, T, self.n_head, self.head_size))  # [batch, pos, head, d_head]
        k = hooks("hook_k", k.view(B, T, self.n_head, self.head_size))
        v = hooks("hook_v", v.view(B, T, self.n_head, self.head_size))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        if hooks.explicit():
            out = self._explicit(q, k, v, hooks)
        elif kv is not None:
            out = self._cached(q, k, v, kv)
        else:
            out = _attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        z = hooks("hook_z", out.transpose(1, 2))  # each head's weighted sum of values [batch, pos, head, d_head]
        return self.resid_dropout(self.proj(z.reshape(B, T, C)))  # heads side by side again

    def _explicit(self, q, k, v, hooks: Hooks) -> torch.Tensor:
        """The lecture's path, step by step."""
        T = q.shape[2]
        wei = q @ k.transpose(-2, -1) * self.head_size**-0.5  # affinities (B, nh, T, T)
        wei = wei.masked_fill(~self.tril[:T, :T], float("-inf"))  # the future cannot talk to the past
        wei = hooks("hook_attn_scores", wei)  # [batch, head, query_pos, key_pos]
        wei = hooks("hook_pattern", F.softmax(wei, dim=-1))  # each row sums to 1
        return self.attn_dropout(wei) @ v  # weighted sum of values (B, nh, T, hs)

    def _cached(self, q, k, v, kv: "LayerKV") -> torch.Tensor:
        """Sampling: the new positions' keys and values join the cache, and the new queries see
        every cached position of their own row up to themselves."""
        step = kv.step
        if isinstance(step.write, slice):  # one row: a plain copy
            kv.k[:, :, step.write], kv.v[:, :, step.write] = k.detach(), v.detach()  # no grad for sampling
        else:  # rows of their own lengths: each (row, head, position)'s vector by its index
            kv.k.view(-1, self.head_size).index_copy_(0, step.write, k.detach().reshape(-1, self.head_size))
            kv.v.view(-1, self.head_size).index_copy_(0, step.write, v.detach().reshape(-1, self.head_size))
        if step.bias is not None:
            return self._one_query(q, kv.k, kv.v, step.bias)
        return _attention(q, kv.k[:, :, :step.end], kv.v[:, :, :step.end], attn_mask=step.mask, is_causal=step.causal)

    def _one_query(self, q, k, v, bias: torch.Tensor) -> torch.Tensor:
        """A batched sampling step (one new position a row, B > 1) over the whole cache, the
        keys a row may not see set to -inf by `bias`: with so little work a matrix, the fused
        kernel and the matmuls over a slice of the cache are slower than these over all of it
        (benchmarks/README.md, the room)."""
        wei = q @ k.transpose(-2, -1) * self.head_size**-0.5 + bias  # (B, nh, 1, block_size)
        return F.softmax(wei, dim=-1) @ v


class FeedForward(nn.Module):
    """A linear layer and a nonlinearity (the lecture's first FeedForward); from the residual
    stage on, 4x wider and projected back: computation on each token alone."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_size, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]()
        self.proj = nn.Linear(config.mlp_size, config.n_embd, bias=config.bias) if config.residual else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, hooks: Hooks = NO_HOOKS) -> torch.Tensor:
        pre = hooks("hook_pre", self.fc(x))  # (B, T, mlp_size)
        post = hooks("hook_post", self.act(pre))
        return self.dropout(self.proj(post))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that shows what it wrote (hook_normalized)."""

    def forward(self, x: torch.Tensor, hooks: Hooks = NO_HOOKS) -> torch.Tensor:
        return hooks("hook_normalized", super().forward(x))


class NoNorm(nn.Identity):
    """Where LayerNorm goes before the lecture adds it."""

    def forward(self, x: torch.Tensor, hooks: Hooks = NO_HOOKS) -> torch.Tensor:
        return x


def _norm(config: GPTConfig) -> nn.Module:
    return LayerNorm(config.n_embd, bias=config.bias) if config.layer_norm else NoNorm()


class Block(nn.Module):
    """Communication (attention) followed by computation (feed-forward)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.residual = config.residual
        self.ln1 = _norm(config)
        self.sa = CausalSelfAttention(config)
        self.ln2 = _norm(config) if config.feed_forward else None
        self.ffwd = FeedForward(config) if config.feed_forward else None

    def forward(self, x: torch.Tensor, hooks: Hooks = NO_HOOKS, kv: "LayerKV | None" = None) -> torch.Tensor:
        x = hooks("hook_resid_pre", x)
        x = self.add(x, self.sa(self.ln1(x, hooks.at("ln1.")), hooks.at("attn."), kv))
        if self.ffwd is not None:
            x = hooks("hook_resid_mid", x)
            x = self.add(x, self.ffwd(self.ln2(x, hooks.at("ln2.")), hooks.at("mlp.")))
        return hooks("hook_resid_post", x)

    def add(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x + h: the residual connection. Before the lecture adds it, h replaces x."""
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
            self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
            self.ln_f = _norm(config)
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
                kv: "KVCache | None" = None, edits: Edits | None = None):
        """idx, targets: (B, T) integer tensors. Returns logits (B, T, vocab) and the loss (or None).

        cache: a dict to fill with every internal (the explicit attention path).
        edits: hook name -> function that returns a replacement for that tensor (interventions).
        kv: keys and values of earlier positions (sampling); idx then holds only the new ones.
        """
        B, T = idx.shape
        if self.config.block_size < T:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        hooks = Hooks(cache, edits) if cache is not None or edits else NO_HOOKS
        if kv is not None and hooks.explicit():
            raise ValueError("fill a cache or use kv, not both")
        if not self.config.attention:
            logits = self.token_embedding_table(idx)  # (B, T, vocab)
        else:
            pos = kv.begin(T).positions if kv is not None else torch.arange(T, device=idx.device)  # (B, T) or (T)
            tok_emb = hooks("hook_embed", self.token_embedding_table(idx))  # (B, T, C)
            pos_emb = hooks("hook_pos_embed", self.position_embedding_table(pos).expand(B, T, -1))
            logits = self._blocks_from(0, tok_emb + pos_emb, hooks, kv)
            if kv is not None:
                kv.lengths += T
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def forward_from(self, layer: int, resid: torch.Tensor, edits: Edits | None = None) -> torch.Tensor:
        """The logits (B, T, vocab) from block `layer` on, given the residual stream entering it
        (that block's hook_resid_pre, (B, T, C)). An experiment on one layer starts here from a
        cached run, so the layers below are not computed again. edits as in forward."""
        if not self.config.attention:
            raise ValueError("the bigram model has no blocks to start from")
        return self._blocks_from(layer, resid, Hooks(None, edits) if edits else NO_HOOKS)

    def _blocks_from(self, layer: int, x: torch.Tensor, hooks: Hooks, kv: "KVCache | None" = None) -> torch.Tensor:
        for i in range(layer, len(self.blocks)):
            x = self.blocks[i](x, hooks.at(f"blocks.{i}."), kv.layers[i] if kv is not None else None)
        return self.lm_head(self.ln_f(x, hooks.at("ln_final.")))  # (B, T, vocab)

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
                 generator: torch.Generator | None = None, kv_cache: bool = True,
                 edits: Edits | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T) and return the longer (B, T+n)."""
        stream = self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator, kv_cache, edits)
        new = [tok for tok, _ in stream]
        return torch.cat([idx, *new], dim=1) if new else idx

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        generator: torch.Generator | None = None,
                        kv_cache: bool = True, edits: Edits | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (next token (B, 1), the distribution it was drawn from (B, vocab)) one at a time.

        temperature 0 is greedy: the token is the argmax of the yielded softmax.
        The context is cropped to block_size, as in the lecture, with one difference: when the
        window is full it slides by half a block at once rather than by one character, so that
        with kv_cache each new character needs only its own position computed (plus one
        recompute of the window per half block). kv_cache=False recomputes the same window at
        every step: the same characters for the same seed, much slower.
        edits: as in forward, on every step (a knocked-out head writes without it). They see
        only the positions computed at that step; edits of attention weights need kv_cache=False.
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
                logits, _ = self(idx[:, -1:], kv=kv, edits=edits)  # only the newest position
            else:
                kv = KVCache(self, idx.shape[0]) if use_kv else None
                logits, _ = self(idx[:, start:], kv=kv, edits=edits)  # the whole window
            next_tok, probs = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_tok], dim=1)
            yield next_tok, probs


@dataclass
class KVStep:
    """Where one forward's T new positions go and which keys their queries see: the same in
    every layer, so worked out once a forward."""
    positions: torch.Tensor  # (B, T)
    end: int  # keys 0..end-1 are read
    write: slice | torch.Tensor  # the positions (one row), or each (row, head, position)'s index in the cache
    mask: torch.Tensor | None  # (B, 1, T, end): the keys up to each query, where rows differ
    causal: bool  # rows from an empty cache: the lecture's triangle, no mask needed
    bias: torch.Tensor | None = None  # a batched one-position step: 0 where mask, else -inf


@dataclass
class LayerKV:
    """One layer's keys and values: (B, nh, block_size, hs) buffers; `step` is the cache's."""
    k: torch.Tensor
    v: torch.Tensor
    cache: "KVCache"

    @property
    def step(self) -> KVStep:
        return self.cache.step


class KVCache:
    """Keys and values of every layer for `batch` rows of up to block_size positions (or fewer
    `positions`), allocated once; `lengths[b]` positions of row b are filled. The model's forward writes the new
    positions and advances the lengths."""

    def __init__(self, model: GPT, batch: int, positions: int | None = None):
        c = model.config
        param = next(model.parameters())
        shape = (c.n_layer, batch, c.n_head, positions or c.block_size, c.head_size)
        k = torch.zeros(shape, device=param.device, dtype=param.dtype)
        self._hold(k, torch.zeros_like(k), torch.zeros(batch, dtype=torch.long, device=param.device))

    def _hold(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
        self.k, self.v, self.lengths = k, v, lengths  # k, v: (n_layer, B, nh, block_size, hs)
        self.layers = [LayerKV(k[i], v[i], self) for i in range(k.shape[0])]
        self.step: KVStep | None = None

    def begin(self, T: int) -> KVStep:
        """The step of a forward of T new positions in every row (GPT.forward advances `lengths`)."""
        _, B, nh, block, hs = self.k.shape
        if B == 1:  # one row (a prompt, one stream): no index tensors, and a mask only mid-row
            start = int(self.lengths[0])
            end = start + T
            positions = torch.arange(start, end, device=self.k.device)[None]
            write = slice(start, end)
        else:
            positions = self.lengths[:, None] + torch.arange(T, device=self.k.device)
            end = int(positions.max()) + 1
            rows_heads = torch.arange(B * nh, device=self.k.device).view(B, nh, 1)
            write = (rows_heads * block + positions[:, None, :]).reshape(-1)  # (B * nh * T)
        if end > block:
            raise ValueError(f"sequence length {end} exceeds block_size {block}")
        causal = T > 1 and end == T  # every row from an empty cache (a prompt, a slid window)
        one_query = B > 1 and T == 1  # a batched sampling step: attention reads the whole cache
        if one_query:
            end = block
        mask = bias = None
        if not causal and not (B == 1 and T == 1):
            mask = (torch.arange(end, device=self.k.device) <= positions[..., None])[:, None]
        if one_query:
            bias = torch.zeros(mask.shape, dtype=self.k.dtype, device=self.k.device).masked_fill_(~mask, float("-inf"))
        self.step = KVStep(positions, end, write, mask, causal, bias)
        return self.step

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows start..stop as a cache of their own that shares this one's memory: a forward on
        it (one request's prompt, say) fills those rows here."""
        view = KVCache.__new__(KVCache)
        view._hold(self.k[:, start:stop], self.v[:, start:stop], self.lengths[start:stop])
        return view

    @property
    def length(self) -> int:
        """The longest row's filled positions."""
        return int(self.lengths.max())


GREEDY_BELOW = 1e-6  # a temperature this small is greedy: dividing by a tinier one overflows float32


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row (B, 1) from its last logits (B, vocab), and the distribution it
    was drawn from. temperature 0 is greedy, and so is one below GREEDY_BELOW (at 1e-6 a draw
    differs from the argmax only where two logits are within a millionth of each other)."""
    if temperature < GREEDY_BELOW:
        probs = F.softmax(logits, dim=-1)
        return probs.argmax(dim=-1, keepdim=True), probs
    B, V = logits.shape
    ks = torch.full((B,), top_k) if top_k is not None and top_k < V else None
    ps = torch.full((B,), top_p, dtype=torch.float64) if top_p is not None and top_p < 1.0 else None
    probs = F.softmax(_filter_logits(logits / temperature, ks, ps), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator), probs


def sample_rows(logits: torch.Tensor, temperature: list[float], top_k: list[int | None], top_p: list[float | None],
                generators: list[torch.Generator]) -> tuple[list[int], torch.Tensor]:
    """sample_next for rows that each have settings and a generator of their own (the requests
    of the sampling engine), in one batch: each row gets the token and distribution sample_next
    gives it alone. Returns the tokens and the distributions (B, vocab)."""
    B, V = logits.shape
    greedy = [t < GREEDY_BELOW for t in temperature]  # as sample_next: no temperature, no filter
    temps = torch.tensor([1.0 if g else t for g, t in zip(greedy, temperature)], dtype=logits.dtype)[:, None]
    ks = [V if g or k is None else min(k, V) for g, k in zip(greedy, top_k)]
    ps = [math.inf if g or p is None or p >= 1.0 else p for g, p in zip(greedy, top_p)]
    probs = F.softmax(_filter_logits(logits / temps, torch.tensor(ks) if min(ks) < V else None,
                                     torch.tensor(ps, dtype=torch.float64) if min(ps) < math.inf else None), dim=-1)
    # torch.multinomial draws one sample as argmax(p / q) with q ~ Exp(1) from its generator:
    # that draw, with each row's q from its own generator (a greedy row's q is 1: the argmax).
    q = torch.ones_like(probs)
    for row, g, is_greedy in zip(q, generators, greedy):
        if not is_greedy:
            row.exponential_(1, generator=g)
    return (probs / q).argmax(dim=-1).tolist(), probs


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention, kept in float32 on a CPU under autocast: there its
    bfloat16 kernel is the slow part (benchmarks/README.md, goal 1)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _check_sampling(max_new_tokens, temperature, top_k, top_p, vocab_size):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _filter_logits(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Set to -inf every logit of row b outside its top_k[b], and outside the smallest set
    holding top_p[b] of the probability (top_k (B,): vocab keeps all; top_p (B,): inf keeps all)."""
    if top_k is not None:
        kth = torch.sort(logits, descending=True, dim=-1).values.gather(-1, top_k[:, None] - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p[:, None].to(probs.dtype)  # mass before this token already enough
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits
