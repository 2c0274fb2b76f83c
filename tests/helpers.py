"""Tiny models for fast tests: every preset at a shape that runs in milliseconds."""

import torch

from core import GPT, GPTConfig


def tiny_config(preset: str = "layernorm", vocab_size: int = 20, **overrides) -> GPTConfig:
    sizes = dict(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=vocab_size)
    if preset in ("one_head", "multi_head", "ffn", "bigram"):
        sizes["n_layer"] = 1
    if preset == "one_head":
        sizes["n_head"] = 1
    return GPTConfig.from_preset(preset, **{**sizes, **overrides})


def tiny_model(preset: str = "layernorm", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(preset, **overrides)).eval()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02) -> bool:
    """Poll predicate until it is true or the timeout passes."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
