"""Experiments, not only pictures: knock out heads and neurons, patch one run into another,
score what each head does, and judge it all on the same validation characters.

Every intervention is an `edits` dict for `model(idx, edits=...)` (see core.model), so the fast
path without edits is untouched. Losses are judged on `val_windows`: one fixed set of windows
of the validation split, so that a number on one view compares with a number on another, and
one checkpoint with the next. Pure torch: no user interface.
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .data import Corpus
from .lens import head_stats, mlp_post_name, patterns, resid_pre_name, z_name
from .model import GPT, Cache, Edits

VAL_CHARS = 4096  # the fewest validation characters an experiment is judged on
BATCH = 8  # windows a forward pass holds at once: bounds the memory of the batched runs

# A patching example that works on pretrained/cpu-best: it answers 'L' after the first prompt and
# 'O' after the second, so which name was mentioned decides (clean, corrupted, target).
PATCHING_EXAMPLE = ("Exeunt CLIFFORD.\n\nC", "Exeunt COMINIUS.\n\nC", "L")

Head = tuple[int, int]  # (layer, head)
Means = dict[str, torch.Tensor]  # hook name -> its mean over batch and positions, e.g. (H, d_head)


@contextmanager
def evaluating(model: GPT) -> Iterator[GPT]:
    """The model in eval mode (no dropout) for the block, then as it was; no gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


# The fixed validation windows and losses.

def val_windows(data: Corpus | torch.Tensor, block_size: int, n_chars: int = VAL_CHARS) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of block_size characters spread evenly over the validation split (a Corpus or its
    ids), enough of them for at least n_chars predictions: inputs x and targets y, each
    (n, block_size). Even spacing is deterministic, so every caller gets the same windows: the
    split's start alone is easier than its whole."""
    val = data.splits["val"] if isinstance(data, Corpus) else data
    if len(val) <= block_size:
        raise ValueError(f"the validation split ({len(val)} characters) is shorter than block_size + 1 ({block_size + 1})")
    n = -(-n_chars // block_size)
    starts = torch.linspace(0, len(val) - block_size - 1, n).long()
    windows = val[starts[:, None] + torch.arange(block_size + 1)]  # (n, T+1)
    return windows[:, :-1], windows[:, 1:]


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position, in nats: logits (..., T, vocab), targets (..., T) -> (..., T)."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)


def val_loss(model: GPT, x: torch.Tensor, y: torch.Tensor, edits: Edits | None = None) -> float:
    """The mean loss over windows x, y (val_windows), with edits if given."""
    with evaluating(model):
        total = sum(token_losses(model(xb, edits=edits)[0], yb).sum() for xb, yb in zip(x.split(BATCH), y.split(BATCH)))
    return float(total) / y.numel()


@dataclass
class CharLosses:
    """How hard each character of a text was to predict: entry i is about character i + 1."""
    loss: torch.Tensor  # (N-1,) nats
    context: torch.Tensor  # (N-1,) how many characters the prediction saw
    top_ids: torch.Tensor  # (N-1, k) the model's most likely characters there, most likely first
    top_probs: torch.Tensor  # (N-1, k)


def char_losses(model: GPT, ids: list[int] | torch.Tensor, edits: Edits | None = None, top_k: int = 3) -> CharLosses:
    """The loss of every character of a text after the first, and the model's top guesses there.

    A text longer than the context is read in windows of block_size characters, one every half
    block: each character is scored in the first window that has at least half a block before it
    (or all of the text before it, near the start).
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    N, T = len(ids), model.config.block_size
    if N < 2:
        raise ValueError("a text needs at least two characters: one to read and one to predict")
    T = min(T, N - 1)
    step = max(1, T // 2)
    starts = list(range(0, N - 1 - T, step)) + [N - 1 - T]  # the last window ends at the text's end
    windows = ids[torch.tensor(starts)[:, None] + torch.arange(T + 1)]  # (n, T+1)
    with evaluating(model):
        logits = torch.cat([model(xb, edits=edits)[0] for xb in windows[:, :-1].split(BATCH)])  # (n, T, vocab)
    losses = token_losses(logits, windows[:, 1:])
    probs = F.softmax(logits, dim=-1)
    keep, done = [], 0  # done: how many predictions earlier windows scored
    for w, start in enumerate(starts):
        first = done - start  # the first position of this window not scored yet
        keep += [(w, p) for p in range(first, T)]
        done = start + T
    w, p = torch.tensor(keep).T
    top = probs[w, p].topk(min(top_k, probs.shape[-1]), dim=-1)
    return CharLosses(losses[w, p], p + 1, top.indices, top.values)


# Ablations: knock out heads or neurons.

def _where(mask: torch.Tensor, value: torch.Tensor | float) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit for a batch of `copies` runs stacked along the batch axis (mask.shape[0] of them;
    1 for a single run): where mask (copies, 1, 1, *unit dims) is true, the activation becomes
    value (zero, a mean, another run's), broadcast over the batch and positions."""
    def edit(x: torch.Tensor) -> torch.Tensor:
        stacked = x.view(mask.shape[0], -1, *x.shape[1:])  # (copies, B, T, ...)
        return torch.where(mask, value, stacked).view(x.shape)
    return edit


def _copy_c_loses_head_c(value: torch.Tensor | float, copies: int, n_head: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ranking's edit of hook_z on `copies` stacked runs: copy c < n_head loses head c. In
    place, so only the knocked-out slices are written (torch.where would rewrite the whole
    batch); safe here, with no gradients and no cache."""
    def edit(z: torch.Tensor) -> torch.Tensor:
        stacked = z.view(copies, -1, *z.shape[1:])  # (copies, B, T, head, d_head): a view, writes reach z
        for c in range(n_head):
            stacked[c, :, :, c] = value if isinstance(value, float) else value[c]
        return z
    return edit


def _last_copy_loses_all(value: torch.Tensor | float, copies: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ranking's edit of hook_post: the last of `copies` stacked runs loses the whole MLP (in place)."""
    def edit(post: torch.Tensor) -> torch.Tensor:
        post.view(copies, -1, *post.shape[1:])[-1] = value
        return post
    return edit


def _fill(means: Means | None, name: str) -> torch.Tensor | float:
    return 0.0 if means is None else means[name]


def ablate_heads(model: GPT, heads: Iterable[Head], means: Means | None = None) -> Edits:
    """Edits that knock out heads: their output (hook_z) set to zero, or to its mean over the
    validation windows if means (activation_means) are given."""
    masks: dict[int, torch.Tensor] = {}
    for layer, head in heads:
        if layer not in masks:
            masks[layer] = torch.zeros(1, 1, 1, model.config.n_head, 1, dtype=torch.bool)  # (copies, B, T, head, d_head)
        masks[layer][..., head, :] = True
    edits = {}
    for layer, mask in masks.items():
        name = z_name(layer)
        edits[name] = _where(mask, _fill(means, name))
    return edits


def ablate_neurons(model: GPT, neurons: Iterable[tuple[int, int]], means: Means | None = None) -> Edits:
    """Edits that knock out MLP neurons (layer, index): hook_post set to zero or to its mean."""
    masks: dict[int, torch.Tensor] = {}
    for layer, neuron in neurons:
        if layer not in masks:
            masks[layer] = torch.zeros(1, 1, 1, model.config.mlp_size, dtype=torch.bool)  # (copies, B, T, d_mlp)
        masks[layer][..., neuron] = True
    edits = {}
    for layer, mask in masks.items():
        name = mlp_post_name(layer)
        edits[name] = _where(mask, _fill(means, name))
    return edits


def ablate_mlps(model: GPT, layers: Iterable[int], means: Means | None = None) -> Edits:
    """Edits that knock out every neuron of the MLPs of these layers."""
    return ablate_neurons(model, [(layer, n) for layer in layers for n in range(model.config.mlp_size)], means)


def _keep(names: list[str]) -> tuple[Cache, Edits]:
    """Edits that change nothing and keep these activations in the returned dict: unlike a
    cache, they leave attention on the fused path and keep no attention weights."""
    kept: Cache = {}

    def keeper(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: kept.setdefault(name, t)
    return kept, {name: keeper(name) for name in names}


def activation_means(model: GPT, x: torch.Tensor) -> Means:
    """Every head's output (hook_z: (H, d_head)) and every MLP neuron (hook_post: (d_mlp,))
    averaged over the windows x and their positions: what a mean-ablation puts in."""
    names = [z_name(i) for i in range(model.config.n_layer)]
    if model.config.feed_forward:
        names += [mlp_post_name(i) for i in range(model.config.n_layer)]
    sums = dict.fromkeys(names, 0.0)
    with evaluating(model):
        for xb in x.split(BATCH):
            kept, keep = _keep(names)
            model(xb, edits=keep)
            for name in names:
                sums[name] = sums[name] + kept[name].sum((0, 1))
    return {name: s / (x.shape[0] * x.shape[1]) for name, s in sums.items()}


@dataclass
class Ranking:
    """What removing each head alone (and each layer's MLP) costs: the change in val loss."""
    base: float  # the loss with nothing removed
    heads: torch.Tensor  # (L, H)
    mlps: torch.Tensor  # (L,); empty without feed-forward layers


def rank_ablations(model: GPT, x: torch.Tensor, y: torch.Tensor, means: Means | None = None) -> Ranking:
    """Δ val loss of knocking out each head alone and each MLP alone, on windows x, y.

    One run keeps each layer's input; then, for each layer, its heads (and its MLP) are knocked out in one
    batch of stacked copies that starts from that layer's hook_resid_pre: the layers below are
    the same with or without the knock-out, so they are not computed again.
    """
    cfg = model.config
    L, H, mlp = cfg.n_layer, cfg.n_head, cfg.feed_forward
    copies = H + mlp  # copy h < H loses head h; the last (with an MLP) loses the layer's MLP
    base, lost = torch.zeros(()), torch.zeros(L, copies)
    # Each stacked run holds about BATCH sequences, as a plain run does, so that its activations
    # stay in the CPU's caches (a stack of BATCH windows per copy was slower: benchmarks/README.md).
    windows = max(1, BATCH // copies)
    with evaluating(model):
        for xb, yb in zip(x.split(windows), y.split(windows)):
            cache, keep = _keep([resid_pre_name(layer) for layer in range(L)])
            base += token_losses(model(xb, edits=keep)[0], yb).sum()
            for layer in range(L):
                z = z_name(layer)
                edits = {z: _copy_c_loses_head_c(_fill(means, z), copies, H)}
                if mlp:
                    post = mlp_post_name(layer)
                    edits[post] = _last_copy_loses_all(_fill(means, post), copies)
                resid = cache[resid_pre_name(layer)].repeat(copies, 1, 1)  # (copies * B, T, C)
                logits = model.forward_from(layer, resid, edits)
                lost[layer] += token_losses(logits, yb.repeat(copies, 1)).view(copies, -1).sum(1)
    n = y.numel()
    delta = (lost - base) / n
    return Ranking(float(base) / n, delta[:, :H], delta[:, H:].flatten())


def rank_ablations_full(model: GPT, x: torch.Tensor, y: torch.Tensor, means: Means | None = None) -> Ranking:
    """rank_ablations the plain way: one full forward pass for each head and each MLP. The
    reference it is tested and timed against."""
    cfg = model.config
    base = val_loss(model, x, y)
    heads = torch.tensor([[val_loss(model, x, y, ablate_heads(model, [(layer, h)], means)) - base
                           for h in range(cfg.n_head)] for layer in range(cfg.n_layer)])
    mlps = torch.tensor([val_loss(model, x, y, ablate_mlps(model, [layer], means)) - base
                         for layer in range(cfg.n_layer)] if cfg.feed_forward else [])
    return Ranking(base, heads, mlps)


# Activation patching.

def patch(name: str, source: torch.Tensor, positions: Iterable[int] | None = None) -> Edits:
    """An edit that replaces the activation `name` with `source`'s (the same activation from
    another run, e.g. cache[name] of a clean prompt) at these positions (all if None)."""
    def edit(x: torch.Tensor) -> torch.Tensor:
        if positions is None:
            return source.expand_as(x).clone()
        x = x.clone()
        pos = list(positions)
        x[:, pos] = source[:, pos]
        return x
    return {name: edit}


@dataclass
class Patching:
    """How much of the clean logit difference each patch brings back: 1 = the clean run's,
    0 = the corrupted run's. The logit difference is target's logit minus foil's at the last position."""
    resid: torch.Tensor  # (L, T): hook_resid_pre of each layer, patched at one position
    heads: torch.Tensor  # (L, H): one head's output (hook_z), patched at every position
    clean_diff: float
    corrupt_diff: float
    target: int
    foil: int


def logit_diff(logits: torch.Tensor, target: int, foil: int) -> torch.Tensor:
    """Target's logit minus foil's at the last position: (..., T, vocab) -> (...)."""
    return logits[..., -1, target] - logits[..., -1, foil]


def patching(model: GPT, clean: list[int], corrupt: list[int], target: int, foil: int | None = None) -> Patching:
    """Patch the clean run into the corrupted one, at each layer and position of the residual
    stream and for each head, and measure the recovered logit difference (see Patching).
    foil: the character to tell target from; by default the corrupted run's favourite (other than target)."""
    if len(clean) != len(corrupt) or not clean:
        raise ValueError(f"the prompts must have the same length, not {len(clean)} and {len(corrupt)} characters")
    cfg = model.config
    L, H, T = cfg.n_layer, cfg.n_head, len(clean)
    names = [name for layer in range(L) for name in (resid_pre_name(layer), z_name(layer))]
    clean_cache, keep_clean = _keep(names)
    corrupt_cache, keep_corrupt = _keep(names)
    with evaluating(model):
        clean_logits, _ = model(torch.tensor([clean]), edits=keep_clean)
        corrupt_logits, _ = model(torch.tensor([corrupt]), edits=keep_corrupt)
        if foil is None:
            ranked = corrupt_logits[0, -1].argsort(descending=True).tolist()
            foil = next(i for i in ranked if i != target)
        if foil == target:
            raise ValueError("the foil must differ from the target")
        clean_diff, corrupt_diff = (float(logit_diff(lg, target, foil)[0]) for lg in (clean_logits, corrupt_logits))
        if abs(clean_diff - corrupt_diff) < 1e-6:
            raise ValueError("both prompts give the same logit difference: there is nothing to recover")
        recovered = lambda logits: (logit_diff(logits, target, foil) - corrupt_diff) / (clean_diff - corrupt_diff)
        resid, heads = torch.zeros(L, T), torch.zeros(L, H)
        one_position = torch.eye(T, dtype=torch.bool)[:, :, None]  # copy t patches position t
        for layer in range(L):
            name = resid_pre_name(layer)
            patched = torch.where(one_position, clean_cache[name], corrupt_cache[name])  # (T copies, T, C)
            resid[layer] = recovered(model.forward_from(layer, patched))
            z = z_name(layer)
            one_head = torch.eye(H, dtype=torch.bool).view(H, 1, 1, H, 1)  # copy h patches head h
            edits = {z: _where(one_head, clean_cache[z])}
            heads[layer] = recovered(model.forward_from(layer, corrupt_cache[name].repeat(H, 1, 1), edits))
    return Patching(resid, heads, clean_diff, corrupt_diff, target, foil)


# What each head does: previous-token, first-token and induction heads.

def induction_probe(vocab_size: int, length: int, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """Random characters repeated once: (batch, 2 * length). A model that copies from earlier in
    the context (induction heads) predicts the second copy; nothing predicts the first."""
    first = torch.randint(vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    return torch.cat([first, first], dim=1)


def induction_score(pattern: torch.Tensor, length: int) -> torch.Tensor:
    """How much each head attends as an induction head on the probe: attention weights
    (..., 2 * length, 2 * length) -> (...). A query at t in the second copy holds the character
    of t - length; an induction head looks at what followed it, t - length + 1. The mean weight
    there over the second copy's queries: 1 for a perfect induction head."""
    t = torch.arange(length, 2 * length)
    return pattern[..., t, t - length + 1].mean(-1)


def _probe_run(model: GPT, batch: int, seed: int) -> tuple[torch.Tensor, Cache, int]:
    length = model.config.block_size // 2
    probe = induction_probe(model.config.vocab_size, length, batch, seed).to(next(model.parameters()).device)
    cache: Cache = {}
    with evaluating(model):
        logits, _ = model(probe, cache=cache)
    return token_losses(logits[:, :-1], probe[:, 1:]), cache, length


def induction_scores(model: GPT, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """Every head's induction score (L, H) on a probe of half a block repeated (one forward
    pass of batch x block_size characters: cheap enough for every snapshot of a training)."""
    _, cache, length = _probe_run(model, batch, seed)
    return induction_score(torch.stack([patterns(cache, b) for b in range(batch)]), length).mean(0)


@dataclass
class InContext:
    """The loss on the probe's first copy (random: nothing to learn from) and on its second copy
    (a model that reads its context can copy it). The gap is in-context learning."""
    first: float
    second: float

    @property
    def gap(self) -> float:
        return self.first - self.second


def icl_gap(model: GPT, batch: int = 4, seed: int = 0) -> InContext:
    """The model's loss on the first and on the second copy of the induction probe."""
    losses, _, length = _probe_run(model, batch, seed)  # position t predicts character t + 1
    # The second copy's first character cannot be told from the first copy: left out.
    return InContext(float(losses[:, : length - 1].mean()), float(losses[:, length:].mean()))


def head_types(model: GPT, x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per head (L, H): previous_token and first_token, the mean weight on the previous and on the
    first position over windows x; induction, the induction score on the probe."""
    with evaluating(model):
        cache: Cache = {}
        model(x[:BATCH], cache=cache)
    stats = head_stats(torch.stack([patterns(cache, b) for b in range(min(BATCH, len(x)))])).items()
    means = {name: s.mean(0) for name, s in stats}
    return {"previous_token": means["prev_char"], "first_token": means["first_char"],
            "induction": induction_scores(model, seed=seed)}
