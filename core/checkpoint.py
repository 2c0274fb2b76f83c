"""Checkpoints: the only code that knows the file format.

A checkpoint NAME is two files side by side:
- NAME.safetensors: the model's weights (safetensors holds tensors only, so loading one
  cannot run code, unlike a pickle);
- NAME.json: format version, model config, vocabulary, train config and training record.
Optionally NAME.state.safetensors holds the optimizer and random states for resuming.

Every file is written to a temporary file and renamed into place, so a crash mid-save
leaves the previous checkpoint as it was.
"""

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors_from_bytes
from safetensors.torch import load_file, save

from .data import Corpus
from .model import GPT, GPTConfig
from .tokenizer import CharTokenizer
from .trainer import Record, TrainConfig, Trainer

FORMAT = "gpt-explorer-checkpoint"
FORMAT_VERSION = 1
MAX_MASK_BYTES = 10**9  # the causal masks (block_size² bytes a layer) a loaded model may build


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message says why in a user's words."""


@dataclass
class Checkpoint:
    model: GPT
    tokenizer: CharTokenizer
    train_config: TrainConfig | None = None
    record: Record = field(default_factory=Record)
    name: str = ""
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. how a pretrained model was made)


def paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(weights, json, state) for a checkpoint given by NAME, NAME.json or NAME.safetensors."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    # Appended, not with_suffix: a NAME like "runs/lr-0.5" keeps its ".5".
    return Path(f"{stem}.safetensors"), Path(f"{stem}.json"), Path(f"{stem}.state.safetensors")


def _saved_state(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict that is saved: a tied matrix once (lm_head shares the token table)."""
    state = model.state_dict()
    if model.config.tie_weights:
        del state["lm_head.weight"]
    return state


def weight_tensors(model: GPT, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The saved state as safetensors wants it: contiguous CPU tensors, optionally cast."""
    return {name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().cpu().contiguous()
            for name, t in _saved_state(model).items()}


def checkpoint_bytes(model: GPT, tokenizer: CharTokenizer, train_config: TrainConfig | None = None,
                     record: Record | None = None, dtype: torch.dtype | None = None,
                     extra: dict | None = None) -> tuple[bytes, bytes]:
    """The two files of a checkpoint as bytes: (NAME.safetensors, NAME.json). dtype (e.g.
    torch.float16) shrinks the weights file; loading brings them back to float32."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "vocab": tokenizer.itos,
        "train_config": train_config.to_dict() if train_config else None,
        "record": asdict(record or Record()),
        "extra": extra or {},
    }
    weights = save(weight_tensors(model, dtype), metadata={"format": FORMAT})
    return weights, json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8")


def save_checkpoint(path, model: GPT, tokenizer: CharTokenizer, train_config: TrainConfig | None = None,
                    record: Record | None = None, state: dict[str, torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None, extra: dict | None = None) -> Path:
    """Write NAME.safetensors and NAME.json (and NAME.state.safetensors when state is given)."""
    weights_path, json_path, state_path = paths(path)
    files = {}  # the JSON goes last: it is what makes a checkpoint a checkpoint
    if state is not None:
        files[state_path] = save({k: v.contiguous() for k, v in state.items()})
    files[weights_path], files[json_path] = checkpoint_bytes(model, tokenizer, train_config, record, dtype, extra)
    try:
        weights_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(files)
        if state is None:
            state_path.unlink(missing_ok=True)  # an earlier save's state does not fit these weights
    except OSError as e:
        raise CheckpointError(f"could not save the checkpoint to {json_path.parent}: {e.strerror or e}") from e
    return json_path


def _atomic_write(files: dict[Path, bytes]) -> None:
    """Write every file to a temporary file, then rename them all into place: a save that fails
    while writing (a full disk, say) leaves the previous checkpoint whole."""
    temps = {}
    try:
        for path, data in files.items():
            fd, temps[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temps[path], 0o644)  # mkstemp makes files private; a checkpoint is meant to be shared
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def load_checkpoint(path) -> Checkpoint:
    """Load NAME (or NAME.json / NAME.safetensors); raises CheckpointError if anything is off."""
    weights_path, json_path, _ = paths(path)
    if not json_path.is_file():
        raise CheckpointError(f"missing {json_path.name}: a checkpoint is a .safetensors file and a .json file side by side")
    if not weights_path.is_file():
        raise CheckpointError(f"missing {weights_path.name}: a checkpoint is a .safetensors file and a .json file side by side")
    meta_bytes = json_path.read_bytes()
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path.name} is not a readable safetensors file "
                              f"(truncated or not a checkpoint): {e}") from e
    return checkpoint_from(meta_bytes, tensors, name=json_path.stem)


def load_checkpoint_bytes(weights: bytes, meta: bytes, name: str = "uploaded") -> Checkpoint:
    """The same checks as load_checkpoint, for files that arrive as bytes (uploads)."""
    try:
        tensors = load_tensors_from_bytes(weights)
    except Exception as e:  # safetensors raises several types for malformed bytes
        raise CheckpointError(f"the weights file is not a readable safetensors file "
                              f"(truncated or not a checkpoint): {e}") from e
    return checkpoint_from(meta, tensors, name=name)


def load_state(path) -> dict[str, torch.Tensor] | None:
    """The optimizer and random states saved beside a checkpoint, or None if there are none."""
    state_path = paths(path)[2]
    if not state_path.is_file():
        return None
    try:
        return load_file(state_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{state_path.name} is not readable: {e}") from e


def checkpoint_from(meta_bytes: bytes, tensors: dict[str, torch.Tensor], name: str = "") -> Checkpoint:
    meta = _parse_meta(meta_bytes)
    try:
        config = GPTConfig.from_dict(meta["model_config"])
        tokenizer = CharTokenizer(meta["vocab"])
        train_config = TrainConfig.from_dict(meta["train_config"]) if meta.get("train_config") else None
        record = _record(meta.get("record") or {})
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"the JSON file describes an impossible model: {e}") from e
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"the vocabulary has {tokenizer.vocab_size} characters but the model "
                              f"config says vocab_size={config.vocab_size}")
    check_size(config, len(tensors))
    with torch.device("meta"):
        expected = _saved_state(GPT(config))  # names and shapes only, no memory
    _check_tensors(tensors, expected)
    model = GPT(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(state, strict=not config.tie_weights)
    model.eval()
    return Checkpoint(model, tokenizer, train_config, record, name, meta.get("extra") or {})


def check_size(config: GPTConfig, n_tensors: int) -> None:
    """Refuse a config that would cost far more than the weights behind it, before building it:
    GPT makes one module and one block_size x block_size causal mask a layer whatever a file
    holds, so a small file claiming 20,000 layers took 71 s to refuse, and a million-character
    context would ask for a terabyte."""
    if config.attention and config.n_layer > n_tensors:  # every layer has weights of its own
        raise CheckpointError(f"the weights do not match the model config: it has {config.n_layer:,} layers, "
                              f"the weights {n_tensors} tensors in all")
    mask_bytes = config.n_layer * config.block_size**2 if config.attention else 0
    if mask_bytes > MAX_MASK_BYTES:
        raise CheckpointError(f"block_size {config.block_size:,} needs {mask_bytes / 1e9:,.1f} GB of causal masks "
                              f"({config.n_layer} layer(s) of block_size² bytes); the limit is {MAX_MASK_BYTES / 1e9:.1f} GB")


def _record(d: dict) -> Record:
    """The training record, each figure a non-negative number (the model card formats them)."""
    record = Record(**d)
    for name, value in asdict(record).items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        if not (number or (value is None and name.endswith("_loss"))):
            raise ValueError(f"record.{name} must be a non-negative number, got {value!r}")
    return record


def _parse_meta(meta_bytes: bytes) -> dict:
    try:
        meta = json.loads(meta_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise CheckpointError(f"the JSON file is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError("the JSON file is not a GPT Explorer checkpoint description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {meta.get('format_version')!r} is not supported "
                              f"(this version reads {FORMAT_VERSION})")
    if not isinstance(meta.get("model_config"), dict):
        raise CheckpointError("the JSON file has no model_config")
    vocab = meta.get("vocab")
    if not isinstance(vocab, list) or not all(isinstance(ch, str) and len(ch) == 1 for ch in vocab):
        raise CheckpointError("the JSON file's vocab is not a list of single characters")
    try:
        "".join(vocab).encode("utf-8")
    except UnicodeEncodeError as e:  # JSON can spell a lone surrogate ("\ud800"); no page can show one
        raise CheckpointError(f"the JSON file's vocab holds {e.object[e.start]!r}, which is not a character") from e
    if not isinstance(meta.get("extra") or {}, dict):
        raise CheckpointError("the JSON file's extra notes are not a mapping of names to values")
    return meta


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"the weights do not match the model config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(got.shape)} but the config needs {tuple(want.shape)}")
        if not got.is_floating_point():
            raise CheckpointError(f"tensor {name} holds {got.dtype}, not floating-point weights")
        if not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"tensor {name} holds NaN or infinite values")


def save_trainer(path, trainer: Trainer, with_state: bool = True, dtype: torch.dtype | None = None,
                 extra: dict | None = None) -> Path:
    """Checkpoint a Trainer's model, with its optimizer and random states for resuming."""
    return save_checkpoint(path, trainer.model, trainer.corpus.tokenizer, trainer.train_config,
                           trainer.record, trainer.state_tensors() if with_state else None, dtype, extra)


def resume_trainer(path, corpus: Corpus, train_config: TrainConfig | None = None) -> Trainer:
    """A Trainer that carries on where the checkpoint at path stopped. The corpus must be
    encoded with the checkpoint's vocabulary; train_config defaults to the saved one."""
    ckpt = load_checkpoint(path)
    state = load_state(path)
    if state is None:
        raise CheckpointError(f"{paths(path)[2].name} is missing: this checkpoint was saved without "
                              "the optimizer state needed to resume")
    if corpus.tokenizer.itos != ckpt.tokenizer.itos:
        raise CheckpointError("the text's vocabulary differs from the checkpoint's")
    trainer = Trainer(ckpt.model.config, train_config or ckpt.train_config or TrainConfig(), corpus, model=ckpt.model)
    trainer.record = ckpt.record
    try:
        trainer.load_state_tensors(state)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"the saved optimizer state does not fit this model: {e}") from e
    return trainer
