"""Every cost a model brings, bounded before it is paid, in one place that every way in uses.

A checkpoint (or nanoGPT's model_args) declares a GPTConfig, and its file declares the names,
shapes and dtypes of its tensors. From those alone, before a model or a tensor is built, this
module says what the model would cost: its weights and causal masks, and one forward pass with
every internal cached (the T x T attention scores and patterns of every layer and head, which
grow with the square of the context). A small file can declare a huge model, so nothing is
trusted to be as small as the file it came in.

The budgets are environment variables an instructor may set, read when asked:
    GPT_EXPLORER_MAX_MODEL_MB    weights (float32) and causal masks of one model (default 256)
    GPT_EXPLORER_MAX_FORWARD_MB  one forward pass of one sequence at block_size, every internal
                                 cached (default 256)
    GPT_EXPLORER_MAX_LAYERS      transformer blocks (default 48): each costs time to build and
                                 to run, however small
The shipped checkpoints need at most 43 MB and 80 MB (full-gpu), and 6 layers.
"""

import functools
import math
import os
from dataclasses import astuple, dataclass, field, replace

import torch
from torch.overrides import TorchFunctionMode

from .model import GPT, GPTConfig

MB = 10**6
MAX_ENV = 10**9  # the caps are whole numbers up to this (a browser's number widgets hold 2**53 at most)
FLOAT_BYTES = 4  # a loaded model computes in float32
# The weights a checkpoint may hold (they are loaded as float32). Others (integers, float8) are
# refused: float8 has no isfinite, and an integer is no weight.
WEIGHT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
SWITCHES = ("bias", "attention", "feed_forward", "residual", "layer_norm", "tie_weights")


class BudgetError(ValueError):
    """A model this server will not build: it would cost more than the budgets allow, or its
    declared settings and tensors do not fit together. The message says which, in a user's words."""


def env_int(name: str, default: int | None, problems: list[str]) -> int | None:
    """An instructor's cap from the environment; an unusable value is noted in problems and the
    default used instead (None: the caller's own default)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(float(raw))  # OverflowError for "inf"
        if not 1 <= value <= MAX_ENV:
            raise ValueError
        return value
    except (ValueError, OverflowError):
        using = f"using {default:,}" if default is not None else "using the default"
        problems.append(f"{name}={raw!r} is not a whole number from 1 to {MAX_ENV:,}; {using}.")
        return default


@dataclass(frozen=True)
class Budgets:
    max_model_bytes: int = 256 * MB
    max_forward_bytes: int = 256 * MB
    max_layers: int = 48
    notes: tuple[str, ...] = field(default=(), compare=False)  # the environment values that were ignored

    @classmethod
    def from_env(cls) -> "Budgets":
        problems: list[str] = []
        d = cls()
        return cls(max_model_bytes=env_int("GPT_EXPLORER_MAX_MODEL_MB", d.max_model_bytes // MB, problems) * MB,
                   max_forward_bytes=env_int("GPT_EXPLORER_MAX_FORWARD_MB", d.max_forward_bytes // MB, problems) * MB,
                   max_layers=env_int("GPT_EXPLORER_MAX_LAYERS", d.max_layers, problems),
                   notes=tuple(problems))


# Costs, from the config alone (Python integers: no size can overflow) ------------------------


def param_count(config: GPTConfig) -> int:
    """The model's parameters, a tied matrix once, read off expected_tensors: no model is built."""
    return sum(math.prod(shape) for shape in expected_tensors(config).values())


def model_bytes(config: GPTConfig) -> tuple[int, int]:
    """(float32 weights, causal masks): every attention layer keeps a block_size² mask of bools."""
    masks = config.n_layer * config.block_size**2 if config.attention else 0
    return FLOAT_BYTES * param_count(config), masks


def forward_bytes(config: GPTConfig, T: int | None = None, cache: bool = True) -> int:
    """Memory of one forward pass of one sequence of T characters (default: block_size).

    cache=True is the explicit path the views run: every layer keeps q, k, v, z, its residuals,
    LayerNorm outputs and MLP pre/post (about 19 T x C floats with the lecture's 4x MLP), the
    scores and pattern of each head (2 x n_head x T x T), and the layer being computed holds two
    more T x T working copies.
    cache=False is sampling and plain forwards: keys and values of every layer, and one layer's
    working tensors. Logits and their softmax are T x vocab each.
    """
    T = config.block_size if T is None else T
    C, H, V, L = config.n_embd, config.n_head, config.vocab_size, config.n_layer
    logits = 2 * T * V
    if not config.attention:
        return FLOAT_BYTES * logits
    scores, mlp = H * T * T, 2 * T * config.mlp_size  # MLP pre and post: 8 T x C at the lecture's 4x
    if cache:
        floats = 4 * T * C + L * (11 * T * C + mlp + 2 * scores) + 2 * scores + logits
    else:
        floats = L * 2 * T * C + 7 * T * C + mlp + 2 * scores + logits
    return FLOAT_BYTES * floats


def _size(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / MB:,.0f} MB" if n >= MB else f"{n / 1e3:,.0f} kB"


def check_config(config: GPTConfig, budgets: Budgets | None = None) -> None:
    """Refuse a model that would cost more than the budgets (Budgets.from_env() by default),
    from its config alone: nothing is built."""
    b = budgets or Budgets.from_env()
    wrong = next((name for name in SWITCHES if not isinstance(getattr(config, name), bool)), None)
    if wrong:  # GPTConfig takes any value for a switch, and "no" would count as on
        raise BudgetError(f"model setting {wrong} must be true or false, got {getattr(config, wrong)!r}")
    if config.attention and config.n_layer > b.max_layers:
        raise BudgetError(f"the model has {config.n_layer:,} layers; this server allows at most "
                          f"{b.max_layers} (GPT_EXPLORER_MAX_LAYERS)")
    weights, masks = model_bytes(config)
    if weights + masks > b.max_model_bytes:
        raise BudgetError(f"the model needs {_size(weights + masks)} of memory ({param_count(config):,} parameters: "
                          f"{_size(weights)}; causal masks for block_size {config.block_size:,}: {_size(masks)}); "
                          f"this server allows {_size(b.max_model_bytes)} (GPT_EXPLORER_MAX_MODEL_MB)")
    forward = forward_bytes(config)
    if forward > b.max_forward_bytes:
        raise BudgetError(f"one forward pass over block_size {config.block_size:,} characters with every internal "
                          f"kept needs {_size(forward)} ({config.n_layer} layer(s) x {config.n_head} head(s) of "
                          f"{config.block_size:,}² attention scores); this server allows "
                          f"{_size(b.max_forward_bytes)} (GPT_EXPLORER_MAX_FORWARD_MB)")


# Tensors, from their headers alone -------------------------------------------------------------


def expected_tensors(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a checkpoint of this config holds (a tied lm_head once).

    Read from a model on the meta device (no memory) with one block, whose names are repeated
    for every layer: building thousands of blocks, even on the meta device, takes seconds. Kept
    for the last few configs: the Train page asks at every script run of every participant."""
    return dict(_expected_tensors(astuple(config)))  # a copy: the caller's to change


class _ShapesOnly(TorchFunctionMode):
    """Skips the two calls of a model's build (the weights' normal fill, the mask's tril) whose
    meta-device kernels import torch._dynamo on first use: seconds that the server's first page
    (whose sidebar checks every pretrained model) would wait for shapes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.init.normal_, torch.tril):
            return args[0] if args else kwargs["tensor"]  # init.normal_ passes it by name
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=32)
def _expected_tensors(fields: tuple) -> dict[str, tuple[int, ...]]:
    config = GPTConfig(*fields)
    with torch.device("meta"), _ShapesOnly():
        model = GPT(replace(config, n_layer=1))
    state = model.state_dict()
    if config.tie_weights:
        del state["lm_head.weight"]
    out = {}
    for name, t in state.items():
        if name.startswith("blocks.0."):
            out.update({f"blocks.{i}.{name[9:]}": tuple(t.shape) for i in range(config.n_layer)})
        else:
            out[name] = tuple(t.shape)
    return out


def check_tensors(headers: dict[str, tuple[str, tuple[int, ...]]], expected: dict[str, tuple[int, ...]]) -> None:
    """headers: name -> (safetensors dtype name, e.g. "F32", and shape). Every name the model has
    and no other, each of the shape it needs, in a float dtype: all before any tensor is read."""
    missing = sorted(set(expected) - set(headers))
    unexpected = sorted(set(headers) - set(expected))
    if missing or unexpected:
        raise BudgetError(f"the weights do not match the model config: missing {missing[:5]}"
                          f"{' and more' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{' and more' if len(unexpected) > 5 else ''}")
    for name, want in expected.items():
        dtype, shape = headers[name]
        if tuple(shape) != want:
            raise BudgetError(f"tensor {name} has shape {tuple(shape)} but the config needs {want}")
        if dtype not in WEIGHT_DTYPES:
            raise BudgetError(f"tensor {name} holds {dtype}, not floating-point weights "
                              "(float16, bfloat16, float32 or float64)")


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name of a torch dtype ("F32"), or torch's for those it lacks."""
    return next((k for k, v in WEIGHT_DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))

