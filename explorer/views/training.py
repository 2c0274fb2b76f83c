"""Train: a small GPT learns in front of you. Loss, samples and attention heads, live.

The training runs on a background thread owned by this browser session
(explorer/offpage/training_run.py), or on a Ray worker that thread follows
(explorer/offpage/ray_training.py); this page only reads its progress, polling once a second
while it runs.
"""

import numpy as np
import streamlit as st
import torch

from core import PRESETS
from core.budget import param_count
from core.data import DataError, check_length, text_from_bytes
from core.lens import head_stats
from core.trainer import OPTIMIZERS
from explorer.glue import room_glue, widgets
from explorer.glue.session import SessionThreads, session_threads
from explorer.glue.train_setup import costs, new_runner, shakespeare_twice, training_slots
from explorer.offpage import figures
from explorer.offpage.classroom import RoomError
from explorer.offpage.recipes import RECIPE_SECONDS, RECIPE_TEXTS, RECIPES, TWICE, Settings
from explorer.offpage.step_times import fit_steps, run_seconds
from explorer.offpage.training_run import INDUCTION_AT, Progress, Runner, TrainingSlots

SOURCES = ("Tiny Shakespeare", "Upload a .txt file", "Paste text", TWICE)
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 2e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0, 10.0)  # the last ones diverge, on purpose
K = "train_"  # widget keys of this view
ERROR = K + "error"
HELD = K + "snapshot_held"  # the user picked an older snapshot: stop following the newest
SIZED = K + "sized_steps"  # the steps a timed recipe last set: the user's own once they differ
# Progress and the loss curve redraw every second while a model trains; the heads' charts, which
# change only at a snapshot, less often: in a room every participant's page polls the one server.
SNAPSHOT_POLL_S = 4.0
SHAKESPEARE_VOCAB = 65


def train_view() -> None:
    st.title("Train")
    limits, problems = room_glue.room().limits()  # the teacher's caps where set, else the environment's
    for problem in problems:
        st.warning(f"Server setting ignored: {problem}")
    threads = session_threads()
    slots = training_slots(limits.workers, limits.max_trainings)
    if threads.runner is None:
        setup(limits, slots)
    else:
        progress(threads.runner, slots)
        results(threads)


# Before a run: the form ---------------------------------------------------------------------


def apply_recipe() -> None:
    recipe = st.session_state[K + "recipe"]
    for name, value in vars(RECIPES[recipe][1]).items():
        st.session_state[K + name] = value
    st.session_state[SIZED] = st.session_state[K + "max_iters"]
    if recipe in RECIPE_TEXTS:
        st.session_state[K + "source"] = RECIPE_TEXTS[recipe]
    elif st.session_state.get(K + "source") in RECIPE_TEXTS.values():  # another recipe's text, not the user's
        st.session_state[K + "source"] = SOURCES[0]


def setup(limits, slots: TrainingSlots) -> None:
    if K + "preset" not in st.session_state:
        st.session_state[K + "recipe"] = next(iter(RECIPES))
        apply_recipe()
    st.markdown("Pick a recipe, or set every knob yourself, then **Start**. The model trains on this server "
                "while you watch; when it stops, every other view can look inside it.")
    recipe = st.selectbox("Recipe", list(RECIPES), key=K + "recipe", on_change=apply_recipe)
    st.caption(RECIPES[recipe][0])
    data_box(limits)
    sizing = size_recipe(limits)
    left, right = st.columns(2)
    with left:
        st.subheader("Model")
        st.selectbox("Lecture stage", list(PRESETS), key=K + "preset")
        a, b = st.columns(2)
        a.number_input("Blocks (n_layer)", 1, 12, key=K + "n_layer")
        b.number_input("Heads (n_head)", 1, 16, key=K + "n_head")
        a.number_input("Embedding size (n_embd)", 4, 512, step=4, key=K + "n_embd")
        b.number_input("Context (block_size)", 2, 256, key=K + "block_size")
        st.slider("Dropout", 0.0, 0.5, step=0.05, key=K + "dropout")
    with right:
        st.subheader("Training")
        a, b = st.columns(2)
        a.number_input("Steps", 10, limits.max_iters, step=100, key=K + "max_iters")
        b.number_input("Batch size", 1, 128, key=K + "batch_size")
        a.select_slider("Learning rate", LEARNING_RATES, key=K + "learning_rate")
        b.number_input("Evaluate every", 10, 5000, step=50, key=K + "eval_interval")
        a.selectbox("Optimizer", OPTIMIZERS, key=K + "optimizer",
                    help="muon: Muon for the blocks' weight matrices (the learning rate is AdamW's, for the rest): "
                         "the same loss in fewer steps")
    settings = current_settings()
    ready = estimate(settings, limits, sizing)
    room_line(slots)
    if st.session_state.get(ERROR):
        st.error(st.session_state[ERROR])
    room_glue.name_box()
    st.button("Start", type="primary", disabled=not ready, on_click=start, args=(limits,), key=K + "start")


def size_recipe(limits) -> bool:
    """A timed recipe's steps, from what a training costs on this server, for as long as the steps
    are the recipe's (not the user's own). True while they wait for the costs to be measured."""
    seconds = RECIPE_SECONDS.get(st.session_state[K + "recipe"])
    if seconds is None or st.session_state[K + "max_iters"] != st.session_state.get(SIZED):
        return False
    settings = current_settings()
    try:
        vocab, n_params = form_model(settings, limits)
    except ValueError:  # no text yet, impossible settings: estimate() says why
        return False
    if n_params > limits.max_params:
        return False  # never time a model this server refuses
    measured = costs(settings, vocab)
    if measured is None:  # being measured: the estimate reruns the page when done
        return True
    if measured.known:
        st.session_state[K + "max_iters"] = st.session_state[SIZED] = fit_steps(measured, settings, seconds,
                                                                                 limits.max_iters)
    return False


def vocab_size(text: str | None) -> int:
    return len(set(text)) if text is not None else SHAKESPEARE_VOCAB


def data_box(limits) -> None:
    source = st.radio("Text", SOURCES, horizontal=True, key=K + "source")
    if source == SOURCES[1]:
        mb = max(1, limits.max_text_bytes // 1_000_000)  # the browser refuses a bigger file before sending it
        st.file_uploader(f"A UTF-8 .txt file (at most {mb} MB)", type=["txt"], key=K + "upload", max_upload_size=mb)
    elif source == SOURCES[2]:
        st.text_area("Your text", key=K + "paste", height=150,
                     placeholder="Paste a few thousand characters: poems, code, a novel chapter…")


def current_settings() -> Settings:
    """The form's values (read from session_state, so a callback sees the latest ones)."""
    return Settings(**{name: st.session_state[K + name] for name in vars(Settings())})


def current_text(limits) -> str | None:
    """The chosen text; None means Tiny Shakespeare. Raises DataError for unusable input."""
    source = st.session_state.get(K + "source", SOURCES[0])
    if source == SOURCES[1]:
        upload = st.session_state.get(K + "upload")
        if upload is None:
            raise DataError("choose a .txt file to upload first")
        return text_from_bytes(upload.getvalue(), limits.max_text_bytes)
    if source == SOURCES[2]:
        text = st.session_state.get(K + "paste", "")
        if len(text.encode("utf-8")) > limits.max_text_bytes:
            raise DataError(f"the text is over the server's limit of {limits.max_text_bytes:,} bytes")
        if not text:
            raise DataError("paste some text first")
        return text
    if source == TWICE:
        return shakespeare_twice()
    return None


def form_model(settings: Settings, limits) -> tuple[int, int]:
    """The vocabulary size and the parameter count of the form's model; ValueError (DataError,
    impossible settings) says why there is none."""
    text = current_text(limits)
    if text is not None:
        check_length(text, settings.block_size)
    vocab = vocab_size(text)
    settings.train_config()
    return vocab, param_count(settings.model_config(vocab))


def estimate(settings: Settings, limits, sizing: bool) -> bool:
    """Show parameters and time before the start; False (with the reason shown) if it cannot start.
    sizing: the recipe's steps wait for this shape's costs (size_recipe)."""
    try:
        vocab, n = form_model(settings, limits)
    except ValueError as e:  # DataError and impossible settings alike
        st.warning(str(e))
        return False
    if n > limits.max_params:
        st.error(f"This model has {n:,} parameters; this server allows at most {limits.max_params:,}. "
                 "Make it smaller (fewer blocks, a smaller embedding).")
        return False
    time_estimate(settings, vocab, n, sizing)
    return True


def time_estimate(settings: Settings, vocab: int, n_params: int, sizing: bool) -> None:
    """The parameter count at once, the time once a few real steps of this shape have been timed
    (on a background thread: a large shape's steps take seconds). sizing: the steps wait for
    those costs, so the page reruns once they are in, even if they came during this run."""
    pending = sizing or costs(settings, vocab) is None

    @st.fragment(run_every=0.5 if pending else None)
    def line() -> None:
        measured = costs(settings, vocab)
        if measured is None:
            st.info(f"{n_params:,} parameters · timing a few steps of this shape on this server…")
            return
        if pending:
            st.rerun(scope="app")  # measured: draw the page once more, which ends this poll
        if not measured.known:
            st.info(f"{n_params:,} parameters · a step of this shape could not be timed on this server.")
            return
        seconds = RECIPE_SECONDS.get(st.session_state[K + "recipe"])
        sized = f", sized to {_duration(seconds)} here" if seconds and settings.max_iters == st.session_state.get(SIZED) else ""
        st.info(f"{n_params:,} parameters · about {measured.step_ms / 10:.1f} s per 100 steps on this server when it "
                f"is not busy · about {_duration(run_seconds(measured, settings))} for {settings.max_iters:,} steps "
                f"with their evaluations and samples{sized}.")

    line()


def start(limits) -> None:
    """Start button: a new runner for the form's settings, on this server's training backend."""
    st.session_state[ERROR] = None
    threads = session_threads()
    try:
        runner = new_runner(current_settings(), current_text(limits), limits, threads.runs + 1)
    except ValueError as e:
        st.session_state[ERROR] = f"Cannot start: {e}"
        return
    threads.runs += 1
    threads.runner = runner
    try:
        room_glue.enter(runner, current_settings(), st.session_state[K + "recipe"], current_text(limits))
    except RoomError as e:
        threads.runner = None
        st.session_state[ERROR] = f"Cannot start: {e}"
        return
    threads.published = 0
    runner.start()


# During and after a run -----------------------------------------------------------------------


def progress(runner: Runner, slots: TrainingSlots) -> None:
    alive = runner.alive
    queued = runner.snapshot().status == "queued"
    poll_s = slots.poll_seconds(queued)

    @st.fragment(run_every=poll_s if alive else None)  # polls only while the thread runs
    def live() -> None:
        if (alive and not runner.alive) or (queued and runner.snapshot().status != "queued"):
            st.rerun(scope="app")  # it just ended or started: redraw the whole page once, which sets the polling
        p = runner.snapshot()
        controls(runner, p.status)
        status_line(runner, p, slots)
        room_line(slots)
        if p.steps or p.evals:
            found = p.induction_step()
            marks = {f"induction head (score ≥ {INDUCTION_AT})": found} if found is not None else None
            widgets.chart(figures.loss_curve(p.steps, p.evals, marks), "loss")
        if p.samples:
            it, text = p.samples[-1]
            st.markdown(f"**A sample at step {it}** (200 characters after a newline, seed 0)")
            st.code(text, language=None, wrap_lines=True)

    @st.fragment(run_every=max(SNAPSHOT_POLL_S, poll_s) if alive and not queued else None)
    def formed() -> None:
        p = runner.snapshot()
        if p.snapshots and p.snapshots[-1][1].size:
            heads(runner, p.snapshots)
        if p.head_scores:
            induction(p)

    live()
    formed()


def controls(runner: Runner, status: str) -> None:
    """Stop, Resume, Reset. They sit in the polling fragment, where a click reruns only the
    fragment: each one ends with a run of the whole page, which starts or ends the polling."""
    row = st.container(horizontal=True)  # buttons as wide as their labels, wrapping on a phone
    running = status in ("queued", "running")
    can_resume = status == "stopped" and runner.record.iters < runner.train_config.max_iters
    if row.button("Stop", disabled=not running, key=K + "stop"):
        runner.stop()
        runner.join(timeout=5)  # it stops between two steps
        st.rerun(scope="app")
    if row.button("Resume", disabled=not can_resume, key=K + "resume"):
        runner.start()
        st.rerun(scope="app")
    if row.button("Reset", disabled=running, key=K + "reset",
                help="Forget this run and set up a new one (a model already offered to the other views stays there)."):
        reset()
        st.rerun(scope="app")


def reset() -> None:
    threads = session_threads()
    if threads.runner is not None:
        threads.runner.stop()
    threads.runner = None


def status_line(runner: Runner, p, slots: TrainingSlots) -> None:
    if p.status == "queued":
        forecast = slots.forecast(Runner.seconds_left)
        when = ""
        if forecast is not None and runner in forecast[0]:
            when = f" You should start in about {_duration(forecast[0][runner])}."
        st.info(f"Waiting for a free training slot: you are number {runner.queue_position()} in the queue. "
                f"This server trains {slots.capacity} model(s) at a time.{when}")
        return
    done = p.iters / max(1, p.max_iters)
    left = runner.seconds_left() if p.status == "running" else None  # the median of recent steps: steady
    eta = f" · about {_duration(left)} left" if left is not None else ""
    st.progress(min(1.0, done), text=f"step {p.iters:,} of {p.max_iters:,} · {p.tokens_per_s:,.0f} tokens/s{eta}")
    if p.status == "failed":
        st.error(p.message)
    elif p.status == "finished":
        st.success(f"Finished: all {p.max_iters:,} steps.")
    elif p.status == "stopped":
        st.success(f"Stopped at step {p.iters:,}: Resume carries on from there.")


def room_line(slots: TrainingSlots) -> None:
    """How long the whole room's trainings will take at the current load, once there is one."""
    running, waiting = slots.running, slots.waiting
    if running + waiting < 2:
        return
    forecast = slots.forecast(Runner.seconds_left)
    done = f": all done in about {_duration(forecast[1])}" if forecast is not None else ""
    st.caption(f"The room: {running} training(s) running and {waiting} waiting, {slots.capacity} at a time{done}.")


def heads(runner: Runner, snapshots: list[tuple[int, np.ndarray]]) -> None:
    """The probe prompt's attention at each snapshot, and each head's statistics over training.
    Their figures change only with a new snapshot, so each is built once (shared_chart), not at
    every poll of every participant's page (a room's server spent most of its time building them)."""
    st.subheader("How the heads form")
    iters = [it for it, _ in snapshots]
    chosen = iters[0]
    if len(iters) > 1:
        if not st.session_state.get(HELD) or st.session_state.get(K + "snapshot") not in iters:
            st.session_state[K + "snapshot"] = iters[-1]  # follow the newest snapshot as it arrives
        chosen = st.select_slider("Snapshot at step", iters, key=K + "snapshot", on_change=hold_snapshot,
                                  args=(iters[-1],), help="Move it back to the right end to follow the newest.")
    pattern = dict(snapshots)[chosen].astype(np.float32)
    st.caption("Softmax weights of every head (rows: layers) for a fixed prompt. A head that lights up the "
               "diagonal just below the main one looks at the previous character.")
    widgets.shared_chart(figures.head_grid, pattern, name=f"heads_step{chosen}")
    stats = head_stats(torch.from_numpy(np.stack([s for _, s in snapshots]).astype(np.float32)))  # (S, L, H)
    left, right = st.columns(2)
    with left:
        widgets.shared_chart(figures.head_lines, np.array(iters), stats["entropy"].numpy(), "Entropy of each head",
                             "nats (lower: more focused)", name="head_entropy")
    with right:
        widgets.shared_chart(figures.head_lines, np.array(iters), stats["prev_char"].numpy(),
                             "Weight on the previous character", "weight", name="head_prev_char")


def induction(p: Progress) -> None:
    """Each head's induction and previous-token scores and the in-context gap, at every snapshot."""
    st.subheader("Induction heads")
    iters = np.array([row["iter"] for row in p.head_scores])
    left, right = st.columns(2)
    with left:
        widgets.shared_chart(figures.head_lines, iters, np.stack([row["induction"] for row in p.head_scores]),
                             "Induction score of each head", "score (1: a perfect induction head)", name="head_induction")
    with right:
        widgets.shared_chart(figures.head_lines, iters, np.stack([row["previous_token"] for row in p.head_scores]),
                             "Previous-token score of each head", "weight (validation text)", name="head_previous_token")
    widgets.shared_chart(figures.step_line, iters, np.array([row["icl_gap"] for row in p.head_scores]), "In-context learning",
                         "first − second copy (nats)", "gap", name="icl_gap")
    found = p.induction_step()
    when = (f"At step {found:,} a head first scored {INDUCTION_AT} or more (the dashed line on the loss curve)."
            if found is not None else f"No head has scored {INDUCTION_AT} yet.")
    st.caption("On random characters repeated once, an induction head looks at what followed the same character "
               "the first time, and so copies it: it needs a previous-token head in an earlier layer. The gap "
               f"is how much easier the second copy is than the first: above 0, the model copies. {when}")


def hold_snapshot(newest: int) -> None:
    """An older snapshot picked stays on screen; the right end follows the training again."""
    st.session_state[HELD] = st.session_state[K + "snapshot"] != newest


def results(threads: SessionThreads) -> None:
    """Once stopped or finished: offer the model to the other views and as a download."""
    runner = threads.runner
    p = runner.snapshot()
    if runner.alive or p.iters == 0 or runner.weights_lost:
        return
    name = runner.name
    st.subheader("Your model")
    st.markdown(f"**{name}** is now in the sidebar's model list: open Attention, Activations or Sample to look "
                "inside it.")
    weights, meta = runner.checkpoint_files()
    row = st.container(horizontal=True)  # a column a fifth of the page truncated these labels
    stem = name.replace(" ", "-")
    row.download_button("Download weights (.safetensors)", weights, f"{stem}.safetensors", key=K + "dl_weights",
                      on_click="ignore")
    row.download_button("Download description (.json)", meta, f"{stem}.json", key=K + "dl_json", on_click="ignore")
    st.caption("Keep both files together: upload them in the sidebar later to look at this model again.")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


train_view()
