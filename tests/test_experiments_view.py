"""The Experiments and Patching views through AppTest: what they show is core.experiments' own."""

import numpy as np
import pytest
from test_app import heat, start, texts

from core import experiments as E
from core.checkpoint import load_checkpoint
from core.data import Corpus
from core.experiments import PATCHING_EXAMPLE
from explorer.glue.widgets import DEFAULT_PROMPT, fitting
from helpers import figure


@pytest.fixture
def tiny(pretrained, shakespeare):
    ckpt = load_checkpoint(pretrained)
    T = ckpt.model.config.block_size
    return ckpt, *E.val_windows(Corpus(shakespeare, T, ckpt.tokenizer), T)


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_knocking_out_a_head_shows_its_cost_on_the_val_windows_the_prompt_and_a_sample(tiny):
    ckpt, x, y = tiny
    at = start("knockouts")
    shown = metrics(at)
    assert float(shown["val loss"]) == pytest.approx(E.val_loss(ckpt.model, x, y), abs=1e-4)
    without = E.val_loss(ckpt.model, x, y, E.ablate_heads(ckpt.model, [(0, 0)]))
    assert float(shown["without layer 0, head 0"]) == pytest.approx(without, abs=1e-4)
    html = at.get("html")[0].proto.body
    prompt = fitting(DEFAULT_PROMPT, ckpt.model.config.block_size)  # the default prompt, cut to fit the model
    assert html.count("<span") == len(prompt) - 1  # every character but the first has a loss
    samples = [c.value for c in at.code]
    assert len(samples) == 2 and all(len(s) == 200 for s in samples)
    at.selectbox(key="exp_head").set_value(1).run()
    assert "without layer 0, head 1" in metrics(at)
    at.radio(key="exp_how").set_value("mean").run()
    means = E.activation_means(ckpt.model, x)
    mean_ablated = E.val_loss(ckpt.model, x, y, E.ablate_heads(ckpt.model, [(0, 1)], means))
    assert float(metrics(at)["without layer 0, head 1"]) == pytest.approx(mean_ablated, abs=1e-4)
    assert not at.exception


def test_the_ranking_is_the_cores_with_a_clickable_point_per_head(tiny):
    ckpt, x, y = tiny
    at = start("knockouts")
    assert not at.get("plotly_chart")  # only on the button
    at.button(key="exp_rank").click().run()
    result = E.rank_ablations(ckpt.model, x, y)
    grid = heat(at)
    np.testing.assert_allclose(grid[:, :-1], result.heads.numpy(), atol=1e-5)
    np.testing.assert_allclose(grid[:, -1], result.mlps.numpy(), atol=1e-5)
    points = figure(at)["data"][1]
    assert len(points["x"]) == ckpt.model.config.n_layer * ckpt.model.config.n_head


def test_head_types_table_and_the_in_context_gap(tiny):
    ckpt, x, _ = tiny
    at = start("knockouts")
    table = at.dataframe[0].value
    cfg = ckpt.model.config
    assert len(table) == cfg.n_layer * cfg.n_head and list(table) == ["previous_token", "first_token", "induction"]
    np.testing.assert_allclose(table["induction"].to_numpy(), E.induction_scores(ckpt.model).flatten().numpy(), atol=1e-6)
    assert float(metrics(at)["loss on the second copy"]) == pytest.approx(E.icl_gap(ckpt.model).second, abs=1e-3)


def test_loss_per_character_colours_every_character_and_lists_the_hardest(tiny):
    ckpt, _, _ = tiny
    at = start("knockouts")
    text = "To be, or not to be: <b>that</b> is the $question$ & *more*\n"  # <, >, / and * are not in the vocabulary
    at.text_area(key="exp_loss_text").set_value(text).run()
    ids = ckpt.tokenizer.encode(text, errors="drop")
    html = at.get("html")[-1].proto.body
    assert html.count("<span") == len(ids) - 1 and "<b>" not in html and "$" not in html
    assert "left out" in texts(at.info) and "(U+002A)" in texts(at.info)
    losses = E.char_losses(ckpt.model, ids)
    assert float(metrics(at)["mean loss per character"]) == pytest.approx(float(losses.loss.mean()), abs=1e-3)
    hardest = at.dataframe[-1].value
    assert hardest["loss"].iloc[0] == pytest.approx(float(losses.loss.max()), abs=1e-4)
    at.text_area(key="exp_loss_text").set_value("T").run()
    assert "at least two characters" in texts(at.warning)


def test_patching_view_shows_the_cores_maps_and_says_what_is_wrong(tiny):
    ckpt, _, _ = tiny
    at = start("patching")
    tok = ckpt.tokenizer
    CLEAN, CORRUPT, TARGET = PATCHING_EXAMPLE
    result = E.patching(ckpt.model, tok.encode(CLEAN), tok.encode(CORRUPT), tok.stoi[TARGET])
    np.testing.assert_allclose(heat(at, 0), result.resid.numpy(), atol=1e-4)
    np.testing.assert_allclose(heat(at, 1), result.heads.numpy(), atol=1e-4)
    assert float(metrics(at)["clean logit difference"]) == pytest.approx(result.clean_diff, abs=0.01)
    at.text_area(key="patch_corrupt").set_value("Exeunt.").run()
    assert "same length" in texts(at.warning) and not at.get("plotly_chart")
    at.text_area(key="patch_corrupt").set_value(CORRUPT.replace("C", "ö", 1)).run()
    assert "'ö'" in texts(at.warning)
    at.text_area(key="patch_corrupt").set_value(CLEAN).run()
    assert "nothing to recover" in texts(at.warning) and not at.exception
