"""The sampling engine of each loaded model, shared by every session of the server: the room's
Generates are written together, one batched forward a character (core.engine)."""

import streamlit as st
import torch

from core.engine import Engine
from explorer.glue.widgets import model_key


def engine_for(model: torch.nn.Module) -> Engine:
    return _engine(model_key(model), model)


@st.cache_resource(max_entries=8, show_spinner=False)  # an idle engine holds no cache, only the model
def _engine(key: str, _model: torch.nn.Module) -> Engine:
    return Engine(_model, thread_name="gpt-explorer-sample")
