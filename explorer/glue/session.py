"""This browser session's background threads: its training (on a thread here, or followed
from a Ray worker) and its sample, if any.

Both outlive the page's script runs (a click while they work must not throw their work away),
so they cannot live in a script's locals. Streamlit keeps one `SessionThreads` per browser
session and releases it when the tab closes: the threads are then asked to stop.
"""

import streamlit as st

from explorer.offpage.sample_job import SampleJob
from explorer.offpage.training_run import Runner


class SessionThreads:
    def __init__(self):
        self.runner: Runner | None = None  # emptied by the Train view's Reset
        self.published = 0  # how many finished training steps were already offered to the other views
        self.runs = 0  # trainings started in this session: each one's model has a name of its own
        self.sample: SampleJob | None = None  # the last Generate, running or done

    def stop(self) -> None:
        for job in (self.runner, self.sample):
            if job is not None:
                job.stop()


@st.cache_resource(scope="session", max_entries=1, on_release=SessionThreads.stop)
def session_threads() -> SessionThreads:
    """This browser session's threads. `on_release` runs on the server's event loop when the
    session ends: it only sets stop flags, never joins."""
    return SessionThreads()
