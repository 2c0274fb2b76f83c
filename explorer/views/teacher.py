"""Teacher: push a view to every screen, stop or remove trainings, set the caps, export and clear
the room. Only for the session that typed the server's token (GPT_EXPLORER_TEACHER_TOKEN):
every action checks it again (room_glue.is_teacher), so no widget key, session value or query
parameter a participant's browser can send reaches one."""

import io

import streamlit as st

from explorer.glue import room_glue
from explorer.glue.room_glue import TOKEN, TOKEN_ENV, is_teacher
from explorer.glue.sidebar import pretrained_paths
from explorer.glue.widgets import escape_markdown
from explorer.offpage.classroom import CAPS, RoomError
from explorer.offpage.recipes import MAX_CAP

K = "teacher_"
TYPED = K + "typed"
DONE = K + "done"  # the last action's message, shown once


def teacher_view() -> None:
    st.title("Teacher")
    if not room_glue.teacher_token():
        st.info(f"The teacher's page is off. Start the server with a token of your choosing to turn it on:\n\n"
                f"`{TOKEN_ENV}=a-long-secret streamlit run explorer/app.py`\n\nthen type that token here.")
        return
    if not is_teacher():
        unlock()
        return
    if st.session_state.get(DONE):
        st.success(st.session_state.pop(DONE))
    st.button("Lock this page", key=K + "lock", on_click=lambda: st.session_state.pop(TOKEN, None))
    room = room_glue.room()
    push_box(room)
    trainings_box(room)
    caps_box(room)
    export_box(room)


def unlock() -> None:
    with st.form(K + "unlock", border=False):
        st.text_input("Teacher's token", type="password", key=TYPED)
        st.form_submit_button("Unlock", on_click=_remember_token)
    if st.session_state.get(TYPED) == "" and TOKEN in st.session_state:
        st.error("That is not the token this server was started with.")


def _remember_token() -> None:
    """Kept in this session only; compared with the server's at every action."""
    st.session_state[TOKEN] = st.session_state.get(TYPED, "")
    st.session_state[TYPED] = ""


def act(message: str, action, *args) -> None:
    """A button callback: the action runs only for the teacher."""
    if not is_teacher():
        return
    try:
        action(*args)
    except RoomError as e:
        st.session_state[DONE] = f"Not done: {e}"
        return
    st.session_state[DONE] = message


def push_box(room) -> None:
    st.subheader("Show everyone")
    entries = {f"{e.label} (room)": e for e in room.board() if e.saved_step is not None}
    models = [f"{p.stem} (pretrained)" for p in pretrained_paths()] + list(entries)
    if not models:
        st.info("No model to show yet: pretrained ones go in the pretrained folder; trainings appear once saved.")
        return
    a, b, c, d = st.columns([3, 2, 1, 1])
    model = a.selectbox("Model", models, key=K + "model")
    view = b.selectbox("View", list(room_glue.PUSH_VIEWS), key=K + "view")
    layer = c.number_input("Layer", 0, 63, 0, key=K + "layer")
    head = d.number_input("Head", 0, 63, 0, key=K + "head")
    prompt = st.text_area("Prompt (empty: keep each participant's own)", key=K + "prompt", height=70)
    entry = entries.get(model)
    st.button("Push to every screen", type="primary", key=K + "push", on_click=act,
              args=(f"Pushed {model} to every screen.", room.push, model, view, prompt, int(layer), int(head),
                    entry.id if entry else None))


def trainings_box(room) -> None:
    st.subheader("Trainings")
    entries = room.board()
    if not entries:
        st.caption("None yet.")
        return
    labels = {f"{i}. {e.label} ({e.status}, step {e.steps:,})": e for i, e in enumerate(entries, 1)}
    choice = labels[st.selectbox("Training", list(labels), key=K + "training")]
    row = st.container(horizontal=True)
    row.button("Stop it", key=K + "stop", disabled=not choice.live, on_click=act,
             args=(f"Asked {choice.label} to stop.", stop, room, choice.id))
    row.button("Remove it", key=K + "remove", on_click=act,
             args=(f"Removed {choice.label} and its checkpoint.", remove, room, choice.id))


def stop(room, training: int) -> None:
    room.request_stop(training)  # the room's watcher passes it on, in whichever process trains it
    room_glue.watcher(room).stop(training)


def remove(room, training: int) -> None:
    stop(room, training)
    room.remove(training)


def caps_box(room) -> None:
    st.subheader("Caps for new trainings")
    limits, _ = room.limits()
    current = dict(max_params=limits.max_params, max_iters=limits.max_iters,
                   max_text_mb=max(1, limits.max_text_bytes // 1_000_000), room_max_mb=room.max_bytes() // 1_000_000)
    columns = st.columns(len(CAPS))
    for column, (name, label) in zip(columns, CAPS.items()):
        column.number_input(label, 1, MAX_CAP, current[name], key=K + name)
    st.caption(f"The room's files take {room.disk_bytes() / 1e6:,.1f} MB. A checkpoint that would pass the disk cap "
               "is not saved, and its row on the board says so.")
    st.button("Save the caps", key=K + "caps", on_click=act, args=("Caps saved.", save_caps, room))


def save_caps(room) -> None:
    room.set_caps(**{name: int(st.session_state[K + name]) for name in CAPS})


def export_box(room) -> None:
    st.subheader("The room")
    entries = room.board()
    st.download_button("Export the room (.zip: board.csv and every checkpoint)", lambda: export(room), "room.zip",
                       "application/zip", key=K + "export", on_click="ignore")
    sure = st.checkbox(f"Yes, delete all {len(entries)} training(s), their checkpoints and every participant's name",
                       key=K + "sure")
    st.button("Clear the room", key=K + "clear", disabled=not sure, on_click=act,
              args=("The room is empty.", clear, room))
    if entries:
        st.caption(f"Best so far: {escape_markdown(entries[0].label)}.")


def export(room) -> bytes:
    if not is_teacher():
        return b""
    buffer = io.BytesIO()
    room.export_zip(buffer)
    return buffer.getvalue()


def clear(room) -> None:
    for training in room_glue.watcher(room).live():
        room_glue.watcher(room).stop(training)
    room.clear()
    st.session_state[K + "sure"] = False


teacher_view()
