"""core.lens's readers for the explorer: head statistics, LayerNorm in and out, matrices, PCA."""

import math

import pytest
import torch
from torch.nn import functional as F

from core.lens import (
    cache_nbytes,
    cosine_similarity,
    head_matrix,
    head_stats,
    layer_norm_io,
    layer_norms,
    pca_2d,
    residual_streams,
    row_entropy,
    run_with_cache,
)
from helpers import tiny_model

T = 6


def uniform(T: int) -> torch.Tensor:
    """Every query spreads its attention evenly over itself and everything before it."""
    tril = torch.tril(torch.ones(T, T))
    return tril / tril.sum(-1, keepdim=True)


def one_hot(T: int, key_of_query) -> torch.Tensor:
    return F.one_hot(torch.tensor([key_of_query(t) for t in range(T)]), T).float()


def test_entropy_of_uniform_rows_is_log_t_plus_1():
    torch.testing.assert_close(row_entropy(uniform(T)), torch.log(torch.arange(1, T + 1).float()))
    stats = head_stats(uniform(T))
    assert math.isclose(stats["entropy"].item(), sum(math.log(t + 1) for t in range(T)) / T, rel_tol=1e-6)
    assert math.isclose(stats["mean_distance"].item(), sum(t / 2 for t in range(T)) / T, rel_tol=1e-6)


def test_a_previous_character_head():
    stats = head_stats(one_hot(T, lambda t: max(t - 1, 0)))
    assert stats["prev_char"].item() == 1
    assert stats["entropy"].item() == 0
    assert math.isclose(stats["mean_distance"].item(), (T - 1) / T, rel_tol=1e-6)  # query 0: itself
    assert math.isclose(stats["first_char"].item(), 1 / (T - 1), rel_tol=1e-6)  # query 1's previous is the first


def test_a_first_character_head():
    stats = head_stats(one_hot(T, lambda t: 0))
    assert stats["first_char"].item() == 1
    assert math.isclose(stats["mean_distance"].item(), (T - 1) / 2, rel_tol=1e-6)


def test_head_stats_keep_leading_dimensions_and_a_single_position_is_nan():
    stats = head_stats(uniform(T).expand(3, 2, T, T))
    assert all(s.shape == (3, 2) for s in stats.values())
    single = head_stats(torch.ones(1, 1))
    assert single["entropy"].item() == 0 and math.isnan(single["prev_char"].item())


@pytest.fixture
def cache():
    model = tiny_model("layernorm")
    return model, run_with_cache(model, torch.randint(0, 20, (1, 10)))[1]


def test_layer_norm_io_is_what_each_layer_norm_read_and_wrote(cache):
    model, cache = cache
    assert layer_norms(cache) == ["blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln_final"]
    modules = {"blocks.1.ln2": model.blocks[1].ln2, "ln_final": model.ln_f, "blocks.0.ln1": model.blocks[0].ln1}
    for name, module in modules.items():
        before, after = layer_norm_io(cache, name)
        torch.testing.assert_close(module(before), after)


def test_residual_streams_and_head_matrices(cache):
    model, cache = cache
    cfg = model.config
    assert residual_streams(cache).shape == (cfg.n_layer + 1, 1, 10, cfg.n_embd)
    assert head_matrix(cache, "blocks.0.attn.hook_pattern", 1).shape == (10, 10)
    assert head_matrix(cache, "blocks.0.attn.hook_q", 1).shape == (10, cfg.head_size)
    assert head_matrix(cache, "blocks.0.mlp.hook_post").shape == (10, 4 * cfg.n_embd)
    torch.testing.assert_close(head_matrix(cache, "blocks.1.attn.hook_z", 1), cache["blocks.1.attn.hook_z"][0, :, 1])


def test_pca_of_points_in_a_plane_keeps_their_distances():
    plane = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    rotate = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(1)))[0][:2]
    points, share = pca_2d(plane @ rotate + 3.0)  # a plane in 5-D, shifted
    assert math.isclose(share, 1.0, rel_tol=1e-5)
    torch.testing.assert_close(torch.cdist(points, points), torch.cdist(plane, plane), atol=1e-4, rtol=1e-4)


def test_cosine_similarity():
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    sim = cosine_similarity(x)
    torch.testing.assert_close(sim, F.cosine_similarity(x[:, None], x[None], dim=-1))
    torch.testing.assert_close(sim.diagonal(), torch.ones(7))


def test_cache_nbytes_counts_each_storage_once():
    x, y = torch.zeros(4, 6), torch.zeros(3, dtype=torch.float64)
    assert cache_nbytes({"a": x, "b": x.view(6, 4), "c": x[:2], "d": y}) == x.nbytes + y.nbytes


def test_cache_nbytes_of_a_run_counts_shared_tensors_once():
    model = tiny_model("layernorm")
    _, cache = run_with_cache(model, torch.zeros((1, T), dtype=torch.long))
    q, k, v = (cache[f"blocks.0.attn.hook_{name}"] for name in "qkv")
    assert cache_nbytes({"q": q}) == cache_nbytes({"q": q, "k": k, "v": v}) == 3 * q.nbytes  # one qkv output
    assert cache_nbytes(cache) < sum(t.nbytes for t in cache.values())
