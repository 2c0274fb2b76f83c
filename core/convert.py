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
from pathlib import Path

import torch

from .checkpoint import Checkpoint, CheckpointError, check_size, save_checkpoint
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
    shakespeare_char dataset gets Tiny Shakespeare's."""
    raw = _read_ckpt(source)
    args = raw["model_args"]
    try:
        config = GPTConfig(vocab_size=args["vocab_size"], block_size=args["block_size"], n_layer=args["n_layer"],
                           n_head=args["n_head"], n_embd=args["n_embd"], dropout=args.get("dropout", 0.0),
                           bias=args.get("bias", True), activation="gelu", tie_weights=True)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"ckpt.pt's model_args describe no possible model: {e}") from e
    vocab = vocab if vocab is not None else _default_vocab(_train_settings(raw))
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"the vocabulary has {len(vocab)} characters but the model has vocab_size "
                              f"{config.vocab_size}: is this a character-level model, with its own vocabulary?")
    check_size(config, len(raw["model"]))
    model = GPT(config)
    try:
        model.load_state_dict(_our_state(raw["model"], config))  # strict: every tensor, every shape
    except RuntimeError as e:
        raise CheckpointError(f"the weights do not fit ckpt.pt's model_args: {e}") from e
    model.eval()
    return Checkpoint(model, CharTokenizer(vocab), None, _record(raw), name, _notes(raw))


def _read_ckpt(source) -> dict:
    try:
        raw = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it names {named[1]}" if named else "or it is damaged"
        raise CheckpointError(f"ckpt.pt holds more than tensors and plain data ({what}), so "
                              "torch.load(weights_only=True) refuses it: loading it fully could run code") from e
    except Exception as e:  # torch.load raises many types for a missing or damaged file
        raise CheckpointError(f"ckpt.pt could not be read: {str(e).splitlines()[0]}") from e
    if not (isinstance(raw, dict) and isinstance(raw.get("model"), dict) and isinstance(raw.get("model_args"), dict)):
        raise CheckpointError("this is not a checkpoint of nanoGPT's train.py: it has no 'model' and 'model_args'")
    return raw


def _our_state(state: dict, config: GPTConfig) -> dict[str, torch.Tensor]:
    ours = {}
    for name, tensor in state.items():
        new = our_name(str(name))
        if new is None:
            continue
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and bool(tensor.isfinite().all())):
            raise CheckpointError(f"{name} is not a tensor of finite floating-point weights")
        ours[new] = tensor.float()
    wte = ours.get("token_embedding_table.weight")
    if wte is not None:  # without it, the strict load names what is missing
        lm_head = ours.setdefault("lm_head.weight", wte)  # nanoGPT ties them: one matrix, saved under both names
        if not torch.equal(lm_head, wte):
            raise CheckpointError("lm_head.weight differs from transformer.wte.weight, but nanoGPT ties them")
    if config.bias:
        ours["lm_head.bias"] = torch.zeros(config.vocab_size)  # nanoGPT's lm_head has no bias
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
    if not all(isinstance(ch, str) and len(ch) == 1 for ch in vocab):
        raise CheckpointError("meta.pkl's itos holds more than single characters: not a character-level vocabulary")
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
