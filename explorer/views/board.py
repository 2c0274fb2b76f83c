"""Board: every training in the room, live, as a leaderboard. The val loss is the server's own,
measured on the same windows for every model of a text (explorer/offpage/classroom.py); a row opens
that model in every other view."""

import pandas as pd
import streamlit as st

from core.checkpoint import CheckpointError
from explorer.glue import room_glue, widgets
from explorer.glue.widgets import escape_markdown
from explorer.offpage import figures
from explorer.offpage.classroom import SHAKESPEARE, Entry, RoomError

K = "board_"
OWN = "background-color: #fff3b0"  # the viewer's own rows
LIVE_POLL_S = 3.0
IDLE_POLL_S = 5.0  # a board with nothing training looks this often for a training that starts
RESUME_ERROR = K + "resume_error"


def board_view() -> None:
    st.title("Board")
    room = room_glue.room()
    me = room_glue.participant()
    shown = room.board()
    live = any(e.live for e in shown)

    @st.fragment(run_every=LIVE_POLL_S if live else None)  # draws the board again only while something trains
    def board() -> None:
        entries = room.board()
        if live and not any(e.live for e in entries):
            st.rerun(scope="app")  # the last one ended: one full run, which ends the polling
        if not entries:
            st.info("No training in the room yet. Give your name in the Train view, start one, and it appears here.")
            return
        st.caption(f"{len(entries)} training(s). Val loss: the server's own measure on the same {SHAKESPEARE} "
                   "validation windows for every model (“own text”: on that text's own validation split, so not "
                   "comparable). Click a row to look inside that model.")
        cut = sum(e.status == "interrupted" for e in entries)
        if cut:
            st.info(f"{cut} training(s) interrupted by a server restart: each keeps its last checkpoint, and its owner "
                    "can resume it here (click the row).")
        mine = {i for i, e in enumerate(entries) if me is not None and e.participant == me.id}
        event = st.dataframe(table(entries, mine).style.apply(lambda row: [OWN if row.name in mine else ""] * len(row), axis=1),
                             hide_index=True, on_select="rerun", selection_mode="single-row", key=K + "table",
                             column_config={"sample": st.column_config.TextColumn("latest sample", width="large")})
        curves = room.curves()
        lines, own = [], set()
        for i, e in enumerate(entries):
            if e.id in curves:
                if i in mine:
                    own.add(len(lines))
                lines.append((f"{i + 1}. {e.name}: {e.run}", *curves[e.id]))
        if lines:
            widgets.chart(figures.board_curves(lines, own), "board")
        rows = event.selection.rows
        if rows and rows[0] < len(entries):
            chosen(entries[rows[0]], me)

    board()
    if not live:
        watch_for_a_change(room, shown)


def watch_for_a_change(room, shown: list[Entry]) -> None:
    """A board opened before the room trains (the teacher's, on the projector, before "everyone
    press Start") draws itself again once a training joins, starts or leaves: it draws nothing
    until then."""
    before = [(e.id, e.status) for e in shown]

    @st.fragment(run_every=IDLE_POLL_S)
    def watch() -> None:
        if [(e.id, e.status) for e in room.board()] != before:
            st.rerun(scope="app")

    watch()


def table(entries: list[Entry], mine: set[int]) -> pd.DataFrame:
    """The board as text cells (a grid cell shows text as it is: no markdown, no HTML)."""
    return pd.DataFrame({
        "rank": range(1, len(entries) + 1),
        "": ["◀ you" if i in mine else "" for i in range(len(entries))],
        "name": [e.name for e in entries],
        "run": [e.run for e in entries],
        "recipe": [e.recipe for e in entries],
        "shape": [e.shape for e in entries],
        "text": [e.source for e in entries],
        "status": [e.status for e in entries],
        "steps": [f"{e.steps:,} / {e.max_iters:,}" for e in entries],
        "tokens/s": [round(e.tokens_per_s) if e.tokens_per_s else None for e in entries],
        "val loss": [round(e.val_loss, 4) if e.val_loss is not None else None for e in entries],
        "sample": [" ".join(e.sample.split())[-120:] for e in entries],
        "note": [e.note for e in entries],
    })


def chosen(entry: Entry, me) -> None:
    st.subheader(f"{escape_markdown(entry.name)}: {escape_markdown(entry.run)}")
    st.markdown(f"{escape_markdown(entry.recipe)} · {escape_markdown(entry.shape)} · {entry.source} · "
                f"{entry.status} at step {entry.steps:,}")
    if entry.sample:
        st.code(entry.sample, language=None, wrap_lines=True)
    row = st.container(horizontal=True)
    row.button("Open in every view", key=K + "open", disabled=entry.saved_step is None, on_click=room_glue.open_model,
             args=(entry,), help="Adds it to your model list (read-only: only its owner trains it).")
    if room_glue.resumable(entry, me):
        row.button("Resume my training", key=K + "resume", on_click=resume, args=(entry.id,))
    if st.session_state.get(RESUME_ERROR):
        st.error(st.session_state.pop(RESUME_ERROR))
    if entry.saved_step is None:
        st.caption("No checkpoint yet: the first is saved at its first evaluation.")


def resume(training: int) -> None:
    try:
        room_glue.resume(training)
    except (RoomError, CheckpointError, OSError) as e:
        st.session_state[RESUME_ERROR] = f"Cannot resume: {escape_markdown(str(e))}"
        return
    st.session_state[room_glue.GO] = "views/training.py"  # where it trains, at the start of the next run


board_view()
