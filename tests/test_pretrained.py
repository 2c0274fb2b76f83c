"""The shipped checkpoints: each loads, is small, is in the README, and is as good as its record says."""

from pathlib import Path

import pytest
import torch

from core.checkpoint import load_checkpoint, paths
from core.data import Corpus
from core.experiments import head_types, val_windows

PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"
SHIPPED = sorted(PRETRAINED.glob("*.json"))
EVAL_TOKENS = 32_768  # per model, in windows spread evenly over the val split: noise well under 0.03


@pytest.fixture(scope="module", params=SHIPPED, ids=[p.stem for p in SHIPPED])
def shipped(request):
    return load_checkpoint(request.param)


def test_there_are_checkpoints_to_look_at():
    assert SHIPPED, "pretrained/ holds no checkpoint"


def test_each_file_is_small_and_the_folder_well_under_60_mb():
    sizes = {p.name: p.stat().st_size for p in PRETRAINED.iterdir() if p.is_file()}
    assert all(size < 25e6 for size in sizes.values()), sizes
    assert sum(sizes.values()) < 60e6


def test_the_readme_lists_each_one_with_its_command(shipped):
    readme = (PRETRAINED / "README.md").read_text(encoding="utf-8")
    assert f"| {shipped.name} |" in readme
    assert shipped.extra["command"] and shipped.extra["command"] in readme


def test_val_loss_agrees_with_the_record(shipped, shakespeare):
    """Recomputed on a fixed sample of the val split, within 0.03 of what training recorded."""
    model, T = shipped.model, shipped.model.config.block_size
    # Evenly spaced windows: the val split's start alone is easier than its whole (by 0.09 for full-gpu).
    x, y = val_windows(Corpus(shakespeare, T, shipped.tokenizer), T, EVAL_TOKENS)
    with torch.no_grad():
        losses = [model(xb, yb)[1] for xb, yb in zip(x.split(16), y.split(16))]
    loss = torch.stack(losses).mean().item()
    assert abs(loss - shipped.record.val_loss) <= 0.03, (loss, shipped.record.val_loss)


def test_seeded_sampling_is_reproducible(shipped):
    start = torch.tensor([shipped.tokenizer.encode("ROMEO:")])
    draw = lambda seed: shipped.model.generate(start, 60, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_shipped_without_optimizer_state():
    assert not any(paths(p)[2].exists() for p in SHIPPED)  # a .state file would double the download


def test_cpu_best_layer_0_head_0_looks_at_the_previous_character(shakespeare):
    """The README's Attention screenshot and the teacher's example push show this head: nearly all
    of its weight on the previous character, on the validation text."""
    ckpt = load_checkpoint(PRETRAINED / "cpu-best.json")
    T = ckpt.model.config.block_size
    x, _ = val_windows(Corpus(shakespeare, T, ckpt.tokenizer), T)
    previous = head_types(ckpt.model, x)["previous_token"]  # (layers, heads)
    assert previous[0, 0] > 0.9 and previous[0, 0] == previous.max(), previous
