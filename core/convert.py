"""Open a character-level model trained by nanoGPT's train.py, as a checkpoint of this project.

    python -m core.convert out-shakespeare-char/ckpt.pt --meta data/shakespeare_char/meta.pkl --out pretrained/nanogpt
    python -m core.convert ckpt.pt --text input.txt --out pretrained/nanogpt

nanoGPT (https://github.com/karpathy/nanoGPT) saves `ckpt.pt`, a pickled dict: 'model' (the
state dict), 'model_args' (n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout),
'optimizer', 'iter_num', 'best_val_loss' and 'config'. A character-level dataset keeps its
vocabulary in `meta.pkl` ({'vocab_size', 'itos', 'stoi'}); it is also the sorted characters
of the training text. nanoGPT's model is this project's GPT with nanoGPT's shape switches on
(GELU, tied embeddings, biases or not): only the parameter names differ.

Neither file is trusted. ckpt.pt is read with torch.load(weights_only=True), which builds
tensors and plain containers and refuses anything else; meta.pkl with an unpickler that builds
dicts, lists, strings and numbers and refuses anything else.
"""

import argparse
import io
import math
import pickle
import re
import sys
import zipfile
from collections import Counter
from pathlib import Path

import torch

from .budget import dtype_name
from .checkpoint import Checkpoint, CheckpointError, check_model, save_checkpoint
from .data import DataError, load_shakespeare, text_from_bytes
from .model import GPT, GPTConfig
from .tokenizer import CharTokenizer
from .trainer import Record

# nanoGPT's module names -> ours. Inside transformer.h.N (blocks.N):
BLOCK_NAMES = {"ln_1": "ln1", "attn.c_attn": "sa.qkv", "attn.c_proj": "sa.proj",
               "ln_2": "ln2", "mlp.c_fc": "ffwd.fc", "mlp.c_proj": "ffwd.proj"}
TOP_NAMES = {"transformer.wte": "token_embedding_table", "transformer.wpe": "position_embedding_table",
             "transformer.ln_f": "ln_f", "lm_head": "lm_head"}
COMPILED_PREFIX = "_orig_mod."  # nanoGPT saves the torch.compile wrapper's state dict when it compiles


def our_name(name: str) -> str | None:
    """This project's name for a nanoGPT tensor; None for attn.bias, the causal mask that older
    nanoGPT versions saved as a buffer (our mask is rebuilt, never saved)."""
    module, _, leaf = name.removeprefix(COMPILED_PREFIX).rpartition(".")
    block = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", module)
    if block and block[2] == "attn" and leaf == "bias":
        return None
    if block and block[2] in BLOCK_NAMES:
        return f"blocks.{block[1]}.{BLOCK_NAMES[block[2]]}.{leaf}"
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{leaf}"
    raise CheckpointError(f"{name} is not a parameter of nanoGPT's GPT")


def load_nanogpt(source, vocab: list[str] | None = None, name: str = "nanogpt") -> Checkpoint:
    """A Checkpoint from nanoGPT's ckpt.pt (a path or a binary file object). vocab: the
    characters from meta.pkl or the training text; without one, a model of nanoGPT's
    shakespeare_char dataset gets Tiny Shakespeare's. model_args and the tensors' names, shapes
    and dtypes are checked (core.budget) before the model is built or a tensor converted."""
    raw = _read_ckpt(source)
    config = _config(raw["model_args"])
    vocab = vocab if vocab is not None else _default_vocab(_train_settings(raw))
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"the vocabulary has {len(vocab)} characters but the model has vocab_size "
                              f"{config.vocab_size}: is this a character-level model, with its own vocabulary?")
    try:
        tokenizer = CharTokenizer(vocab)
    except ValueError as e:
        raise CheckpointError(f"the vocabulary cannot be used: {e}") from e
    state = _renamed(raw["model"])
    lm_head = state.pop("lm_head.weight", None)  # nanoGPT ties it to wte: one matrix under two names
    headers = {k: (dtype_name(t.dtype), tuple(t.shape)) for k, t in state.items()}
    if config.bias:
        headers["lm_head.bias"] = ("F32", (config.vocab_size,))  # nanoGPT's lm_head has none: ours is zeros
    if lm_head is not None and (dtype_name(lm_head.dtype), tuple(lm_head.shape)) != headers.get(
            "token_embedding_table.weight"):
        raise CheckpointError("lm_head.weight differs from transformer.wte.weight, but nanoGPT ties them")
    check_model(config, headers)
    model = GPT(config)
    model.load_state_dict(_our_state(state, lm_head, config))
    model.eval()
    return Checkpoint(model, tokenizer, None, _record(raw), name, _notes(raw))


def _config(args: dict) -> GPTConfig:
    try:
        return GPTConfig(vocab_size=args["vocab_size"], block_size=args["block_size"], n_layer=args["n_layer"],
                         n_head=args["n_head"], n_embd=args["n_embd"], dropout=float(args.get("dropout", 0.0)),
                         bias=args.get("bias", True), activation="gelu", tie_weights=True)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"ckpt.pt's model_args describe no possible model: {e}") from e


def _read_ckpt(source) -> dict:
    _check_uncompressed(source)
    try:
        raw = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it names {named[1]}" if named else "or it is damaged"
        raise CheckpointError(f"ckpt.pt holds more than tensors and plain data ({what}), so "
                              "torch.load(weights_only=True) refuses it: loading it fully could run code") from e
    except Exception as e:  # torch.load raises many types for a missing or damaged file
        why = (str(e).splitlines() or [type(e).__name__])[0]  # an empty file raises a bare EOFError
        raise CheckpointError(f"ckpt.pt could not be read (truncated, empty or damaged): {why}") from e
    if not (isinstance(raw, dict) and isinstance(raw.get("model"), dict) and isinstance(raw.get("model_args"), dict)):
        raise CheckpointError("this is not a checkpoint of nanoGPT's train.py: it has no 'model' and 'model_args'")
    return raw


def _check_uncompressed(source) -> None:
    """torch.save writes a zip archive of uncompressed entries, and torch.load also reads
    compressed ones: a 40 KB ckpt.pt of deflated zeros unpacked to 40 MB (measured), so a
    compressed entry is refused before anything is unpacked."""
    try:
        with open(source, "rb") if isinstance(source, (str, Path)) else _rewound(source) as f:
            if f.read(4) != b"PK\x03\x04":
                return  # not a zip: torch.load names what is wrong
            f.seek(0)
            packed = [i.filename for i in zipfile.ZipFile(f).infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        raise CheckpointError(f"ckpt.pt could not be read: {e}") from e
    if packed:
        raise CheckpointError(f"ckpt.pt holds compressed entries ({packed[0]}), which torch.save never writes: "
                              "they could unpack to far more than the file")


class _rewound:
    """A file object lent to a `with` block, put back at its start afterwards for torch.load."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self.f

    def __exit__(self, *exc):
        self.f.seek(0)


def _renamed(state: dict) -> dict[str, torch.Tensor]:
    """nanoGPT's tensors under this project's names, unconverted."""
    ours = {}
    for name, tensor in state.items():
        new = our_name(str(name))
        if new is None:
            continue
        if not (isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided):
            raise CheckpointError(f"{name} is not a dense tensor")
        ours[new] = tensor
    return ours


def _our_state(state: dict[str, torch.Tensor], lm_head: torch.Tensor | None, config: GPTConfig) -> dict:
    """The state dict to load, once names, shapes and dtypes are known to fit: finite, float32."""
    for name, tensor in state.items():
        if not bool(tensor.isfinite().all()):
            raise CheckpointError(f"{name} holds NaN or infinite values: not finite weights")
    wte = state["token_embedding_table.weight"]
    if lm_head is not None and not torch.equal(lm_head, wte):
        raise CheckpointError("lm_head.weight differs from transformer.wte.weight, but nanoGPT ties them")
    ours = {name: t.float() for name, t in state.items()}
    ours["lm_head.weight"] = ours["token_embedding_table.weight"]
    if config.bias:
        ours["lm_head.bias"] = torch.zeros(config.vocab_size)
    return ours


def _train_settings(raw: dict) -> dict:
    """nanoGPT's training settings (its 'config'), or {} if it saved none."""
    config = raw.get("config")
    return config if isinstance(config, dict) else {}


def _record(raw: dict) -> Record:
    """Steps and tokens (nanoGPT's gradient_accumulation_steps counts every process's micro-steps)."""
    iters = raw.get("iter_num")
    if not isinstance(iters, int):
        return Record()
    sizes = [_train_settings(raw).get(k) for k in ("batch_size", "gradient_accumulation_steps", "block_size")]
    tokens = iters * math.prod(sizes) if all(isinstance(n, int) for n in sizes) else 0
    return Record(iters=iters, tokens=tokens)


def _notes(raw: dict) -> dict:
    """What the model card shows of where the model came from."""
    notes = {"converted from": "nanoGPT's ckpt.pt"}
    dataset = _train_settings(raw).get("dataset")
    if isinstance(dataset, str):
        notes["nanoGPT dataset"] = dataset
    best = raw.get("best_val_loss")  # a 0-d tensor
    if isinstance(best, (float, torch.Tensor)) and torch.as_tensor(best).numel() == 1:
        notes["nanoGPT best val loss"] = round(float(best), 4)
    return notes


def _default_vocab(config: dict) -> list[str]:
    """nanoGPT's shakespeare_char vocabulary is Tiny Shakespeare's characters, sorted."""
    if config.get("dataset") != "shakespeare_char":
        raise CheckpointError("give the model's vocabulary: its dataset's meta.pkl or its training text")
    try:
        return vocab_from_text(load_shakespeare())
    except DataError as e:
        raise CheckpointError(f"Tiny Shakespeare gives this model's vocabulary, but: {e}") from e


def vocab_from_text(text: str) -> list[str]:
    """The vocabulary nanoGPT's character-level prepare.py makes: the text's characters, sorted."""
    return CharTokenizer.from_text(text).itos


# meta.pkl ----------------------------------------------------------------------------------


class PlainUnpickler(pickle.Unpickler):
    """Builds only what a pickle can build without naming a class or function (a pickle runs
    code by naming one): refuses every such name."""

    def find_class(self, module, name):
        raise CheckpointError(f"meta.pkl asks for {module}.{name}: only dicts, lists, strings and numbers "
                              "are read from it")


def read_plain_pickle(data: bytes):
    """The dicts, lists, strings and numbers a pickle holds; CheckpointError for anything else."""
    try:
        obj = PlainUnpickler(io.BytesIO(data)).load()
    except CheckpointError:
        raise
    except Exception as e:  # the unpickler raises many types for damaged data
        raise CheckpointError(f"meta.pkl is not a readable pickle: {e}") from e
    _check_plain(obj)
    return obj


def _check_plain(obj) -> None:
    seen, todo = set(), [obj]  # a pickle may share one list many times: visit each object once
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
        elif not isinstance(item, (str, int, float)):
            raise CheckpointError(f"meta.pkl holds a {type(item).__name__}: only dicts, lists, strings "
                                  "and numbers are read from it")


def vocab_from_meta(data: bytes) -> list[str]:
    """The characters of nanoGPT's meta.pkl, in id order (from its itos: id -> character)."""
    meta = read_plain_pickle(data)
    itos = meta.get("itos") if isinstance(meta, dict) else None
    if not isinstance(itos, dict) or set(itos) != set(range(len(itos))):
        raise CheckpointError("meta.pkl has no 'itos' mapping the ids 0..n-1 to characters")
    vocab = [itos[i] for i in range(len(itos))]
    if not vocab:
        raise CheckpointError("meta.pkl's itos is empty: a vocabulary needs at least one character")
    if not all(isinstance(ch, str) and len(ch) == 1 for ch in vocab):
        raise CheckpointError("meta.pkl's itos holds more than single characters: not a character-level vocabulary")
    twice = next((ch for ch, n in Counter(vocab).items() if n > 1), None)
    if twice is not None:
        raise CheckpointError(f"meta.pkl's itos lists {twice!r} twice: each character needs one id")
    return vocab


# The command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="nanoGPT's ckpt.pt")
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument("--meta", help="the dataset's meta.pkl, for the vocabulary")
    vocab.add_argument("--text", help="the training text, for the vocabulary (its characters, sorted)")
    p.add_argument("--out", required=True, help="checkpoint NAME, written as NAME.safetensors + NAME.json")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        vocab = None
        if args.meta:
            vocab = vocab_from_meta(Path(args.meta).read_bytes())
        elif args.text:
            vocab = vocab_from_text(text_from_bytes(Path(args.text).read_bytes(), max_bytes=1 << 40))
        ckpt = load_nanogpt(args.ckpt, vocab, name=Path(args.out).name)
        path = save_checkpoint(args.out, ckpt.model, ckpt.tokenizer, record=ckpt.record, extra=ckpt.extra)
    except (CheckpointError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = ckpt.model.config
    print(f"{path}: {ckpt.model.num_params():,} parameters, {c.n_layer} layers, {c.n_head} heads, {c.n_embd} dims, "
          f"block {c.block_size}, {c.vocab_size} characters, {ckpt.record.iters:,} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
