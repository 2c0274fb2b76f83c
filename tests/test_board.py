"""The room in the app, through AppTest: the Board, the name box and a training joining the board,
resuming one's own training, the teacher's actions and the banner they push, and that no
participant reaches a teacher's action without the token."""

import threading
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest
from test_room import TEXT, tiny_trainer

from explorer.glue.room_glue import SEAT, TOKEN, TOKEN_ENV
from explorer.offpage.classroom import ROOM_DIR_ENV, open_room
from helpers import figure, rerun_until, threads_down_to, wait_for

APP = Path(__file__).resolve().parent.parent / "explorer" / "app.py"
SECRET = "correct horse battery staple"


@pytest.fixture
def room(tmp_path, monkeypatch, pretrained):
    """An empty room of its own, the tiny model listed, the teacher's token set; afterwards no
    training or watcher thread left behind."""
    monkeypatch.setenv(ROOM_DIR_ENV, str(tmp_path / "room"))
    monkeypatch.setenv(TOKEN_ENV, SECRET)
    before = threading.active_count()
    yield open_room(tmp_path / "room")
    st.cache_resource.clear()
    assert threads_down_to(before, timeout=30), threading.enumerate()


def open_view(view: str, seat: str | None = None, **state) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    if seat:
        at.query_params["seat"] = seat
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    at.switch_page(f"views/{view}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def fill(room, names=("<b>Ada</b> *x*", "Bo")):
    """Two participants with a saved, evaluated training each: Bo's is better."""
    seats = {}
    for name, losses in zip(names, ((2.5, 2.2), (2.4, 1.9))):
        me, seats[name] = room.join(name)
        training = room.add_training(me.id, "layernorm run 1", "1-minute demo", "layernorm 2×2×16, context 16", 400)
        room.save_eval(training, tiny_trainer())
        for step, loss in zip((10, 20), losses):
            room.record_eval(training, step, loss, saved=True)
        room.set_status(training, "finished")
    return seats


def teacher_buttons(at: AppTest) -> list[str]:
    """The buttons on the page, less the banner's."""
    return [b.label for b in at.button if not (b.key or "").startswith("room_")]


def snapshot(room) -> tuple:
    return room.board(), room.participants(), room.latest_push(), room.caps(), room.curves().keys()


def test_the_board_ranks_the_room_marks_my_row_and_opens_a_model_in_every_view(room):
    seats = fill(room)
    at = open_view("board", seat=seats["<b>Ada</b> *x*"])
    frame = at.dataframe[0].value
    assert frame["name"].tolist() == ["Bo", "<b>Ada</b> *x*"]  # by val loss; a grid cell shows text as it is
    assert frame[""].tolist() == ["", "◀ you"]
    legend = [t["name"] for t in figure(at)["data"]]
    assert legend == ["1. Bo: layernorm run 1", "2. &lt;b&gt;Ada&lt;/b&gt; *x*: layernorm run 1"]  # no HTML from names
    at.session_state["board_table"] = {"selection": {"rows": [1], "columns": [], "cells": []}}
    at.run()
    assert at.subheader[0].value.startswith("\\<b\\>Ada\\</b\\> \\*x\\*")  # markdown-escaped
    at.session_state["board_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert "Resume my training" not in [b.label for b in at.button]  # Bo's, not mine
    at.button(key="board_open").click().run()
    picker = at.sidebar.selectbox(key="model")
    assert picker.value == "Bo: layernorm run 1 #2 (room)"
    assert not at.sidebar.error and not at.exception
    at.switch_page("views/attention.py").run()
    assert not at.exception and at.sidebar.selectbox(key="model").value == picker.value
    assert "vocabulary" in at.warning[0].value  # the room's model read the prompt (its text lacks some letters)


def test_a_participant_joins_with_a_unique_name_and_their_training_reports_to_the_board(room):
    def script():
        import streamlit as st

        from explorer.glue import room_glue
        from explorer.glue.session import session_threads
        from explorer.glue.train_setup import shakespeare_corpus
        from explorer.offpage.recipes import Settings, make_trainer
        from explorer.offpage.training_run import TrainingRunner, TrainingSlots

        if room_glue.name_box() is not None and st.button("Start", key="go"):
            settings = Settings(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=60,
                                eval_interval=20)
            text = st.session_state["text"]
            runner = TrainingRunner(make_trainer(settings, text, shakespeare_corpus), TrainingSlots(1), name="layernorm run 1")
            room_glue.enter(runner, settings, "1-minute demo", text)  # as the Train view's start() will
            session_threads().runner = runner
            runner.start()

    room.join("Ada")
    at = AppTest.from_function(script, default_timeout=60)
    at.session_state["text"] = TEXT
    at.run()
    at.text_input(key="room_name").set_value(" ADA ")  # a form: the value goes with the submit
    at.button[0].click().run()
    assert "already called ADA" in at.error[0].value  # names are unique in the room, whatever the case
    at.text_input(key="room_name").set_value("Grace")
    at.button[0].click().run()
    assert "Grace" in at.caption[0].value and at.query_params["seat"] == at.session_state[SEAT]
    at.button(key="go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    entry = room.board()[0]
    assert (entry.name, entry.source, entry.shape) == ("Grace", "own text", "layernorm 1×2×16, context 16")
    assert wait_for(lambda: room.training(entry.id).status == "finished", timeout=60)  # the watcher copied it
    entry = room.training(entry.id)
    assert entry.steps == 60 and entry.sample and entry.saved_step == 60 and entry.tokens_per_s > 0
    assert room.curves()[entry.id][0].tolist() == [0, 20, 40, 60]  # the server's val loss at each evaluation


def test_the_owner_resumes_an_interrupted_training_from_its_last_checkpoint(room):
    me, seat = room.join("Ada")
    training = room.add_training(me.id, "layernorm run 1", "demo", "s", 60, TEXT)
    trainer = tiny_trainer(max_iters=60, n_layer=1)
    trainer.run(20)
    room.save_eval(training, trainer)  # the last checkpoint before the restart
    room.recover(live=set())
    assert room.training(training).status == "interrupted"
    other, other_seat = room.join("Bo")
    at = open_view("board", seat=other_seat, board_table={"selection": {"rows": [0], "columns": [], "cells": []}})
    assert "Resume my training" not in [b.label for b in at.button]  # only its owner
    at = open_view("board", seat=seat, board_table={"selection": {"rows": [0], "columns": [], "cells": []}})
    at.button(key="board_resume").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert rerun_until(at, lambda a: room.training(training).status == "finished", timeout=90)
    entry = room.training(training)
    assert entry.steps == 60 and entry.saved_step == 60
    assert room.curves()[training][0].tolist() == [20, 30, 40, 50, 60]  # carried on from the checkpoint at step 20


def test_the_teachers_page_says_how_to_turn_it_on(room, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV)
    at = open_view("teacher", **{TOKEN: ""})  # an empty token matches no empty server token
    assert TOKEN_ENV in at.info[0].value
    assert not at.button and not at.text_input


def test_no_teacher_action_without_the_token(room):
    """Whatever a participant's browser sends (a seat, the action widgets' keys as session
    values, query parameters, a wrong token), no action runs and the room does not change."""
    seats = fill(room)
    room.push("tiny (pretrained)", "Attention")
    before = snapshot(room)
    forged = {TOKEN: "guess", "teacher_sure": True, "teacher_model": "tiny (pretrained)", "teacher_max_iters": 1,
              "teacher_prompt": "pwned", "teacher_typed": "guess"}
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params.update(seat=seats["Bo"], token=SECRET, teacher="1", teacher_token=SECRET)
    for key, value in forged.items():
        at.session_state[key] = value
    at.run()
    at.switch_page("views/teacher.py").run()
    assert not at.exception
    assert teacher_buttons(at) == ["Unlock"]  # no action is even drawn
    at.text_input(key="teacher_typed").set_value(SECRET[:-1])
    next(b for b in at.button if b.label == "Unlock").click().run()
    assert "not the token" in at.error[0].value and teacher_buttons(at) == ["Unlock"]
    for key in ("teacher_push", "teacher_clear", "teacher_remove", "teacher_caps", "teacher_stop"):
        with pytest.raises(KeyError):
            at.button(key=key)
    assert snapshot(room) == before


def test_the_teacher_pushes_a_view_stops_removes_sets_caps_and_clears(room):
    seats = fill(room)
    participant = open_view("board", seat=seats["Bo"])
    at = open_view("teacher")
    at.text_input(key="teacher_typed").set_value(SECRET)
    at.button[0].click().run()
    assert "Push to every screen" in [b.label for b in at.button]
    assert at.session_state["teacher_typed"] == ""  # the typed token does not linger in the widget
    at.selectbox(key="teacher_model").set_value("tiny (pretrained)").run()
    at.number_input(key="teacher_head").set_value(1).run()
    at.text_area(key="teacher_prompt").set_value("ROMEO:\nWhat light").run()
    at.button(key="teacher_push").click().run()
    push = room.latest_push()
    assert (push["model"], push["view"], push["layer"], push["head"]) == ("tiny (pretrained)", "Attention", 0, 1)

    participant.run()
    assert "asks everyone to look at" in participant.markdown[0].value
    participant.button(key="room_open_push").click().run()  # this run switches to the pushed view
    assert not participant.exception, [e.value for e in participant.exception]
    assert participant.title[0].value == "Attention"
    assert participant.sidebar.selectbox(key="model").value == "tiny (pretrained)"
    assert participant.selectbox(key="attn_head").value == 1 and participant.session_state["prompt"] == "ROMEO:\nWhat light"
    assert not any("asks everyone" in m.value for m in participant.markdown)  # seen: the banner is gone

    at.number_input(key="teacher_max_iters").set_value(300).run()
    at.button(key="teacher_caps").click().run()
    assert room.caps()["max_iters"] == 300 and room.limits()[0].max_iters == 300
    assert at.get("download_button")  # the export (its zip is checked in test_room.py)
    first = room.board()[0]
    at.selectbox(key="teacher_training").set_value(at.selectbox(key="teacher_training").options[0]).run()
    at.button(key="teacher_remove").click().run()
    assert room.training(first.id) is None and len(room.board()) == 1
    at.checkbox(key="teacher_sure").check().run()
    at.button(key="teacher_clear").click().run()
    assert room.board() == [] and room.participants() == [] and "empty" in at.success[0].value
