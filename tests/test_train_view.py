"""The Train view through AppTest: a live run, Stop and Resume, the queue across sessions, a
session that ends, and the messages for bad input.

AppTest gives every instance the same session id; to have several browser sessions, the tests
switch the id that session-scoped caches see before each run (`as_session`).
"""

import re
import threading
from pathlib import Path

import pytest
from streamlit.runtime import caching
from streamlit.testing.v1 import AppTest

from helpers import as_session, figure, rerun_until, wait_for

APP = Path(__file__).resolve().parent.parent / "explorer" / "app.py"
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40
TINY = dict(preset="layernorm", n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_interval=20)


pytestmark = pytest.mark.usefixtures("app_server")  # no runners and no queue before, no thread after


def open_train(session: str = "test session id", **settings) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    with as_session(session):
        at.run()
        at.switch_page("views/training.py").run()
        at.radio(key="train_source").set_value("Paste text").run()
        at.text_area(key="train_paste").set_value(TEXT).run()
        for name, value in {**TINY, **settings}.items():
            widget = at.selectbox if name == "preset" else at.number_input
            if name == "learning_rate":
                widget = at.select_slider
            widget(key=f"train_{name}").set_value(value).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def click(at: AppTest, key: str, session: str = "test session id") -> AppTest:
    with as_session(session):
        at.button(key=key).click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def step(at: AppTest) -> int:
    """The step count in the progress text ("step 40 of 60 · ..."), or -1 before there is one."""
    bars = at.get("progress")
    if not bars:
        return -1
    return int(bars[0].proto.text.split()[1].replace(",", ""))


def loss_points(at: AppTest) -> int:
    """How many steps the loss chart shows."""
    for i in range(len(at.get("plotly_chart"))):
        fig = figure(at, i)
        if fig["layout"].get("title", {}).get("text") == "Loss":
            return len(fig["data"][0]["x"])
    return 0


def test_a_tiny_run_trains_live_and_joins_the_model_picker():
    at = open_train(max_iters=400)
    assert "parameters" in at.info[0].value
    assert rerun_until(at, lambda a: "per 100 steps" in a.info[0].value)  # timed on a thread, shown when done
    click(at, "train_start")
    assert rerun_until(at, lambda a: step(a) > 0)
    first = loss_points(at)
    assert rerun_until(at, lambda a: loss_points(a) > first)  # the curve gains points while it runs
    assert rerun_until(at, lambda a: "Finished" in "".join(s.value for s in a.success))
    assert step(at) == 400
    # "Finished" shows a moment before the training thread has ended; the run after that publishes it.
    assert rerun_until(at, lambda a: any(o.endswith("(trained here)") for o in a.sidebar.selectbox(key="model").options))
    picker = at.sidebar.selectbox(key="model")
    trained = [o for o in picker.options if o.endswith("(trained here)")]
    assert trained == ["layernorm run 1 (trained here)"]
    assert picker.value == trained[0]  # chosen for its owner, who watched it on the Train view
    assert at.get("download_button")  # the checkpoint can be saved
    picker.set_value(trained[0]).run()
    at.switch_page("views/attention.py").run()
    assert "Not in this model's vocabulary" in at.warning[0].value  # it only knows Hamlet's two lines
    at.checkbox(key="prompt_drop").check().run()
    assert not at.exception and not at.error and at.get("plotly_chart")


def test_stop_then_resume():
    at = open_train(max_iters=5000)
    click(at, "train_start")
    assert rerun_until(at, lambda a: step(a) >= 20)
    click(at, "train_stop")
    assert rerun_until(at, lambda a: "Stopped" in "".join(s.value for s in a.success))
    stopped = step(at)
    assert 20 <= stopped < 5000
    assert not at.button(key="train_resume").disabled
    click(at, "train_resume")
    assert rerun_until(at, lambda a: step(a) >= stopped + 20)
    click(at, "train_stop")


def test_the_snapshot_slider_follows_the_newest_until_an_older_one_is_picked():
    at = open_train(max_iters=5000)
    click(at, "train_start")

    def snapshots(a) -> list[int]:
        sliders = [w for w in a.select_slider if w.key == "train_snapshot"]
        return [int(o) for o in sliders[0].options] if sliders else []

    def more_than(n: int) -> bool:
        return rerun_until(at, lambda a: len(snapshots(a)) > n)

    assert more_than(2)
    assert at.select_slider(key="train_snapshot").value == snapshots(at)[-1]
    first = snapshots(at)[0]
    with as_session("test session id"):
        at.select_slider(key="train_snapshot").set_value(first).run()
    assert more_than(len(snapshots(at)))
    assert at.select_slider(key="train_snapshot").value == first  # held while newer ones arrive
    with as_session("test session id"):
        at.select_slider(key="train_snapshot").set_value(snapshots(at)[-1]).run()
    assert more_than(len(snapshots(at)))
    assert at.select_slider(key="train_snapshot").value == snapshots(at)[-1]  # the right end follows again
    click(at, "train_stop")


def test_two_sessions_train_and_a_third_waits_its_turn(monkeypatch):
    monkeypatch.setenv("GPT_EXPLORER_MAX_TRAININGS", "2")
    sessions = {name: open_train(name, max_iters=5000) for name in ("a", "b", "c")}
    for name, at in sessions.items():
        click(at, "train_start", name)
        if name != "c":
            assert rerun_until(at, lambda a: step(a) > 0, name)
    a_step, b_step = step(sessions["a"]), step(sessions["b"])
    assert rerun_until(sessions["a"], lambda a: step(a) > a_step, "a")
    assert rerun_until(sessions["b"], lambda a: step(a) > b_step, "b")
    third = sessions["c"]
    assert rerun_until(third, lambda a: any("number 1 in the queue" in i.value for i in a.info), "c")
    assert any("You should start in about" in i.value for i in third.info)  # from the running ones' step times
    assert any(c.value.startswith("The room: 2 training(s) running and 1 waiting, 2 at a time: all done in about")
               for c in third.caption)
    click(sessions["a"], "train_stop", "a")  # a slot frees up: the third session starts
    assert rerun_until(third, lambda a: step(a) > 0, "c")


def trainings() -> int:
    return sum(t.name == "gpt-explorer-training" for t in threading.enumerate())


def test_a_session_that_ends_stops_its_training():
    before = trainings()
    at = open_train(max_iters=5000)
    click(at, "train_start")
    assert rerun_until(at, lambda a: step(a) > 0)
    assert trainings() == before + 1
    caching.clear_session_resource_cache("test session id")  # what the server does when a tab closes
    assert wait_for(lambda: trainings() == before, timeout=10)


def test_divergence_stops_with_advice():
    # Without LayerNorm, a huge learning rate blows the residual stream up to inf, then NaN.
    at = open_train(max_iters=200, preset="residual", n_layer=3, learning_rate=10.0)
    click(at, "train_start")
    assert rerun_until(at, lambda a: a.error)
    assert "lower learning rate" in at.error[0].value


@pytest.mark.parametrize("settings, message", [
    (dict(n_embd=30, n_head=4), "must be divisible by n_head"),
    (dict(n_layer=12, n_embd=512, n_head=8), "this server allows at most"),
])
def test_impossible_settings_say_why_and_cannot_start(settings, message):
    at = open_train(**settings)
    shown = " ".join(m.value for m in [*at.warning, *at.error])
    assert message in shown
    assert at.button(key="train_start").disabled


def test_text_too_short_for_the_block_says_how_long_it_must_be():
    at = open_train()
    at.text_area(key="train_paste").set_value("short text").run()
    assert "needs at least" in at.warning[0].value
    assert at.button(key="train_start").disabled


def test_a_binary_upload_is_refused():
    at = open_train()
    at.radio(key="train_source").set_value("Upload a .txt file").run()
    at.file_uploader(key="train_upload").upload("data.txt", b"\x00\x01\x02binary", "text/plain").run()
    assert not at.exception
    assert "binary" in at.warning[0].value
    assert at.button(key="train_start").disabled


def charts(at: AppTest) -> dict[str, dict]:
    """The page's Plotly figures by title."""
    found = {}
    for i in range(len(at.get("plotly_chart"))):
        fig = figure(at, i)
        found[fig["layout"].get("title", {}).get("text", "")] = fig
    return found


def test_the_heads_induction_and_in_context_scores_are_drawn_over_training():
    at = open_train(max_iters=60)
    click(at, "train_start")
    assert rerun_until(at, lambda a: "Finished" in "".join(s.value for s in a.success))
    shown = charts(at)
    induction = shown["Induction score of each head"]["data"]
    assert len(induction) == TINY["n_layer"] * TINY["n_head"]  # one line per head
    assert list(induction[0]["x"]) == [0, 50, 60]  # every snapshot, the untrained model's first
    assert "Previous-token score of each head" in shown
    assert len(shown["In-context learning"]["data"][0]["y"]) == 3
    said = [c.value for c in at.caption if "induction head looks at" in c.value]
    assert len(said) == 1 and ("No head has scored 0.1 yet" in said[0] or "first scored" in said[0])


def test_costs_measured_during_the_pages_run_still_size_the_demo(monkeypatch):
    """The costs come from a background thread: when they arrive between the sizing of the steps
    and the estimate's line in one run, the page must still size the steps, not say "sized"
    beside the recipe's unsized ones."""
    from explorer.glue import train_setup
    from explorer.offpage.recipes import RECIPES
    from explorer.offpage.step_times import Costs

    unsized = RECIPES["1-minute demo"][1].max_iters
    asked = []

    def arrives_after_the_first_look(settings, vocab_size):
        asked.append(settings.max_iters)
        return None if len(asked) == 1 else Costs(step_ms=60.0, eval_ms=250.0, look_ms=500.0)

    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    monkeypatch.setattr(train_setup, "costs", arrives_after_the_first_look)
    at.switch_page("views/training.py").run()
    steps = at.number_input(key="train_max_iters").value
    said = re.search(r"about (\d+) s for ([\d,]+) steps with their evaluations and samples, sized to 60 s here",
                     at.info[0].value)
    assert said and int(said[2].replace(",", "")) == steps != unsized and int(said[1]) <= 60, at.info[0].value
    assert asked[0] == unsized  # the recipe's own steps, before the costs came


def test_the_induction_recipe_picks_its_text_and_another_recipe_gives_it_back():
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    at.switch_page("views/training.py").run()
    at.selectbox(key="train_recipe").set_value("Induction heads (a few minutes)").run()
    assert at.radio(key="train_source").value == "Tiny Shakespeare, every line twice"
    assert at.number_input(key="train_n_layer").value == 2 and at.number_input(key="train_block_size").value == 128
    assert "parameters" in at.info[0].value and not at.warning  # the doubled text is there to train on
    at.selectbox(key="train_recipe").set_value("1-minute demo").run()
    assert at.radio(key="train_source").value == "Tiny Shakespeare"
    assert not at.exception


def test_the_1_minute_demo_is_sized_from_this_servers_costs_until_the_steps_are_set_by_hand():
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    at.switch_page("views/training.py").run()
    assert at.selectbox(key="train_recipe").value == "1-minute demo"  # the default recipe
    assert at.selectbox(key="train_optimizer").value == "muon"
    assert rerun_until(at, lambda a: "sized to 60 s here" in a.info[0].value)
    steps = at.number_input(key="train_max_iters").value
    said = re.search(r"about (\d+) s for ([\d,]+) steps with their evaluations and samples", at.info[0].value)
    assert said and int(said[2].replace(",", "")) == steps and steps % 10 == 0, at.info[0].value
    assert 50 <= int(said[1]) <= 60  # the most steps that fit: within a few steps of the minute
    at.number_input(key="train_max_iters").set_value(steps + 100).run()  # the user's own steps stay theirs
    at.run()
    assert at.number_input(key="train_max_iters").value == steps + 100 and "sized" not in at.info[0].value
    at.selectbox(key="train_recipe").set_value("Room (everyone at once)").run()
    assert at.number_input(key="train_max_iters").value == 400 and "sized" not in at.info[0].value
