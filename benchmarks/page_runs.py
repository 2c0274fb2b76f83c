"""What the server's script runs cost in a room. First, the time to build each figure of
explorer/offpage/figures.py from the inputs a view gives it (cpu-best's 6 x 6 heads at 128
characters, a sample of 200, a training's 400 steps, a board of 30), and to serialise it as
st.plotly_chart does (to_dict, to_json). Then the whole-page script runs a room asks of the
server at one moment, timed in Streamlit's AppTest:
- the Sample page showing a finished sample of 200 characters from `pretrained/cpu-best` (the text
  to click, the odds of the last character, what it looked at: a forward with every internal
  kept). The room's samples are written in one batch, so those asked for within seconds end
  within seconds, and their pages run this at about one time;
- the Train page once the "Room (everyone at once)" recipe has trained (the loss curve, the
  heads' snapshots and their lines over training): every participant's page when the room ends.
Each page is run 9 times (3 with --quick) after a warm-up: a sample of another seed each time; a
new training each time (the recipe's one seed makes them alike, so the figures the sessions share
are dropped first).

    python -m benchmarks.page_runs [--quick] [--profile]
"""

import functools
import os
import tempfile
import threading
import time

import numpy as np
import plotly.io as pio
import torch
from streamlit.testing.v1 import AppTest

from benchmarks import common
from benchmarks.app_speed import APP
from explorer.glue import widgets
from explorer.glue.sidebar import PRETRAINED_ENV
from explorer.offpage import figures
from explorer.offpage.classroom import ROOM_DIR_ENV
from explorer.offpage.recipes import ROOM_RECIPE
from explorer.offpage.sample_job import SAMPLE_THREAD
from explorer.offpage.training_run import TRAINING_THREAD

SAMPLE_CHARS = 200
WAIT_S = 120.0


def _figure_inputs() -> dict[str, tuple[tuple, dict]]:
    """Each builder with inputs of the sizes the views give it (random values: only sizes count)."""
    rng = np.random.default_rng(0)
    L, H, T = 6, 6, 128
    chars = [chr(97 + i % 26) for i in range(T)]
    scores = rng.normal(size=(T, T)).astype(np.float32)
    scores[np.triu_indices(T, 1)] = -np.inf
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    grid = np.broadcast_to(weights, (L, H, T, T))
    steps = [dict(iter=i, loss=3 - i / 200) for i in range(400)]
    evals = [dict(iter=i, train_loss=3 - i / 180, val_loss=3.1 - i / 180) for i in (0, 200, 399)]
    board = [(f"participant {i}", np.arange(0, 401, 200), rng.random(3)) for i in range(30)]
    snapshots = np.arange(0, 401, 50)
    return {
        "attention_heatmap": ((scores, chars, "masked", "Layer 0, head 0"), {}),
        "head_grid": ((grid,), {}),
        "weighted_sum": ((weights[-1], rng.normal(size=(T, T // H)), rng.normal(size=T // H), chars), {}),
        "bipartite": ((weights[:32, :32], chars[:32]), {}),
        "by_position": ((weights[: L * H], [f"layer {i // H} head {i % H}" for i in range(L * H)], chars,
                         "What the last character looked at"), dict(row_title="head", colorscale=figures.WEIGHTS,
                                                                     zmin=0, zmax=1, height=1168)),
        "clickable_text": ((chars + chars[:72], 199), {}),
        "bar_chart": ((rng.random(15), chars[:15], "Character 199 was drawn from these odds"),
                      dict(x_title="next character", y_title="probability", highlight=0)),
        "loss_curve": ((steps, evals, {"induction head": 250}), {}),
        "head_lines": ((snapshots, rng.random((len(snapshots), L, H)), "Entropy of each head", "nats"), {}),
        "step_line": ((snapshots, rng.normal(size=len(snapshots)), "In-context learning", "gap", "gap"), {}),
        "board_curves": ((board,), dict(own={3})),
        "ablation_grid": ((rng.normal(size=(L, H)), rng.normal(size=L), "Knock out one at a time"), {}),
    }


def _send(fig) -> str:
    """What st.plotly_chart does with a figure: a dict of it (a deep copy), then its JSON."""
    return pio.to_json(fig.to_dict(), validate=False)


def figure_builds(rounds: int, settle: float) -> dict:
    """ms to build each figure, and to serialise it as st.plotly_chart does."""
    build = {name: functools.partial(getattr(figures, name), *args, **kwargs)
             for name, (args, kwargs) in _figure_inputs().items()}
    send = {f"{name}, sent": functools.partial(_send, fig()) for name, fig in build.items()}
    timings = common.interleave({**build, **send}, rounds, settle)
    return {name: 1000 * timings.median(name) for name in timings.times}


def _server_script_cache() -> None:
    """AppTest compiles the app's scripts again at every run (a new ScriptCache each time); a
    server compiles them once. One cache for every run here, as a server keeps it."""
    from streamlit.runtime.scriptrunner.script_cache import ScriptCache
    from streamlit.testing.v1 import app_test, local_script_runner

    cache = ScriptCache()
    app_test.ScriptCache = local_script_runner.ScriptCache = lambda: cache


def _app(page: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    at.switch_page(f"views/{page}.py").run()
    return at


def _keys(elements) -> set[str]:
    return {e.key for e in elements}


def _wait(done) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError("the page never got there")
        time.sleep(0.2)


def _timed(at: AppTest) -> float:
    began = time.perf_counter()
    at.run()
    if at.exception:
        raise RuntimeError([e.value for e in at.exception])
    return time.perf_counter() - began


def sample_finish(runs: int, profile: bool) -> dict:
    """The run that shows a finished sample: the first after the engine wrote its last character."""
    at = _app("sampling")
    at.slider(key="sample_length").set_value(SAMPLE_CHARS).run()
    times, hot_spots = [], None
    for seed in range(runs + 1):
        at.number_input(key="sample_seed").set_value(seed).run()
        at.button(key="sample_generate").click().run()
        _wait(lambda: not any(t.name == SAMPLE_THREAD for t in threading.enumerate()))  # the page does not run meanwhile
        if seed == runs and profile:
            hot_spots = common.profile_script_run(at)
        else:
            seconds = _timed(at)
            if seed:
                times.append(seconds)  # the first is the warm-up
        if "sample_stop" in _keys(at.button) or len(at.get("plotly_chart")) != 3:
            raise RuntimeError("the finished sample was not shown")
    return dict(model="cpu-best", chars=SAMPLE_CHARS, runs_s=times, median_s=common.median(times), hot_spots=hot_spots)


def train_finish(runs: int, profile: bool) -> dict:
    """The Train page of a finished room-recipe training. Every training of the recipe is the same
    (one seed), so the figures every session shares are dropped before each timed run, as for a
    training of its own."""
    at = _app("training")
    at.selectbox(key="train_recipe").set_value(ROOM_RECIPE).run()
    times, hot_spots = [], None
    for i in range(runs + 1):
        at.button(key="train_start").click().run()
        _wait(lambda: not any(t.name == TRAINING_THREAD for t in threading.enumerate()))
        widgets._figure.clear()
        if i == runs and profile:
            hot_spots = common.profile_script_run(at)
        else:
            seconds = _timed(at)
            if i:
                times.append(seconds)
        if not at.button(key="train_stop").disabled:
            raise RuntimeError("the training was not finished when timed")
        at.button(key="train_reset").click().run()
    return dict(recipe=ROOM_RECIPE, runs_s=times, median_s=common.median(times), hot_spots=hot_spots)


def main() -> None:
    args = common.parse_args(__doc__, profile=True)
    runs = 3 if args.quick else 9
    torch.set_num_threads(1)  # as the app runs
    _server_script_cache()
    os.environ[PRETRAINED_ENV] = str(common.ROOT / "pretrained")
    os.environ.setdefault(ROOM_DIR_ENV, tempfile.mkdtemp(prefix="gpt-explorer-room-"))
    common.shakespeare()  # fetched before anything is timed
    builds = figure_builds(5 if args.quick else 25, args.settle)
    sample = sample_finish(runs, args.profile)
    common.progress(f"the Sample page's finishing run: {sample['median_s']:.3f} s")
    train = train_finish(runs, args.profile)
    common.progress(f"the Train page of a finished training: {train['median_s']:.3f} s")
    for result in (sample, train):
        if result["hot_spots"]:
            print(result["hot_spots"])
        result.pop("hot_spots")
    rows = [(f"figure {name}", f"{ms:.1f}", "ms to build" if not name.endswith(", sent") else "ms to serialise as "
             "st.plotly_chart does") for name, ms in builds.items()]
    rows += [(f"Sample page, a finished sample of {SAMPLE_CHARS} characters ({sample['model']})",
             f"{sample['median_s']:.3f}", f"s (median of {runs}: {', '.join(f'{s:.3f}' for s in sample['runs_s'])})"),
            (f"Train page, a finished '{ROOM_RECIPE}' training", f"{train['median_s']:.3f}",
             f"s (median of {runs}: {', '.join(f'{s:.3f}' for s in train['runs_s'])})")]
    common.report("What the server's script runs cost: figures and whole pages", rows, dict(
        benchmark="page_runs", quick=args.quick, machine=common.machine(), figures_ms=builds, sample=sample, train=train))


if __name__ == "__main__":
    main()
