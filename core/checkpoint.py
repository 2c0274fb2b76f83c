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
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_tensors_from_bytes
from safetensors.torch import load_file, save

from .budget import BudgetError, check_config, check_tensors, dtype_name, expected_tensors
from .data import Corpus
from .model import GPT, GPTConfig
from .tokenizer import CharTokenizer
from .trainer import Record, TrainConfig, Trainer

FORMAT = "gpt-explorer-checkpoint"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header
# Bytes per element of each safetensors dtype, to check a header's offsets against its shapes.
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


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
    unreadable = f"{weights_path.name} is not a readable safetensors file (truncated or not a checkpoint)"
    try:
        with open(weights_path, "rb") as f:
            head = f.read(8)
            head += f.read(min(int.from_bytes(head, "little"), MAX_HEADER_BYTES))
        headers = _headers(head, weights_path.stat().st_size)
    except (ValueError, TypeError, KeyError, RecursionError, OSError) as e:
        raise CheckpointError(f"{unreadable}: {e}") from e

    def read():
        try:
            return load_file(weights_path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{unreadable}: {e}") from e

    return _checkpoint(meta_bytes, headers, read, json_path.stem)


def load_checkpoint_bytes(weights: bytes, meta: bytes, name: str = "uploaded") -> Checkpoint:
    """The same checks as load_checkpoint, for files that arrive as bytes (uploads)."""
    unreadable = "the weights file is not a readable safetensors file (truncated or not a checkpoint)"
    try:
        headers = _headers(weights, len(weights))
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise CheckpointError(f"{unreadable}: {e}") from e

    def read():
        try:
            return load_tensors_from_bytes(weights)
        except Exception as e:  # safetensors raises several types for malformed bytes
            raise CheckpointError(f"{unreadable}: {e}") from e

    return _checkpoint(meta, headers, read, name)


def _headers(head: bytes, size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from the start of a safetensors file of `size` bytes: an 8-byte
    little-endian length N, then N bytes of JSON. Read without reading a tensor, so that the
    shapes are checked against the model before anything of their size is made."""
    if len(head) < 8:
        raise ValueError(f"it has {len(head)} bytes, fewer than the 8 that start a safetensors file")
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > min(len(head), size):
        raise ValueError(f"its header ({n:,} bytes) does not fit in the file ({size:,} bytes)")
    header = _json(head[8:8 + n])
    if not isinstance(header, dict):
        raise ValueError("its header is not a mapping of names to tensors")
    out, data_bytes = {}, size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and dtype in ITEM_BYTES):
            raise ValueError(f"tensor {name} has no valid dtype and shape")
        if not (type(begin) is int and type(end) is int and 0 <= begin <= end <= data_bytes
                and end - begin == math.prod(shape) * ITEM_BYTES[dtype]):
            raise ValueError(f"tensor {name} claims shape {tuple(shape)}, which its {end - begin:,} bytes do not hold")
        out[name] = dtype, tuple(shape)
    return out


def foreign_file(path) -> Path | None:
    """The first of NAME's files that exists but is not part of a GPT Explorer checkpoint (a
    user's own notes.json, say): saving at NAME would replace it."""
    weights_path, json_path, _ = paths(path)
    if json_path.exists():
        try:
            meta = _json(json_path.read_bytes())
        except (ValueError, RecursionError, OSError):
            meta = None
        if not (isinstance(meta, dict) and meta.get("format") == FORMAT):
            return json_path
    if weights_path.exists():
        try:
            with safe_open(weights_path, "pt") as f:
                ours = (f.metadata() or {}).get("format") == FORMAT  # every save writes this mark
        except (SafetensorError, OSError, ValueError):
            ours = False
        if not ours:
            return weights_path
    return None


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
    """A Checkpoint from its JSON and tensors already in memory, with every check of load_checkpoint."""
    headers = {k: (dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()}
    return _checkpoint(meta_bytes, headers, lambda: tensors, name)


def _checkpoint(meta_bytes: bytes, headers: dict, read_tensors, name: str) -> Checkpoint:
    """Every check that needs no tensor comes first (the JSON, the budgets, the tensors' names,
    shapes and dtypes); then read_tensors() reads them, and only then is the model built."""
    meta = _parse_meta(meta_bytes)
    try:
        config = GPTConfig.from_dict(meta["model_config"])
        tokenizer = CharTokenizer(meta["vocab"])
        train_config = _train_config(meta.get("train_config"))
        record = _record(meta.get("record") or {})
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"the JSON file describes an impossible model: {e}") from e
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"the vocabulary has {tokenizer.vocab_size} characters but the model "
                              f"config says vocab_size={config.vocab_size}")
    check_model(config, headers)
    tensors = read_tensors()
    bad = next((k for k, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise CheckpointError(f"tensor {bad} holds NaN or infinite values")
    model = GPT(config)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=not config.tie_weights)
    model.eval()
    return Checkpoint(model, tokenizer, train_config, record, name, meta.get("extra") or {})


def check_model(config: GPTConfig, headers: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """The budgets (core.budget), then the tensors' names, shapes and dtypes, as CheckpointError."""
    try:
        check_config(config)
        check_tensors(headers, expected_tensors(config))
    except BudgetError as e:
        raise CheckpointError(str(e)) from e


SETTING_KINDS = {int: ((int,), "a whole number"), float: ((int, float), "a number"), str: ((str,), "a string")}


def _train_config(d) -> TrainConfig | None:
    """The saved training settings, each of its field's type (a resumed run uses them)."""
    if not d:
        return None
    if not isinstance(d, dict):
        raise ValueError("train_config is not a mapping of settings")
    for f in fields(TrainConfig):  # before TrainConfig compares them with numbers
        value = d.get(f.name, f.default)
        kinds, words = SETTING_KINDS.get(type(f.default), ((int, type(None)), "a whole number or null"))
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"train_config.{f.name} must be {words}, got {value!r}")
    if not -2**63 <= d.get("seed", 0) < 2**63:  # what a torch.Generator takes
        raise ValueError(f"train_config.seed must be from -2**63 to 2**63 - 1, got {d['seed']}")
    return TrainConfig.from_dict(d)


def _record(d: dict) -> Record:
    """The training record, each figure a non-negative number (the model card formats them)."""
    record = Record(**d)
    for name, value in asdict(record).items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        if not (number or (value is None and name.endswith("_loss"))):
            raise ValueError(f"record.{name} must be a non-negative number, got {value!r}")
    return record


def _json(data: bytes):
    """JSON whose numbers are finite and of a sane length: Python's json reads 1e999 as inf,
    NaN as nan, and raises a bare ValueError for an integer of over 4,300 digits."""
    return json.loads(data.decode("utf-8"), parse_float=_finite, parse_int=_int, parse_constant=_finite)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"it holds {text[:20]}, which is not a finite number")
    return value


def _int(text: str) -> int:
    if len(text) > 30:
        raise ValueError(f"it holds a number of {len(text):,} digits")
    return int(text)


def _parse_meta(meta_bytes: bytes) -> dict:
    try:
        meta = _json(meta_bytes)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
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
        trainer.load_state_tensors(state)  # checks every tensor before it sets one
    except ValueError as e:
        raise CheckpointError(f"{paths(path)[2].name} does not fit this model: {e}") from e
    return trainer
