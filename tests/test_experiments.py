"""core.experiments against brute-force references: ablations, patching, losses, head scores."""

import copy

import pytest
import torch
from torch.nn import functional as F

from core import experiments as E
from core.data import Corpus
from core.lens import act_name, run_with_cache
from helpers import tiny_model


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def model():
    """Three layers of three heads, with biases drawn at random (they start at zero) so that a
    knock-out must remove the value bias too."""
    model = tiny_model("layernorm", n_layer=3, n_head=3, n_embd=24, qkv_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def ids(seed: int, T: int = 12, vocab: int = 20) -> torch.Tensor:
    return torch.randint(vocab, (2, T), generator=torch.Generator().manual_seed(seed))


def test_val_windows_are_evenly_spread_fixed_and_cover_enough_characters(shakespeare):
    corpus = Corpus(shakespeare, 64)
    x, y = E.val_windows(corpus, 64)
    assert x.shape == y.shape == (64, 64) and y.numel() >= E.VAL_CHARS
    val = corpus.splits["val"]
    assert torch.equal(x[0], val[:64]) and torch.equal(y[-1], val[-64:])  # from the split's start to its end
    assert torch.equal(x[:, 1:], y[:, :-1])
    again, _ = E.val_windows(val, 64)
    assert torch.equal(again, x)


def test_token_losses_and_val_loss_match_cross_entropy(model):
    x, y = ids(0), ids(1)
    logits, loss = model(x, y)
    per = E.token_losses(logits, y)
    ref = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    torch.testing.assert_close(per, ref)
    assert E.val_loss(model, x, y) == pytest.approx(float(loss.detach()), abs=1e-6)


def test_char_losses_of_a_short_text_are_the_models_cross_entropy(model):
    text = ids(2)[0]
    out = E.char_losses(model, text.tolist(), top_k=3)
    logits, _ = model(text[None, :-1])
    torch.testing.assert_close(out.loss, F.cross_entropy(logits[0], text[1:], reduction="none"))
    assert torch.equal(out.context, torch.arange(1, len(text)))
    probs = F.softmax(logits[0], -1)
    assert torch.equal(out.top_ids[:, 0], probs.argmax(-1))
    torch.testing.assert_close(out.top_probs[:, 0], probs.max(-1).values)


def test_char_losses_of_a_long_text_read_each_character_with_its_own_context(model):
    T = model.config.block_size
    text = torch.randint(20, (3 * T + 5,), generator=torch.Generator().manual_seed(3))
    out = E.char_losses(model, text)
    assert len(out.loss) == len(text) - 1
    assert (out.context[T:] >= T // 2).all() and (out.context <= T).all()
    for i in range(len(text) - 1):  # brute force: character i + 1 after exactly its context
        c = int(out.context[i])
        logits, _ = model(text[None, i + 1 - c: i + 1])
        assert float(out.loss[i]) == pytest.approx(float(F.cross_entropy(logits[0, -1], text[i + 1])), abs=1e-5)


def zeroed_values(model, layer: int, head: int):
    """A copy of the model with one head's value weights and bias set to zero by hand."""
    hand = copy.deepcopy(model)
    C, hs = model.config.n_embd, model.config.head_size
    rows = slice(2 * C + head * hs, 2 * C + (head + 1) * hs)  # qkv stacks q, k, v; v's rows of this head
    with torch.no_grad():
        hand.blocks[layer].sa.qkv.weight[rows] = 0
        hand.blocks[layer].sa.qkv.bias[rows] = 0
    return hand


@pytest.mark.parametrize("layer,head", [(0, 0), (1, 2), (2, 1)])
def test_zero_ablating_a_head_equals_zeroing_its_value_weights(model, layer, head):
    x = ids(4)
    ablated, _ = model(x, edits=E.ablate_heads(model, [(layer, head)]))
    expected, _ = zeroed_values(model, layer, head)(x)
    torch.testing.assert_close(ablated, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(ablated, model(x)[0])


def test_mean_ablation_puts_the_mean_in_and_neurons_can_be_knocked_out(model):
    x = ids(5)
    means = E.activation_means(model, x)
    z = act_name("hook_z", 1, "attn")
    _, cache = run_with_cache(model, x)
    torch.testing.assert_close(means[z], cache[z].mean((0, 1)))
    seen = {}
    edits = E.ablate_heads(model, [(1, 2)], means)
    edits[z] = (lambda f: lambda t: seen.setdefault("z", f(t)))(edits[z])
    model(x, edits=edits)
    assert torch.equal(seen["z"][:, :, 2], means[z][2].expand(2, 12, -1))
    torch.testing.assert_close(seen["z"][:, :, :2], cache[z][:, :, :2])  # fused and explicit attention: equal to rounding
    post = act_name("hook_post", 0, "mlp")
    got = {}
    edits = {**E.ablate_neurons(model, [(0, 3), (0, 7)])}
    edits[post] = (lambda f: lambda t: got.setdefault("post", f(t)))(edits[post])
    model(x, edits=edits)
    assert (got["post"][..., [3, 7]] == 0).all()
    torch.testing.assert_close(got["post"][..., :3], cache[post][..., :3])


@pytest.mark.parametrize("mean", [False, True])
def test_fast_ranking_equals_the_full_recompute(model, mean):
    x, y = ids(6, vocab=20), ids(7, vocab=20)
    x, y = torch.cat([x] * 5), torch.cat([y] * 5)  # 10 windows: more than one batch
    means = E.activation_means(model, x) if mean else None
    fast, full = E.rank_ablations(model, x, y, means), E.rank_ablations_full(model, x, y, means)
    assert fast.heads.shape == (3, 3) and fast.mlps.shape == (3,)
    assert fast.base == pytest.approx(full.base, abs=1e-6)
    torch.testing.assert_close(fast.heads, full.heads, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.mlps, full.mlps, atol=1e-5, rtol=0)
    assert torch.equal(fast.heads.flatten().argsort(), full.heads.flatten().argsort())


def test_ranking_without_mlps():
    model = tiny_model("multi_head", n_head=2)
    x, y = ids(8), ids(9)
    fast, full = E.rank_ablations(model, x, y), E.rank_ablations_full(model, x, y)
    assert fast.mlps.numel() == 0
    torch.testing.assert_close(fast.heads, full.heads, atol=1e-5, rtol=0)


def test_forward_from_a_layer_continues_the_run(model):
    x = ids(10)
    logits, cache = run_with_cache(model, x)
    for layer in range(3):
        torch.testing.assert_close(model.forward_from(layer, cache[act_name("hook_resid_pre", layer)]), logits,
                                   atol=1e-5, rtol=1e-5)


def test_patching_every_position_of_every_layer_recovers_the_clean_logits(model):
    clean, corrupt = ids(11), ids(12)
    clean_logits, cache = run_with_cache(model, clean)
    edits = {}
    for layer in range(3):
        edits |= E.patch(act_name("hook_resid_pre", layer), cache[act_name("hook_resid_pre", layer)])
    # With a cache to fill, both runs take the same (explicit) attention path: equal to the bit.
    assert torch.equal(model(corrupt, cache={}, edits=edits)[0], clean_logits)
    some = E.patch(act_name("hook_resid_pre", 0), cache[act_name("hook_resid_pre", 0)], positions=range(12))
    assert torch.equal(model(corrupt, cache={}, edits=some)[0], clean_logits)


def test_patching_map_matches_one_patch_at_a_time(model):
    clean, corrupt = ids(13)[0].tolist(), ids(14)[0].tolist()
    result = E.patching(model, clean, corrupt, target=3)
    assert result.resid.shape == (3, 12) and result.heads.shape == (3, 3)
    _, cc = run_with_cache(model, torch.tensor([clean]))
    diff = lambda logits: (float(E.logit_diff(logits, 3, result.foil)[0]) - result.corrupt_diff) / (
        result.clean_diff - result.corrupt_diff)
    for layer, t in [(0, 0), (1, 5), (2, 11)]:
        name = act_name("hook_resid_pre", layer)
        logits, _ = model(torch.tensor([corrupt]), edits=E.patch(name, cc[name], [t]))
        assert float(result.resid[layer, t]) == pytest.approx(diff(logits), abs=1e-4)
    z = act_name("hook_z", 1, "attn")
    source = cc[z].clone()
    _, corrupt_cache = run_with_cache(model, torch.tensor([corrupt]))
    source[:, :, [0, 2]] = corrupt_cache[z][:, :, [0, 2]]  # only head 1 from the clean run
    logits, _ = model(torch.tensor([corrupt]), edits=E.patch(z, source))
    assert float(result.heads[1, 1]) == pytest.approx(diff(logits), abs=1e-4)
    # The residual stream entering layer 0 at the last position carries everything there is to recover.
    assert float(result.resid[0, -1]) < 1.0 or clean[-1] == corrupt[-1]
    with pytest.raises(ValueError, match="same length"):
        E.patching(model, clean, corrupt[:-1], target=3)


def attention_at(T: int, offset) -> torch.Tensor:
    """A (T, T) pattern with all the weight of query t on key offset(t) (clamped to [0, t])."""
    pattern = torch.zeros(T, T)
    for t in range(T):
        pattern[t, min(max(offset(t), 0), t)] = 1.0
    return pattern


def test_induction_score_is_one_for_an_induction_head_and_zero_for_a_previous_token_head():
    n = 10
    induction = attention_at(2 * n, lambda t: t - n + 1 if t >= n else 0)
    previous = attention_at(2 * n, lambda t: t - 1)
    scores = E.induction_score(torch.stack([induction, previous]), n)
    assert scores.tolist() == [1.0, 0.0]


def test_a_hand_built_induction_model_copies_and_scores_high():
    """A head whose query at t matches the key at t - n + 1 (set by hand through an edit of its
    scores) scores 1; the model's own heads on the same probe are measured as they are."""
    model = tiny_model("layernorm")
    n = model.config.block_size // 2
    probe = E.induction_probe(model.config.vocab_size, n, batch=2)
    assert torch.equal(probe[:, :n], probe[:, n:])
    target = attention_at(2 * n, lambda t: t - n + 1 if t >= n else t)
    edits = {act_name("hook_pattern", 1, "attn"): lambda p: torch.cat([target.expand(2, 1, -1, -1), p[:, 1:]], 1)}
    cache_edit = {}
    model(probe, cache=cache_edit, edits=edits)
    assert float(E.induction_score(cache_edit[act_name("hook_pattern", 1, "attn")][:, 0], n).mean()) == 1.0
    scores = E.induction_scores(model, batch=2)
    assert scores.shape == (2, 2) and ((scores >= 0) & (scores <= 1)).all()


def test_head_types_and_the_in_context_gap(model):
    x = ids(15)
    types = E.head_types(model, x)
    assert set(types) == {"previous_token", "first_token", "induction"}
    assert all(t.shape == (3, 3) for t in types.values())
    gap = E.icl_gap(model)
    assert gap.first > 0 and gap.second > 0 and gap.gap == pytest.approx(gap.first - gap.second)


def test_sampling_with_a_head_knocked_out_is_seeded_and_needs_no_recompute(model):
    start = ids(16)[:1, :4]
    edits = E.ablate_heads(model, [(0, 0), (0, 1), (0, 2)])
    draw = lambda edits, kv: model.generate(start, 20, generator=torch.Generator().manual_seed(0), kv_cache=kv, edits=edits)
    assert torch.equal(draw(edits, True), draw(edits, False))  # the key/value cache changes the speed only
    first_odds = lambda edits: next(model.generate_stream(start, 1, edits=edits))[1]
    assert not torch.allclose(first_odds(edits), first_odds(None))
