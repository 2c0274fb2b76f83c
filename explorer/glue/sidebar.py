"""What the views share: session keys, the model picker and model card, cached read-only loads.

Where models come from, in the order the picker lists them:
- pretrained: NAME.json + NAME.safetensors in $GPT_EXPLORER_PRETRAINED (default: pretrained/),
  loaded once per file version and shared by every session, so never changed in place;
- uploaded: a .safetensors + .json pair uploaded in this browser session, or nanoGPT's
  ckpt.pt (with its meta.pkl or training text), converted in memory (core.convert);
- trained here: `trained_models()`, one entry a training run of this session, published
  by `publish_training` as soon as it stops or finishes, whatever view the user is on;
- room: another participant's training (or one's own from before a restart), opened from the
  Board (explorer/glue/room_glue.py), read from the room's checkpoint files.
"""

import io
import os
from collections.abc import Callable
from pathlib import Path, PureWindowsPath

import streamlit as st

from core.budget import env_int
from core.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_checkpoint_bytes
from core.convert import load_nanogpt, vocab_from_meta, vocab_from_text
from core.data import DataError, text_from_bytes
from core.stages import describe, stage_of
from explorer.glue import room_glue
from explorer.glue.session import session_threads
from explorer.glue.widgets import escape_markdown

ROOT = Path(__file__).resolve().parents[2]
PRETRAINED_ENV = "GPT_EXPLORER_PRETRAINED"

# Session keys.
MODEL = "model"  # the picker's choice: a label such as "tiny (pretrained)"
CHECKPOINT = "checkpoint"  # the Checkpoint that label resolved to in this run, or None
UPLOADER = "upload"
UPLOADED = "uploaded_models"  # name -> Checkpoint, from this session's uploads
LAST_UPLOAD = "last_upload"  # file ids of the pair already loaded, so a rerun does not reload it
REFUSED = "refused_uploads"  # file ids -> why they were refused, so a rerun does not parse them again
TRAINED = "trained_models"  # name -> Checkpoint, trained in this browser session
WATCH_S = 2.0  # how often another view looks whether this session's running training has ended
UPLOADS_ENV = "GPT_EXPLORER_MAX_UPLOADS_MB"  # the weights one session's uploads may hold in the server's memory
UPLOADS_MB = 200


def pretrained_dir() -> Path:
    return Path(os.environ.get(PRETRAINED_ENV) or ROOT / "pretrained")


def pretrained_paths() -> list[Path]:
    return sorted(pretrained_dir().glob("*.json"))


@st.cache_resource(max_entries=16, show_spinner="Loading the checkpoint…")
def load_pretrained(path: str, mtime: float) -> Checkpoint:
    """One copy per file version (mtime is in the key) for every session: read it, never train it."""
    return load_checkpoint(path)


@st.cache_resource
def _broken() -> dict[tuple[str, float], str]:
    """(path, mtime) -> why that pretrained file does not load: found once, for every session."""
    return {}


def pretrained_checkpoints() -> tuple[dict[Path, Checkpoint], dict[str, str]]:
    """Every pretrained checkpoint that loads, by path, and the others by name with the reason.
    A broken file (a half-finished copy, weights in an unknown format) is listed, never fatal."""
    good, bad = {}, {}
    for path in pretrained_paths():
        try:
            good[path] = load_pretrained(str(path), path.stat().st_mtime)
        except (CheckpointError, OSError) as e:
            bad[path.stem] = str(e)
    return good, bad


def broken_note(bad: dict[str, str]) -> None:
    if bad:
        st.warning("Not loaded from the pretrained folder: " + "; ".join(
            f"**{escape_markdown(name)}** ({escape_markdown(why)})" for name, why in bad.items()))


def trained_models() -> dict[str, Checkpoint]:
    """Models trained in this browser session, by name: the picker lists them.
    The Train view adds its result with `add_trained_model`."""
    return st.session_state.setdefault(TRAINED, {})


def add_trained_model(name: str, ckpt: Checkpoint) -> None:
    trained_models()[name] = ckpt


def uploaded_models() -> dict[str, Checkpoint]:
    return st.session_state.setdefault(UPLOADED, {})


def load_upload(files: list) -> Checkpoint:
    """A checkpoint from uploaded files: exactly one .safetensors and one .json, or nanoGPT's
    files (see load_nanogpt_upload)."""
    if any(f.name.endswith(".pt") for f in files):
        return load_nanogpt_upload(files)
    weights = [f for f in files if f.name.endswith(".safetensors")]
    metas = [f for f in files if f.name.endswith(".json")]
    if len(weights) != 1 or len(metas) != 1:
        raise CheckpointError("upload one .safetensors file and one .json file together "
                              f"(got: {', '.join(f.name for f in files)})")
    return load_checkpoint_bytes(weights[0].getvalue(), metas[0].getvalue(), name=upload_name(metas[0].name))


def upload_name(file_name: str) -> str:
    """A model's name from an uploaded file's: a browser sends a bare name, a hand-made request
    may send a path ("../../x.json", "..\\x.json") or control characters. Only the stem of the
    last part is kept, printable, at most 60 characters (uploads are never written to disk)."""
    stem = PureWindowsPath(file_name).stem  # a Windows path splits on both separators
    return "".join(ch for ch in stem if ch.isprintable())[:60] or "uploaded"


def load_nanogpt_upload(files: list) -> Checkpoint:
    """nanoGPT's ckpt.pt, with its dataset's meta.pkl or its training text (.txt) for the
    vocabulary (neither is needed for nanoGPT's shakespeare_char), converted in memory."""
    ckpts, metas, texts = ([f for f in files if f.name.endswith(ext)] for ext in (".pt", ".pkl", ".txt"))
    if len(ckpts) != 1 or len(metas) + len(texts) > 1 or len(ckpts) + len(metas) + len(texts) != len(files):
        raise CheckpointError("upload nanoGPT's ckpt.pt alone, or with its meta.pkl or its training text (.txt) "
                              f"(got: {', '.join(f.name for f in files)})")
    vocab = None
    if metas:
        vocab = vocab_from_meta(metas[0].getvalue())
    elif texts:
        try:
            vocab = vocab_from_text(text_from_bytes(texts[0].getvalue()))
        except DataError as e:
            raise CheckpointError(f"{texts[0].name}: {e}") from e
    return load_nanogpt(io.BytesIO(ckpts[0].getvalue()), vocab, name=f"nanogpt-{upload_name(ckpts[0].name)}")


def model_choices() -> dict[str, Callable[[], Checkpoint]]:
    """Picker label -> how to get that checkpoint. The session's own models come first."""
    choices = {f"{name} (trained here)": (lambda c=ckpt: c) for name, ckpt in trained_models().items()}
    choices.update(room_glue.room_choices())  # the room's models this session opened from the Board
    broken = _broken()
    for path in pretrained_paths():
        if (str(path), path.stat().st_mtime) not in broken:
            choices[f"{path.stem} (pretrained)"] = lambda p=path: load_pretrained(str(p), p.stat().st_mtime)
    for name, ckpt in uploaded_models().items():
        choices[f"{name} (uploaded)"] = lambda c=ckpt: c
    return choices


def model_sidebar(train_view: bool = False) -> None:
    """The sidebar every view shares: pick a model, upload one, read its card. Stores the
    chosen Checkpoint (or None) under CHECKPOINT for the view to read. train_view: a training
    that just ended becomes the chosen model there, where its owner watches it."""
    publish_training(train_view)
    picker = st.sidebar.container()  # filled last, so a fresh upload is already in the list
    with st.sidebar.expander("Upload a checkpoint"):
        _upload_box()
    choices = model_choices()
    # A copy first: every session's runs share the dict, and one may add to it while the look at
    # each file below lets other threads run.
    broken = {Path(path).stem: why for (path, _), why in dict(_broken()).items() if Path(path).exists()}
    if broken:
        with st.sidebar:
            broken_note(broken)
    st.session_state[CHECKPOINT] = None
    if not choices:
        picker.info(f"No checkpoints in `{pretrained_dir()}`. Upload a `.safetensors` + `.json` pair below, "
                    "or train one: `python -m core.train --preset layernorm --out pretrained/NAME`.")
        return
    label = picker.selectbox("Model", list(choices), key=MODEL)
    try:
        ckpt = choices[label]()
    except (CheckpointError, OSError) as e:
        if label.endswith(" (pretrained)"):  # left out of every session's list from now on, and said so
            path = pretrained_dir() / f"{label.removesuffix(' (pretrained)')}.json"
            _broken()[(str(path), path.stat().st_mtime)] = str(e)
            st.session_state.pop(MODEL, None)
            st.rerun()
        picker.error(f"Could not load {escape_markdown(label)}: {escape_markdown(str(e))}")
        return
    st.session_state[CHECKPOINT] = ckpt
    with picker.expander("Model card", expanded=False):
        model_card(ckpt)


def _upload_box() -> None:
    files = st.file_uploader("NAME.safetensors and NAME.json, or nanoGPT's ckpt.pt (+ meta.pkl or the training .txt)",
                             type=["safetensors", "json", "pt", "pkl", "txt"],
                             accept_multiple_files=True, key=UPLOADER)
    if not files:
        return
    ids = tuple(sorted(f.file_id for f in files))
    if ids == st.session_state.get(LAST_UPLOAD):
        return
    refused = st.session_state.setdefault(REFUSED, {})
    if ids in refused:  # said once; parsing it again on every click would cost the server each time
        st.error(refused[ids])
        return
    try:
        ckpt = load_upload(files)
        _check_session_uploads(ckpt)
    except CheckpointError as e:
        refused[ids] = f"Not a valid checkpoint: {escape_markdown(str(e))}"
        st.error(refused[ids])
        return
    uploaded_models()[ckpt.name] = ckpt
    st.session_state[LAST_UPLOAD] = ids
    st.session_state[MODEL] = f"{ckpt.name} (uploaded)"  # show what was just uploaded
    st.success(f"Loaded {escape_markdown(ckpt.name)}.")


def _check_session_uploads(ckpt: Checkpoint) -> None:
    """One session's uploads share a budget of the server's memory (UPLOADS_ENV): each model is
    within the budgets of core.budget, and together they are within this one."""
    problems: list[str] = []
    limit = env_int(UPLOADS_ENV, UPLOADS_MB, problems) * 2**20
    held = sum(_weight_bytes(c) for name, c in uploaded_models().items() if name != ckpt.name)
    if held + _weight_bytes(ckpt) > limit:
        raise CheckpointError(f"this session's uploads would hold {(held + _weight_bytes(ckpt)) / 2**20:,.0f} MiB of "
                              f"weights; the server allows {limit / 2**20:,.0f} MiB a session ({UPLOADS_ENV}). "
                              "Reload the page to start afresh.")


def _weight_bytes(ckpt: Checkpoint) -> int:
    return sum(p.numel() * p.element_size() for p in ckpt.model.parameters())


def checkpoint() -> Checkpoint | None:
    return st.session_state.get(CHECKPOINT)


def require_checkpoint() -> Checkpoint:
    """The chosen model; without one, say where to get one and end this run of the view."""
    ckpt = checkpoint()
    if ckpt is None:
        st.info("Choose a model in the sidebar, upload one there, or train one first.")
        st.stop()
    return ckpt


def publish_training(train_view: bool) -> None:
    """This session's training joins the picker once it has stopped or finished (a diverged one,
    or one whose worker died, does not), under its run's name: a Resume and a second Stop
    update the same entry. While it runs, a small poll notices the end on the other views (the
    Train view's own polls do there; in a room two polls a page were most of the server's script
    runs), and the chosen model becomes it on the Train view."""
    threads = session_threads()
    runner = threads.runner
    if runner is None:
        return
    if runner.alive:
        if not train_view:
            _watch_training(runner)
        return
    p = runner.snapshot()
    if p.iters == 0 or runner.weights_lost or threads.published == p.iters:
        return
    name = runner.name
    add_trained_model(name, runner.checkpoint())
    threads.published = p.iters
    if train_view:
        st.session_state[MODEL] = f"{name} (trained here)"
    st.toast(f"{escape_markdown(name)} ({p.iters:,} steps) is in the model list.")


def _watch_training(runner) -> None:
    """A queued training's end is far off: its poll is as seldom as the Train view's queue's."""
    queued = runner.snapshot().status == "queued"

    @st.fragment(run_every=runner.slots.poll_seconds(queued=True) if queued else WATCH_S)
    def watch() -> None:
        if not runner.alive:
            st.rerun(scope="app")  # it ended: publish it in a full run, which also ends this poll

    with st.sidebar:
        watch()


def model_card(ckpt: Checkpoint) -> None:
    c, rec = ckpt.model.config, ckpt.record
    stage = stage_of(c)
    st.markdown(f"**Stage: {stage}**: {describe(stage)}.")
    st.markdown(f"{ckpt.model.num_params():,} parameters (without the position table)  \n"
                f"vocabulary {c.vocab_size}, context {c.block_size}, {c.n_layer} layer(s) × {c.n_head} head(s), "
                f"{c.n_embd} dims ({c.head_size} a head), dropout {c.dropout}, {c.activation}")
    if rec.iters:
        losses = "".join(f", {split} loss {loss:.3f}" for split, loss in (("train", rec.train_loss), ("val", rec.val_loss))
                         if loss is not None)
        took = f" in {rec.seconds:.0f} s" if rec.seconds else ""  # a converted nanoGPT model has no time
        st.markdown(f"Trained {rec.iters:,} steps on {rec.tokens:,} tokens{took}{losses}.")
    else:
        st.markdown("Untrained: its weights are still random.")
    if ckpt.extra and st.toggle("Details", key="card_details", help="How the file was made"):
        _notes(ckpt.extra)


def _notes(extra: dict) -> None:
    for key, value in extra.items():
        st.markdown(f"{escape_markdown(str(key))}: {escape_markdown(str(value))}")  # notes from the file
