"""The lecture's stages: every preset has the lecture's own parameters, and stage_of reads back
the stage of every preset and every shipped checkpoint.

The reference is the lecture's code as it stands at each stage, written out plainly below
(one Linear per key, query and value of every head; Sequential feed-forward layers)."""

import json
from pathlib import Path

import pytest
import torch.nn as nn

from core import GPT, PRESETS, STAGES, GPTConfig, stage_of
from core.stages import CUSTOM, PARTS, first_with

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 65


class LectureHead(nn.Module):
    def __init__(self, n_embd, head_size):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)


class LectureMultiHead(nn.Module):
    def __init__(self, n_embd, num_heads, projection):
        super().__init__()
        self.heads = nn.ModuleList([LectureHead(n_embd, n_embd // num_heads) for _ in range(num_heads)])
        if projection:  # arrives with the residual connections
            self.proj = nn.Linear(n_embd, n_embd)


def lecture_feed_forward(n_embd, residual):
    if not residual:  # "a simple linear layer followed by a non-linearity"
        return nn.Sequential(nn.Linear(n_embd, n_embd), nn.ReLU())
    return nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd))


class LectureBlock(nn.Module):
    def __init__(self, n_embd, n_head, residual, layer_norm):
        super().__init__()
        self.sa = LectureMultiHead(n_embd, n_head, projection=residual)
        self.ffwd = lecture_feed_forward(n_embd, residual)
        if layer_norm:
            self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)


class LectureModel(nn.Module):
    """BigramLanguageModel as the lecture's file reads at each stage."""

    def __init__(self, stage, n_embd, n_head, n_layer, block_size):
        super().__init__()
        if stage == "bigram":
            self.token_embedding_table = nn.Embedding(VOCAB, VOCAB)
            return
        self.token_embedding_table = nn.Embedding(VOCAB, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        if stage == "one_head":
            self.sa_head = LectureHead(n_embd, n_embd)
        elif stage in ("multi_head", "ffn"):
            self.sa_heads = LectureMultiHead(n_embd, n_head, projection=False)
            if stage == "ffn":
                self.ffwd = lecture_feed_forward(n_embd, residual=False)
        else:
            layer_norm = stage in ("layernorm", "full")
            self.blocks = nn.Sequential(*[LectureBlock(n_embd, n_head, True, layer_norm) for _ in range(n_layer)])
            if layer_norm:
                self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, VOCAB)


def shapes(module: nn.Module, config: GPTConfig | None = None) -> list[tuple]:
    """Every parameter's shape; our stacked q/k/v matrix counts as the lecture's one per head."""
    out = []
    for name, p in module.named_parameters():
        if config is not None and name.endswith("qkv.weight"):
            out += [(config.head_size, config.n_embd)] * (3 * config.n_head)
        else:
            out.append(tuple(p.shape))
    return sorted(out)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_preset_has_the_lecture_parameters(stage):
    config = GPTConfig.from_preset(stage, vocab_size=VOCAB)
    ours = GPT(config)
    lecture = LectureModel(stage, config.n_embd, config.n_head, config.n_layer, config.block_size)
    assert shapes(ours, config) == shapes(lecture)
    assert ours.num_params(non_embedding=False) == sum(p.numel() for p in lecture.parameters())


def test_the_full_preset_is_the_lecture_model():
    assert GPT(GPTConfig.from_preset("full", vocab_size=VOCAB)).num_params(non_embedding=False) == 10_788_929


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_of_reads_back_every_preset(stage):
    assert stage_of(GPTConfig.from_preset(stage, vocab_size=VOCAB)) == stage


@pytest.mark.parametrize("path", sorted((ROOT / "pretrained").glob("*.json")), ids=lambda p: p.stem)
def test_stage_of_agrees_with_the_stage_each_shipped_checkpoint_recorded(path):
    meta = json.loads(path.read_text())
    assert stage_of(GPTConfig.from_dict(meta["model_config"])) == meta["extra"]["preset"]


def test_a_mix_of_switches_is_custom():
    assert stage_of(GPTConfig(residual=False, layer_norm=True)) == CUSTOM


def test_each_stage_adds_a_part_or_a_size_in_the_lecture_order():
    counts = [len(stage.parts) for stage in STAGES.values()]
    assert counts == sorted(counts)
    assert [first_with(p) for p in PARTS] == ["one_head", "ffn", "residual", "layernorm"]
    assert all(stage.adds and stage.source for stage in STAGES.values())
    assert list(PRESETS) == list(STAGES)
