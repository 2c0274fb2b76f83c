"""The lecture's stages: the one place that says what each stage is.

Each stage of "Let's build GPT" adds one idea to the model before it. Here each has its
GPTConfig switches and sizes (as the lecture trains it), one sentence on what it adds, the
parts it has, and the validation loss the lecture reports for it, with where it says so.
`GPTConfig.from_preset(name)` builds a stage, and `stage_of(config)` reads one back.
"""

from dataclasses import dataclass

PARTS = ("attention", "feed_forward", "residual", "layer_norm")  # the switches, in the order they arrive


@dataclass(frozen=True)
class Stage:
    name: str
    adds: str  # one sentence: what this stage adds to the one before
    switches: dict  # GPTConfig fields at the lecture's sizes
    lecture_val_loss: float | None = None
    source: str = ""  # where in the lecture that loss is reported

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts the model has at this stage (see PARTS)."""
        return tuple(p for p in PARTS if self.switches.get(p, True))


# The lecture's small model (batch 32, block 8, n_embd 32) until "full"; every stage from one_head
# on has the keys, queries and values without bias, as the lecture's Head does.
_SMALL = dict(n_layer=1, n_head=1, n_embd=32, block_size=8, qkv_bias=False)
_OFF = dict(feed_forward=False, residual=False, layer_norm=False)
VIDEO = "the lecture video (youtube.com/watch?v=kCc8FmEb1nY), chapter"

STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("bigram", "each character predicts the next from a lookup table of logits",
          dict(_SMALL, attention=False, **_OFF), 2.5, f"{VIDEO} 'port our code to a script' (bigram.py)"),
    Stage("one_head", "one head of self-attention over token and position embeddings",
          dict(_SMALL, **_OFF), 2.40, f"{VIDEO} 'inserting a single self-attention block' (from 2.5 to 2.4)"),
    Stage("multi_head", "four heads of size 8 side by side, concatenated",
          dict(_SMALL, n_head=4, **_OFF), 2.28, f"{VIDEO} 'multi-headed self-attention'"),
    Stage("ffn", "a feed-forward layer after attention (Linear and ReLU): communication, then computation",
          dict(_SMALL, n_head=4, feed_forward=True, residual=False, layer_norm=False), 2.24,
          f"{VIDEO} 'feedforward layers of transformer block'"),
    Stage("residual", "three blocks with residual connections, projections and a 4x wider feed-forward layer",
          dict(_SMALL, n_layer=3, n_head=4, layer_norm=False), 2.08, f"{VIDEO} 'residual connections'"),
    Stage("layernorm", "pre-norm LayerNorm in every block and before the output",
          dict(_SMALL, n_layer=3, n_head=4), 2.06, f"{VIDEO} 'layernorm'"),
    Stage("full", "scaled up: dropout, 6 layers of 6 heads, 384 dimensions, 256 characters of context",
          dict(_SMALL, n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2), 1.48,
          f"{VIDEO} 'scaling up the model' (val 1.4873)"),
]}
PRESETS: dict[str, dict] = {name: stage.switches for name, stage in STAGES.items()}
CUSTOM = "custom"  # a mix of switches that is none of the lecture's stages


def stage_of(config) -> str:
    """The stage a GPTConfig is at, by its switches; CUSTOM if it is none of them. Sizes do not
    matter (a stage is an architecture), except that "full" is "layernorm" with dropout."""
    if not config.attention:
        return "bigram"
    on = tuple(getattr(config, p) for p in PARTS[1:])
    by_parts = {(False, False, False): "one_head" if config.n_head == 1 else "multi_head",
                (True, False, False): "ffn", (True, True, False): "residual",
                (True, True, True): "full" if config.dropout > 0 else "layernorm"}
    return by_parts.get(on, CUSTOM)


def describe(name: str) -> str:
    """What a stage adds, for a model card; CUSTOM says it is none."""
    return STAGES[name].adds if name in STAGES else "a mix of switches that is none of the lecture's stages"


def first_with(part: str) -> str:
    """The first stage that has a part (PARTS), for messages such as "attention arrives in ..."."""
    return next(name for name, stage in STAGES.items() if part in stage.parts)
