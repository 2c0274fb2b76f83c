"""GPT Explorer's core: the lecture's GPT with its internals exposed, and what trains it."""

from .model import GPT, GPTConfig
from .stages import PRESETS, STAGES, stage_of
from .tokenizer import CharTokenizer, UnknownCharactersError, visible

__all__ = ["GPT", "GPTConfig", "PRESETS", "STAGES", "stage_of", "CharTokenizer", "UnknownCharactersError", "visible"]
