"""The sampling engine of each loaded model, shared by every session of the server: the room's
Generates are written together, one batched forward a character (core.engine). On a server
whose trainings are Ray workers, the engines are on a worker too (explorer/offpage/ray_sampling.py)."""

import streamlit as st

from core.checkpoint import Checkpoint
from core.engine import Engine
from explorer.glue.widgets import model_key
from explorer.offpage.recipes import read_limits
from explorer.offpage.sample_job import SAMPLE_THREAD


def engine_for(ckpt: Checkpoint):
    """An Engine, or a RemoteEngine that takes the same submit()."""
    return _engine(model_key(ckpt.model), read_limits()[0].workers, ckpt)


@st.cache_resource(max_entries=8, show_spinner=False)  # an idle engine holds no cache, only the model
def _engine(key: str, workers: str, _ckpt: Checkpoint):
    if workers == "ray":
        from explorer.offpage.ray_sampling import RemoteEngine  # a server on threads never imports Ray

        return RemoteEngine(_ckpt, key)
    return Engine(_ckpt.model, thread_name=SAMPLE_THREAD)
