"""The room in Streamlit terms: who this browser session is, a training joining the board, the
room's models in the picker, the teacher's banner, and the teacher's token.

A participant is known by a seat: a random secret made when they first give a name, kept in
the session and in the page's address (`?seat=`), so a reload, or the browser reconnecting
after a server restart, still knows them. The teacher is whoever typed the token the server was
started with; it is checked against GPT_EXPLORER_TEACHER_TOKEN at every action, never stored
as a flag a session could carry.
"""

import hmac
import json
import os
from collections.abc import Callable

import streamlit as st

from core.checkpoint import Checkpoint, CheckpointError, load_checkpoint, paths, resume_trainer
from core.data import Corpus
from core.tokenizer import CharTokenizer
from explorer.glue.session import session_threads
from explorer.glue.train_setup import shakespeare_corpus, training_slots
from explorer.glue.widgets import PROMPT, escape_markdown
from explorer.offpage.classroom import MAX_NAME, OWN_TEXT, Entry, EvalReporter, Participant, Room, RoomError, open_room, room_dir, watcher
from explorer.offpage.recipes import Settings, probe_ids, watch
from explorer.offpage.training_run import TrainingRunner

TOKEN_ENV = "GPT_EXPLORER_TEACHER_TOKEN"
SEAT_PARAM = "seat"
# Session keys.
SEAT = "room_seat"
NAME = "room_name"  # the name box
JOIN_ERROR = "room_join_error"
ROOM_MODELS = "room_models"  # picker label -> training id, the room's models this session opened
TOKEN = "teacher_token"  # what this session typed as the teacher's token
DISMISSED = "room_dismissed_push"
GO = "room_go"  # a view to switch to at the start of the next run (a callback cannot switch)
PUSH_VIEWS = {"Attention": "views/attention.py", "Activations": "views/activations.py", "Sample": "views/sampling.py"}


@st.cache_resource(show_spinner=False)
def _recovered(folder: str) -> int:
    """Once a server process: trainings the last process was running are marked interrupted."""
    room = open_room(folder)
    return room.recover(watcher(room).live())


def room() -> Room:
    r = open_room(room_dir())
    _recovered(str(r.folder))
    return r


# Participants -------------------------------------------------------------------------------------


def seat() -> str | None:
    if SEAT not in st.session_state and st.query_params.get(SEAT_PARAM):
        st.session_state[SEAT] = st.query_params[SEAT_PARAM]
    return st.session_state.get(SEAT)


def keep_seat() -> None:
    """Put the seat back in the address: switching views leaves the query string behind."""
    s = seat()
    if s and st.query_params.get(SEAT_PARAM) != s:
        st.query_params[SEAT_PARAM] = s


def participant() -> Participant | None:
    me = room().participant(seat())
    if me is None:
        st.session_state.pop(SEAT, None)  # the room was cleared, or the address held a stale seat
    return me


def _join() -> None:
    try:
        _take_seat(*room().join(st.session_state.get(NAME, "")))
    except RoomError as e:
        st.session_state[JOIN_ERROR] = str(e)
        return
    st.session_state[JOIN_ERROR] = None


def _take_seat(me: Participant, new_seat: str) -> Participant:
    st.session_state[SEAT] = new_seat
    st.query_params[SEAT_PARAM] = new_seat
    return me


def _join_on_start() -> Participant:
    """Start without joining first: the name typed in the box, or the first free "Participant N"
    (a laptop alone never has to name itself). A taken typed name is an error, said on Start."""
    typed = st.session_state.get(NAME, "").strip()
    if typed:
        return _take_seat(*room().join(typed))
    n = len(room().participants()) + 1
    while True:
        try:
            return _take_seat(*room().join(f"Participant {n}"))
        except RoomError:
            n += 1


def name_box() -> Participant | None:
    """This session's participant, or a box for the name their trainings will carry on the board
    (Start joins with it, or with a name of its own if the box is empty)."""
    me = participant()
    if me is not None:
        st.caption(f"On the room's board as **{escape_markdown(me.name)}**. The address of this page holds your seat: "
                   "keep the tab, or come back with the same address.")
        return me
    with st.form("room_join", border=False):
        st.text_input("Your name on the room's board", key=NAME, max_chars=MAX_NAME,
                      help="No account: any name not taken in this room. Everyone sees it on the Board.")
        st.form_submit_button("Join the board", on_click=_join)
    if st.session_state.get(JOIN_ERROR):
        st.error(f"Cannot join: {escape_markdown(st.session_state[JOIN_ERROR])}")
    return None


def shape(settings: Settings) -> str:
    return f"{settings.preset} {settings.n_layer}×{settings.n_head}×{settings.n_embd}, context {settings.block_size}"


def enter(runner, settings: Settings, recipe: str, text: str | None) -> int:
    """Put a new training on the board before its runner starts. text: the participant's own
    (None: Tiny Shakespeare). Raises RoomError (no name yet, the room's disk is full)."""
    me = participant() or _join_on_start()
    r = room()
    training = r.add_training(me.id, runner.name, recipe, shape(settings), settings.max_iters, text)
    follow(training, runner)
    return training


def follow(training: int, runner) -> None:
    """The room saves the runner's checkpoints (a picklable reporter, for a worker too) and
    copies its progress onto the board."""
    r = room()
    runner.room_reporter = EvalReporter(r.folder, training)
    watcher(r).follow(training, runner)


def resumable(entry: Entry, me: Participant | None) -> bool:
    return (me is not None and entry.participant == me.id and entry.status in ("interrupted", "stopped")
            and entry.saved_step is not None and entry.saved_step < entry.max_iters)


def resume(training: int) -> None:
    """Its owner carries a training on from its last checkpoint (after a restart, say) in this
    session's Train view. Raises RoomError or CheckpointError with the reason."""
    r, me = room(), participant()
    entry = r.training(training)
    if entry is None or not resumable(entry, me):
        raise RoomError("only its owner can resume a stopped or interrupted training with a checkpoint")
    threads = session_threads()
    if threads.runner is not None and threads.runner.alive:
        raise RoomError("your current training is still running: stop it first")
    stem = r.checkpoint_stem(training)
    meta = json.loads(paths(stem)[1].read_text(encoding="utf-8"))
    block_size = meta["model_config"]["block_size"]
    if entry.source == OWN_TEXT:
        text = r.own_text(training)
        if text is None:
            raise RoomError("the text it was trained on is no longer in the room")
        corpus = Corpus(text, block_size, CharTokenizer.from_text(text))
    else:
        corpus = shakespeare_corpus(block_size)
    trainer = resume_trainer(stem, corpus)
    limits, _ = r.limits()
    # A resumed training runs in the server's process (its optimizer state is on this machine's disk).
    runner = TrainingRunner(trainer, training_slots(limits.workers, limits.max_trainings), probe_ids=probe_ids(corpus, block_size),
                            **watch(trainer.train_config.eval_interval), name=entry.run)
    r.set_status(training, "queued", note=f"resumed at step {trainer.record.iters:,}")
    follow(training, runner)
    threads.runner, threads.published = runner, 0
    runner.start()


# The room's models in the picker -------------------------------------------------------------------


@st.cache_resource(max_entries=16, show_spinner="Loading the checkpoint…")
def _load(path: str, mtime: float) -> Checkpoint:
    """Shared read-only by every session that opens it; a new save (new mtime) is a new entry."""
    return load_checkpoint(path)


def room_choices() -> dict[str, Callable[[], Checkpoint]]:
    """Picker label -> loader, for the room's models this session opened from the Board."""
    def loader(training: int) -> Checkpoint:
        json_path = paths(room().checkpoint_stem(training))[1]
        if not json_path.is_file():
            raise CheckpointError("no checkpoint saved yet (the first comes at its first evaluation), or it was removed")
        return _load(str(json_path), json_path.stat().st_mtime)

    return {f"{label} (room)": (lambda t=training: loader(t)) for label, training in st.session_state.get(ROOM_MODELS, {}).items()}


def open_model(entry: Entry) -> None:
    """A button callback: the training's model joins this session's picker, chosen."""
    from explorer.glue.sidebar import MODEL  # the sidebar imports this module

    st.session_state.setdefault(ROOM_MODELS, {})[entry.label] = entry.id
    st.session_state[MODEL] = f"{entry.label} (room)"


# The teacher ------------------------------------------------------------------------------------------


def teacher_token() -> str:
    return os.environ.get(TOKEN_ENV, "")


def is_teacher() -> bool:
    """This session typed the server's token. Checked at each action: no flag to forge."""
    token, typed = teacher_token(), st.session_state.get(TOKEN)
    return bool(token) and isinstance(typed, str) and hmac.compare_digest(typed.encode(), token.encode())


def banner() -> None:
    """The teacher's latest push, at the top of every view until this session dismisses it.
    Sessions look for a new one every few seconds, only when a teacher can push at all."""
    if GO in st.session_state:
        st.switch_page(st.session_state.pop(GO))
    if not teacher_token():
        return
    push = room().latest_push()
    shown = push["id"] if push else 0

    @st.fragment(run_every=5.0)
    def look() -> None:
        latest = room().latest_push()
        if (latest["id"] if latest else 0) != shown:
            st.rerun(scope="app")

    with st.sidebar:
        look()
    if push is None or st.session_state.get(DISMISSED) == push["id"]:
        return
    where = f"layer {push['layer']}, head {push['head']} of " if push["view"] == "Attention" else ""
    prompt = f" with the prompt “{escape_markdown(push['prompt'][:60])}”" if push["prompt"] else ""
    with st.container(border=True):
        st.markdown(f":material/campaign: **The teacher asks everyone to look at** {escape_markdown(push['view'])}: "
                    f"{where}{escape_markdown(push['model'])}{prompt}.")
        row = st.container(horizontal=True)
        row.button("Open it", key="room_open_push", type="primary", on_click=_apply_push, args=(push,))
        row.button("Dismiss", key="room_dismiss_push", on_click=_dismiss, args=(push["id"],))


def _dismiss(number: int) -> None:
    st.session_state[DISMISSED] = number


def _apply_push(push: dict) -> None:
    from explorer.glue.sidebar import MODEL

    label = push["model"]
    if push.get("training"):
        st.session_state.setdefault(ROOM_MODELS, {})[label.removesuffix(" (room)")] = push["training"]
    st.session_state[MODEL] = label
    if push["prompt"]:
        st.session_state["sample_prompt" if push["view"] == "Sample" else PROMPT] = push["prompt"]
    if push["view"] == "Attention":
        st.session_state["attn_layer"], st.session_state["attn_head"] = push["layer"], push["head"]
    st.session_state[DISMISSED] = push["id"]
    st.session_state[GO] = PUSH_VIEWS[push["view"]]
