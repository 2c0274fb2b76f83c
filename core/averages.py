"""The lecture's small worked examples that are not the model itself, as pure torch functions.

"The mathematical trick in self-attention": four ways for each position t to take a weighted
average of positions 0..t. Versions 1 to 3 give the same plain average; version 4 lets the
data choose the weights (self-attention). And get_batch's "when input is ... the target is".
"""

import torch
from torch.nn import functional as F


def toy_input(B: int = 4, T: int = 8, C: int = 2, seed: int = 1337) -> torch.Tensor:
    """The lecture's x: B sequences of T positions, C channels each."""
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed))


def version1_loops(x: torch.Tensor) -> torch.Tensor:
    """xbow[b, t] = mean of x[b, 0..t], with two Python loops ("bag of words")."""
    B, T, C = x.shape
    xbow = torch.zeros(B, T, C)
    for b in range(B):
        for t in range(T):
            xbow[b, t] = x[b, : t + 1].mean(0)
    return xbow


def version2_weights(T: int) -> torch.Tensor:
    """A lower-triangular matrix whose rows sum to 1: `wei @ x` averages in one matmul."""
    wei = torch.tril(torch.ones(T, T))
    return wei / wei.sum(1, keepdim=True)


def version3_weights(T: int) -> torch.Tensor:
    """The same matrix as softmax of zeros with -inf above the diagonal: affinities that
    start equal, where the future cannot be seen."""
    tril = torch.tril(torch.ones(T, T))
    wei = torch.zeros(T, T).masked_fill(tril == 0, float("-inf"))
    return F.softmax(wei, dim=-1)


def version4_head(x: torch.Tensor, head_size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention with one random, untrained head: each position emits a query and a key,
    and their dot products (scaled by 1/sqrt(head_size)) replace the zeros of version 3.
    Returns the weights (B, T, T), one matrix per sequence, and the output wei @ v (B, T, head_size).
    The lecture uses nn.Linear(C, head_size, bias=False); a random matrix is the same thing."""
    B, T, C = x.shape
    g = torch.Generator().manual_seed(seed)
    key, query, value = (torch.randn(C, head_size, generator=g) / C**0.5 for _ in range(3))
    k, q, v = x @ key, x @ query, x @ value  # each (B, T, head_size)
    wei = q @ k.transpose(-2, -1) * head_size**-0.5  # (B, T, T)
    wei = wei.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf"))
    wei = F.softmax(wei, dim=-1)
    return wei, wei @ v


def context_target_pairs(x: list[int], y: list[int]) -> list[tuple[list[int], int]]:
    """What one row of a batch teaches: for every t, the context x[0..t] and its target y[t]."""
    return [(x[: t + 1], y[t]) for t in range(len(x))]
