"""The room's Board with 200 trainings: the board's queries and its figure, and the whole Board
view's script run through AppTest (as a participant's poll runs it). Goal: <= 0.5 s a run.

    python -m benchmarks.board_speed            # ~1 min
"""

import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import goal, interleave, machine, median, parse_args, report, verdict
from explorer.offpage import figures
from explorer.offpage.classroom import ROOM_DIR_ENV, Room

TRAININGS, EVALS = 200, 50  # a large room: 200 trainings evaluated every 100 of 5,000 steps
APP = Path(__file__).resolve().parent.parent / "explorer" / "app.py"


def build_room(folder: Path) -> Room:
    room = Room(folder)
    rng = np.random.default_rng(0)
    for k in range(TRAININGS):
        me, _ = room.join(f"participant {k}")
        training = room.add_training(me.id, "layernorm run 1", "1-minute demo", "layernorm 4×4×64, context 64", 5000)
        floor = 1.5 + rng.random()
        for i in range(1, EVALS + 1):
            room.record_eval(training, 100 * i, floor + 2.7 * np.exp(-i / 8), saved=False)
        room.update_progress(training, "running" if k % 10 == 0 else "finished", 100 * EVALS, 5000, 30_000.0 + k,
                             "ROMEO:\nWhat light through yonder window breaks? " * 4)
    return room


def query_and_figure(room: Room):
    entries = room.board()
    curves = room.curves()
    lines = [(f"{i + 1}. {e.name}: {e.run}", *curves[e.id]) for i, e in enumerate(entries) if e.id in curves]
    return figures.board_curves(lines, {len(lines) - 1}).to_plotly_json()


def main() -> None:
    args = parse_args(__doc__)
    from streamlit.testing.v1 import AppTest

    with tempfile.TemporaryDirectory() as tmp:
        os.environ[ROOM_DIR_ENV] = tmp
        room = build_room(Path(tmp))
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.run()
        at.switch_page("views/board.py").run()
        assert not at.exception and len(at.dataframe[0].value) == TRAININGS
        rounds = interleave({"query + figure": lambda: query_and_figure(room), "Board script run (AppTest)": at.run},
                            rounds=3 if args.quick else 15, settle=args.settle)
        assert not at.exception
        size_mb = len(at.get("plotly_chart")[0].proto.spec) / 1e6
    q, run = (median(rounds.times[name]) for name in rounds.times)
    g = goal(run, 0.5, higher_is_better=False, judged=not args.quick)
    report(f"The Board with {TRAININGS} trainings of {EVALS} evaluations", [
        ("board query + figure build, s", f"{q:.3f}", "median"),
        ("Board view script run (AppTest), s", f"{run:.3f}", f"median; goal <= 0.5 s: {verdict(g)}"),
        ("figure JSON sent, MB", f"{size_mb:.2f}", "one grey trace for all but the leaders and your own"),
    ], dict(machine=machine(), query_and_figure_s=q, script_run_s=run, figure_mb=size_mb, goal=g,
            others_share=rounds.others))


if __name__ == "__main__":
    main()
