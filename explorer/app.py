"""GPT Explorer: the entry point. Builds the navigation; each view is one file in views/.

    streamlit run explorer/app.py
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run` puts explorer/ on the path, not the repository root
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402
import torch  # noqa: E402

from explorer.glue import room_glue, sidebar, train_setup  # noqa: E402  (imports core, so after the path is set)

VIEWS = ROOT / "explorer" / "views"  # absolute: st.Page resolves a relative path from elsewhere
GIL_SWITCH_S = 0.0005  # how long a thread may keep the GIL while another waits for it (benchmarks/README.md)
# The views, in sidebar order: (file in views/, title, icon). A new view is one more line.
PAGES = [
    ("attention.py", "Attention", ":material/visibility:"),
    ("training.py", "Train", ":material/model_training:"),
    ("trick.py", "The trick", ":material/functions:"),
    ("activations.py", "Activations", ":material/bolt:"),
    ("knockouts.py", "Experiments", ":material/science:"),
    ("patching.py", "Patching", ":material/compare_arrows:"),
    ("compare.py", "Compare", ":material/difference:"),
    ("sampling.py", "Sample", ":material/edit_note:"),
    ("dataset.py", "Data", ":material/table_rows:"),
    ("export.py", "Export", ":material/download:"),
    ("lecture.py", "Lecture", ":material/school:"),
    ("board.py", "Board", ":material/leaderboard:"),
    ("teacher.py", "Teacher", ":material/admin_panel_settings:"),
]


def one_torch_thread() -> None:
    """Every session shares the server's cores: one thread per computation. On 2 cores, more
    threads made concurrent work slower (see the project's Streamlit notes)."""
    torch.set_num_threads(1)
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # torch allows it only before its first parallel work
            pass


def short_gil_turns() -> None:
    """Sessions, trainings and the server share one interpreter, and a torch op gives up the GIL
    and must win it back after every op: with Python's default 5 ms switch interval, threads
    drawing figures starved sampling (benchmarks/README.md, Workshop load)."""
    sys.setswitchinterval(GIL_SWITCH_S)


def main() -> None:
    """Built in a function so that a test can drive it (as Streamlit's own hello app does)."""
    st.set_page_config(page_title="GPT Explorer", page_icon=":material/visibility:", layout="wide")
    page = st.navigation([st.Page(VIEWS / file, title=title, icon=icon) for file, title, icon in PAGES])
    st.sidebar.title("GPT Explorer")
    train_setup.prepare_workers()
    room_glue.keep_seat()
    room_glue.banner()
    sidebar.model_sidebar(train_view=page.title == "Train")
    page.run()


if __name__ == "__main__":  # as `streamlit run` runs it; a test may import PAGES without side effects
    one_torch_thread()
    short_gil_turns()
    main()
