"""GPT Explorer's core: the lecture's GPT with its internals exposed, and what trains it."""

from .model import GPT, GPTConfig, PRESETS
from .tokenizer import CharTokenizer, UnknownCharactersError, visible

__all__ = ["GPT", "GPTConfig", "PRESETS", "CharTokenizer", "UnknownCharactersError", "visible"]
