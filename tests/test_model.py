"""The model's contract: shapes, the cache, causality, fused == explicit, sampling."""

import math

import pytest
import torch

from core import GPT, PRESETS, GPTConfig
from core.lens import attention_step, logit_lens, run_with_cache
from core.model import KVCache
from helpers import tiny_config, tiny_model

ATTENTION_PRESETS = [p for p in PRESETS if p != "bigram"]


def tokens(cfg: GPTConfig, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_logits_shape_and_loss(preset):
    model = tiny_model(preset)
    idx = tokens(model.config)
    logits, loss = model(idx)
    assert logits.shape == (2, model.config.block_size, model.config.vocab_size)
    assert loss is None
    _, loss = model(idx, targets=idx)
    # A fresh model guesses uniformly: loss close to ln(vocab_size), the lecture's "expected loss".
    assert abs(loss.item() - math.log(model.config.vocab_size)) < 0.1


@pytest.mark.parametrize("preset", list(PRESETS))
def test_causality(preset):
    """Changing token t leaves the logits at every earlier position unchanged."""
    model = tiny_model(preset)
    idx = tokens(model.config, B=1)
    t = model.config.block_size // 2
    changed = idx.clone()
    changed[0, t] = (idx[0, t] + 1) % model.config.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t], b[:, t])  # the change itself is seen at position t


@pytest.mark.parametrize("preset", ATTENTION_PRESETS)
def test_fused_and_explicit_paths_agree(preset):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset, vocab_size=65)).eval()  # the lecture's own sizes
    idx = tokens(model.config)
    fast, _ = model(idx)
    traced, _ = model(idx, cache={})
    assert (fast - traced).abs().max().item() <= 1e-5


def test_cpu_autocast_keeps_attention_in_float32():
    """Under bfloat16 autocast a CPU runs attention in float32 (its bfloat16 kernel is slower);
    the logits stay close to float32's."""
    from core.model import _attention
    q = k = v = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    model = tiny_model("layernorm")
    idx = tokens(model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _attention(q, k, v, is_causal=True).dtype == torch.float32
        low, _ = model(idx)
    torch.testing.assert_close(low.float(), model(idx)[0], atol=0.05, rtol=0.05)


@pytest.mark.parametrize("preset", ATTENTION_PRESETS)
def test_attention_pattern_properties(preset):
    model = tiny_model(preset)
    _, cache = run_with_cache(model, tokens(model.config))
    T = model.config.block_size
    above = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    for i in range(model.config.n_layer):
        pattern = cache[f"blocks.{i}.attn.hook_pattern"]
        scores = cache[f"blocks.{i}.attn.hook_attn_scores"]
        assert pattern.shape == (2, model.config.n_head, T, T)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, model.config.n_head, T))
        assert (pattern[..., above] == 0).all()
        assert torch.isneginf(scores[..., above]).all()  # -inf exactly above the diagonal
        assert torch.isfinite(scores[..., ~above]).all()


def test_cache_names_and_shapes():
    model = tiny_model("layernorm")
    cfg = model.config
    B, T, C, H, hs = 2, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.head_size
    _, cache = run_with_cache(model, tokens(cfg))
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        for name in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "ln1.hook_normalized", "ln2.hook_normalized"):
            assert cache[p + name].shape == (B, T, C), name
        for name in ("hook_q", "hook_k", "hook_v", "hook_z"):
            assert cache[p + "attn." + name].shape == (B, T, H, hs), name
        assert cache[p + "mlp.hook_pre"].shape == (B, T, 4 * C)
        assert cache[p + "mlp.hook_post"].shape == (B, T, 4 * C)
        assert (cache[p + "mlp.hook_post"] >= 0).all()  # ReLU
        assert not any(t.requires_grad for t in cache.values())
    assert cache["ln_final.hook_normalized"].shape == (B, T, C)


def test_stages_without_a_component_have_no_entry():
    _, cache = run_with_cache(tiny_model("multi_head"), tokens(tiny_config("multi_head")))
    assert not any("mlp" in name or "ln" in name or "resid_mid" in name for name in cache)
    assert "blocks.0.attn.hook_pattern" in cache


def test_attention_steps_derive_from_the_cache():
    model = tiny_model("layernorm")
    _, cache = run_with_cache(model, tokens(model.config))
    raw = attention_step(cache, 0, "raw")
    scaled = attention_step(cache, 0, "scaled")
    masked = attention_step(cache, 0, "masked")
    torch.testing.assert_close(scaled, raw / math.sqrt(model.config.head_size))
    keep = torch.isfinite(masked)
    torch.testing.assert_close(masked[keep], scaled[keep])
    torch.testing.assert_close(torch.softmax(masked, -1), attention_step(cache, 0, "softmax"))
    with pytest.raises(ValueError):
        attention_step(cache, 0, "cubed")


def test_z_is_the_pattern_weighted_sum_of_values():
    _, cache = run_with_cache(tiny_model("layernorm"), tokens(tiny_config()))
    pattern = cache["blocks.1.attn.hook_pattern"]  # (B, H, T, T)
    v = cache["blocks.1.attn.hook_v"].transpose(1, 2)  # (B, H, T, hs)
    torch.testing.assert_close((pattern @ v).transpose(1, 2), cache["blocks.1.attn.hook_z"])


def test_logit_lens_last_layer_is_the_model_output():
    model = tiny_model("layernorm")
    logits, cache = run_with_cache(model, tokens(model.config))
    probs = logit_lens(model, cache)
    assert probs.shape == (model.config.n_layer + 1, *logits.shape)
    torch.testing.assert_close(probs[-1], torch.softmax(logits, -1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_bigram_logits_are_rows_of_its_table():
    model = tiny_model("bigram")
    idx = tokens(model.config)
    logits, _ = model(idx)
    torch.testing.assert_close(logits, model.token_embedding_table.weight[idx])


def test_tied_weights_and_gelu():
    model = tiny_model("layernorm", tie_weights=True, activation="gelu")
    assert model.lm_head.weight is model.token_embedding_table.weight
    _, cache = run_with_cache(model, tokens(model.config))
    assert (cache["blocks.0.mlp.hook_post"] < 0).any()  # GELU lets small negatives through


def test_num_params_and_flops():
    cfg = GPTConfig.from_preset("full", vocab_size=65)
    model = GPT(cfg)
    lecture = 10_788_929  # the lecture's final model (its keys, queries and values have no bias)
    assert model.num_params(non_embedding=False) == lecture
    assert model.num_params() == lecture - 256 * 384
    # nanoGPT's shape, with q/k/v biases, stays one switch away: 6 layers x 3 x 384 more.
    assert GPT(GPTConfig.from_preset("full", vocab_size=65, qkv_bias=True)).num_params(False) == lecture + 6 * 3 * 384
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 6 * 384 * 256


def test_mlp_ratio_sets_the_feed_forward_width():
    lecture = GPT(GPTConfig.from_preset("full", vocab_size=65))
    narrow = GPT(GPTConfig.from_preset("full", vocab_size=65, mlp_ratio=2))
    assert narrow.blocks[0].ffwd.fc.out_features == narrow.blocks[0].ffwd.proj.in_features == 2 * 384
    # Two of the four 384-wide columns gone from each of 6 MLPs: 2 x 2 x 384^2 weights and 2 x 384 biases.
    assert lecture.num_params(False) - narrow.num_params(False) == 6 * (4 * 384 * 384 + 2 * 384)
    # Before the residual stage the MLP is n_embd wide whatever the ratio (the lecture's first FeedForward).
    ffn = GPTConfig.from_preset("ffn", mlp_ratio=2)
    assert GPT(ffn).blocks[0].ffwd.fc.out_features == ffn.n_embd
    # A checkpoint written before the setting existed has the lecture's 4x.
    saved = {k: v for k, v in lecture.config.to_dict().items() if k != "mlp_ratio"}
    assert GPTConfig.from_dict(saved).mlp_ratio == 4


# Sampling -------------------------------------------------------------------------------


def test_generate_is_deterministic_for_a_seeded_generator():
    model = tiny_model("layernorm")
    start = torch.zeros((1, 1), dtype=torch.long)
    a = model.generate(start, 30, generator=torch.Generator().manual_seed(7))
    b = model.generate(start, 30, generator=torch.Generator().manual_seed(7))
    c = model.generate(start, 30, generator=torch.Generator().manual_seed(8))
    assert a.shape == (1, 31) and torch.equal(a, b) and not torch.equal(a, c)


def test_generate_crops_context_beyond_block_size():
    model = tiny_model("layernorm")
    out = model.generate(torch.zeros((1, 1), dtype=torch.long), 3 * model.config.block_size)
    assert out.shape[1] == 1 + 3 * model.config.block_size


@pytest.mark.parametrize("preset", ["bigram", "one_head", "layernorm"])
def test_kv_cache_samples_the_same_characters(preset):
    """Across several window slides, the key/value cache changes the speed, not the text."""
    model = tiny_model(preset, seed=1)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    n = 3 * model.config.block_size
    fast = list(model.generate_stream(prompt, n, generator=torch.Generator().manual_seed(5)))
    slow = list(model.generate_stream(prompt, n, generator=torch.Generator().manual_seed(5), kv_cache=False))
    assert torch.equal(torch.cat([t for t, _ in fast], 1), torch.cat([t for t, _ in slow], 1))
    for (_, p_fast), (_, p_slow) in zip(fast, slow):
        torch.testing.assert_close(p_fast, p_slow, atol=1e-6, rtol=1e-5)


def test_kv_forward_matches_full_forward():
    model = tiny_model("layernorm")
    idx = tokens(model.config, B=1)
    full, _ = model(idx)
    kv = KVCache(model, 1)
    first, _ = model(idx[:, :5], kv=kv)
    rest = [model(idx[:, t:t + 1], kv=kv)[0] for t in range(5, idx.shape[1])]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_rows_of_different_lengths_step_together():
    """Two rows whose prompts differ in length, then one batched step each: the same logits as
    each row's own full forward (the mask hides the other row's extra positions)."""
    model = tiny_model("layernorm")
    a, b = tokens(model.config, B=1)[0, :7], tokens(model.config, B=1, seed=1)[0, :4]
    kv = KVCache(model, 2)
    for row, prompt in ((0, a), (1, b)):  # each row's prompt alone, into its own row of the cache
        model(prompt[None], kv=kv.rows(row, row + 1))
    assert kv.lengths.tolist() == [7, 4]
    nxt = torch.tensor([[3], [5]])
    step, _ = model(nxt, kv=kv)
    for row, prompt in ((0, a), (1, b)):
        alone, _ = model(torch.cat([prompt, nxt[row]])[None])
        torch.testing.assert_close(step[row, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_top_k_1_equals_greedy():
    model = tiny_model("layernorm", seed=3)
    start = torch.tensor([[1, 2, 3]])
    greedy = model.generate(start, 20, temperature=0)
    top1 = model.generate(start, 20, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, top1)


def test_stream_yields_distributions_that_sum_to_one():
    model = tiny_model("layernorm")
    steps = list(model.generate_stream(torch.tensor([[1]]), 5, temperature=0.8, top_k=5, top_p=0.9,
                                       generator=torch.Generator().manual_seed(0)))
    assert len(steps) == 5
    for tok, probs in steps:
        assert probs.shape == (1, model.config.vocab_size)
        torch.testing.assert_close(probs.sum(-1), torch.ones(1))
        assert probs[0, tok.item()] > 0  # the token was drawn from this distribution
        assert (probs > 0).sum() <= 5  # top_k kept at most 5 characters


def test_top_p_keeps_the_smallest_set():
    from core.model import _filter_logits
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter_logits(logits, None, torch.tensor([0.75])))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 >= 0.75


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_sampled_together_get_what_each_gets_alone(dtype):
    """The engine's batched draw (each row its own settings and generator) against sample_next on
    that row alone: the same token and the same distribution, bit for bit."""
    from core.model import sample_next, sample_rows
    settings = [(1.0, None, None), (0.0, 5, 0.5), (0.8, 5, None), (1.3, None, 0.9), (0.7, 3, 0.8), (1e-7, None, None),
                (2.0, 65, 1.0), (0.5, 1, None)] * 4
    logits = 3 * torch.randn(len(settings), 65, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for step in range(5):
        alone = [sample_next(logits[i:i + 1], t, k, p, torch.Generator().manual_seed(100 * step + i))
                 for i, (t, k, p) in enumerate(settings)]
        tokens, probs = sample_rows(logits, *map(list, zip(*settings)),
                                    [torch.Generator().manual_seed(100 * step + i) for i in range(len(settings))])
        assert tokens == [int(tok) for tok, _ in alone]
        assert torch.equal(probs, torch.cat([p for _, p in alone]))
        logits = logits.roll(1, dims=0)
    assert len(set(tokens)) > 5  # the draws differ from row to row: the test can tell rows apart


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=0),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=-1)])
def test_bad_sampling_values_raise(kwargs):
    model = tiny_model("layernorm")
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError):
        model.generate(torch.tensor([[1]]), **args)


def test_sequence_longer_than_block_size_raises():
    model = tiny_model("layernorm")
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros((1, model.config.block_size + 1), dtype=torch.long))


# Config errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=30, n_head=4), r"n_embd \(30\) must be divisible by n_head \(4\).*n_embd=28 or 32"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(block_size=-8), "block_size must be a positive integer"),
    (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
    (dict(n_head=True), "n_head must be a positive integer"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(attention=False, tie_weights=True), "tie_weights needs attention"),
    (dict(mlp_ratio=0), "mlp_ratio must be a positive integer"),
])
def test_config_errors_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="bigram"):
        GPTConfig.from_preset("huge")


def test_presets_switch_on_the_lecture_steps_in_order():
    steps = [(c.get("attention", True), c.get("feed_forward", True), c.get("residual", True), c.get("layer_norm", True))
             for c in PRESETS.values()]
    assert [sum(s) for s in steps] == sorted(sum(s) for s in steps)
    assert list(PRESETS) == ["bigram", "one_head", "multi_head", "ffn", "residual", "layernorm", "full"]
