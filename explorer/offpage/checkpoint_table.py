"""The shipped checkpoints side by side: one row each, with the lecture's own losses beside.

Pure (no Streamlit): the Lecture view shows this table, and
    python -m explorer.offpage.checkpoint_table
prints it as the Markdown table of pretrained/README.md.
"""

import sys
from pathlib import Path

import pandas as pd

from core import STAGES, stage_of
from core.checkpoint import Checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def summary(ckpt: Checkpoint) -> dict:
    c, rec, tc = ckpt.model.config, ckpt.record, ckpt.train_config
    stage = stage_of(c)  # as the model card reads it (tests check it agrees with the preset the CLI recorded)
    return {
        "name": ckpt.name,
        "stage": stage,
        "shape": f"{c.n_layer}x{c.n_head}x{c.n_embd}, block {c.block_size}",
        "params": ckpt.model.num_params(non_embedding=False),
        "iterations": rec.iters,
        "tokens": rec.tokens,
        "wall (s)": ckpt.extra.get("wall_seconds"),
        "machine": ckpt.extra.get("machine", ""),
        "train loss": rec.train_loss,
        "val loss": rec.val_loss,
        "lecture val loss": STAGES[stage].lecture_val_loss if stage in STAGES else None,
        "seed": tc.seed if tc else None,
        "command": ckpt.extra.get("command", ""),
    }


def stage_order(row: dict) -> tuple:
    """Stage checkpoints in the lecture's order, then the others."""
    stages = list(STAGES)
    return (not row["name"].startswith("stage-"), stages.index(row["stage"]) if row["stage"] in stages else 99,
            row["name"])


def table(checkpoints: list[Checkpoint]) -> pd.DataFrame:
    return pd.DataFrame(sorted((summary(c) for c in checkpoints), key=stage_order))


def markdown(frame: pd.DataFrame) -> str:
    def cell(value, column):
        if value is None or (isinstance(value, float) and value != value):
            return "—"
        if column in ("train loss", "val loss"):
            return f"{value:.3f}"
        if column in ("params", "tokens"):
            return f"{value:,}"
        if column == "command":
            return f"`{value}`"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(row[c], c) for c in frame.columns) + " |" for _, row in frame.iterrows()]
    return "\n".join(lines)


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "pretrained"
    print(markdown(table([load_checkpoint(p) for p in sorted(folder.glob("*.json"))])))
