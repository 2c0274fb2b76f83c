"""GPT Explorer (placeholder until the explorer views land): load a checkpoint, sample from it."""
import sys
from pathlib import Path

import streamlit as st
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.checkpoint import CheckpointError, load_checkpoint  # noqa: E402

st.title("GPT Explorer")
path = st.text_input("Checkpoint (NAME of NAME.safetensors + NAME.json)")
if path:
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        st.error(str(e))
    else:
        st.write(f"{ckpt.model.num_params():,} parameters")
        out = ckpt.model.generate(torch.tensor([[0]]), 200, generator=torch.Generator().manual_seed(0))
        st.code(ckpt.tokenizer.decode(out[0]))
