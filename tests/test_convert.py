"""nanoGPT checkpoints: a tiny ckpt.pt in nanoGPT's layout, saved as its train.py saves one,
converts to this project's model and gives the logits of nanoGPT's own forward; unsafe or
broken files are refused with a clear error, and nothing in them runs."""

import math
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from core import convert
from core.checkpoint import CheckpointError, load_checkpoint
from explorer.glue import sidebar

ARGS = dict(n_layer=2, n_head=2, n_embd=16, block_size=12, bias=True, vocab_size=20, dropout=0.0)
VOCAB = list("\n !',-.:;?ABCDEFabcd")  # 20 characters, sorted
TOL = 1e-5


def nanogpt_state(args: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with nanoGPT's names and shapes; every weight and bias random, so a wrong
    mapping cannot hide behind LayerNorm's ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    C, bias = args["n_embd"], args["bias"]

    def rand(*shape):
        return 0.3 * torch.randn(*shape, generator=g)

    sd = {"transformer.wte.weight": rand(args["vocab_size"], C), "transformer.wpe.weight": rand(args["block_size"], C)}

    def layer_norm(name):
        sd[f"{name}.weight"] = 1 + rand(C)
        if bias:
            sd[f"{name}.bias"] = rand(C)

    def linear(name, n_in, n_out):
        sd[f"{name}.weight"] = rand(n_out, n_in)  # (out, in), as nn.Linear stores it
        if bias:
            sd[f"{name}.bias"] = rand(n_out)

    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}."
        layer_norm(h + "ln_1")
        linear(h + "attn.c_attn", C, 3 * C)
        linear(h + "attn.c_proj", C, C)
        layer_norm(h + "ln_2")
        linear(h + "mlp.c_fc", C, 4 * C)
        linear(h + "mlp.c_proj", 4 * C, C)
    layer_norm("transformer.ln_f")
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied: one tensor, two names in the state dict
    return sd


def nanogpt_logits(sd: dict, args: dict, idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT's GPT.forward written out: fused qkv split into heads, GELU MLP, tied lm_head."""
    B, T = idx.shape
    C, nh = args["n_embd"], args["n_head"]

    def ln(x, name):
        return F.layer_norm(x, (C,), sd[f"{name}.weight"], sd.get(f"{name}.bias"), 1e-5)

    def linear(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    for i in range(args["n_layer"]):
        h = f"transformer.h.{i}."
        q, k, v = linear(ln(x, h + "ln_1"), h + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // nh))
        att = F.softmax(att.masked_fill(future, float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        x = x + linear(y, h + "attn.c_proj")
        x = x + linear(F.gelu(linear(ln(x, h + "ln_2"), h + "mlp.c_fc")), h + "mlp.c_proj")
    return F.linear(ln(x, "transformer.ln_f"), sd["lm_head.weight"])  # no bias


def save_like_nanogpt(path: Path, sd: dict, args: dict, prefix: str = "", **extra) -> Path:
    """torch.save of the dict nanoGPT's train.py writes, with a real AdamW sidebar."""
    params = [torch.nn.Parameter(t.clone()) for name, t in sd.items() if name != "lm_head.weight"]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    ckpt = {"model": {prefix + name: t for name, t in sd.items()}, "optimizer": optimizer.state_dict(),
            "model_args": args, "iter_num": 250, "best_val_loss": torch.tensor(1.4697),
            "config": {"dataset": "shakespeare_char", "batch_size": 12, "gradient_accumulation_steps": 1,
                       "block_size": args["block_size"], "compile": bool(prefix), "bias": args["bias"]},
            **extra}
    torch.save(ckpt, path)
    return path


def save_meta(path: Path, vocab: list[str]) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"vocab_size": len(vocab), "itos": dict(enumerate(vocab)),
                     "stoi": {ch: i for i, ch in enumerate(vocab)}}, f)
    return path


def random_idx(args: dict) -> torch.Tensor:
    return torch.randint(args["vocab_size"], (3, args["block_size"]), generator=torch.Generator().manual_seed(1))


def assert_same_logits(model, sd, args):
    idx = random_idx(args)
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = nanogpt_logits(sd, args, idx)
    assert (ours - theirs).abs().max() < TOL
    assert theirs.abs().max() > 1.0  # not a vacuous match of near-zero logits


@pytest.mark.parametrize("bias, compiled", [(True, False), (False, False), (True, True)])
def test_converted_model_gives_nanogpts_logits(tmp_path, bias, compiled):
    args = {**ARGS, "bias": bias}
    sd = nanogpt_state(args)
    extra_state = {}
    if compiled:  # torch.compile's prefix, and the causal-mask buffers older versions saved
        extra_state = {f"transformer.h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 12, 12)) for i in range(2)}
    path = save_like_nanogpt(tmp_path / "ckpt.pt", {**sd, **extra_state}, args, prefix="_orig_mod." if compiled else "")
    ckpt = convert.load_nanogpt(path, VOCAB)
    c = ckpt.model.config
    assert (c.activation, c.tie_weights, c.bias) == ("gelu", True, bias)
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (2, 2, 16, 12, 20)
    assert ckpt.model.lm_head.weight is ckpt.model.token_embedding_table.weight
    if bias:
        assert torch.count_nonzero(ckpt.model.lm_head.bias) == 0
    assert not ckpt.model.training
    assert_same_logits(ckpt.model, sd, args)
    assert ckpt.tokenizer.itos == VOCAB
    assert (ckpt.record.iters, ckpt.record.tokens) == (250, 250 * 12 * 1 * 12)
    assert ckpt.extra["nanoGPT best val loss"] == 1.4697


def test_command_line_writes_a_checkpoint_the_project_and_the_picker_open(tmp_path, capsys, monkeypatch):
    sd = nanogpt_state(ARGS)
    ckpt_path = save_like_nanogpt(tmp_path / "ckpt.pt", sd, ARGS)
    out = tmp_path / "pretrained" / "nano"
    meta = save_meta(tmp_path / "meta.pkl", VOCAB)
    assert convert.main([str(ckpt_path), "--meta", str(meta), "--out", str(out)]) == 0
    assert "nano.json" in capsys.readouterr().out
    loaded = load_checkpoint(out)
    assert loaded.tokenizer.itos == VOCAB and loaded.record.iters == 250
    assert loaded.extra["converted from"] == "nanoGPT's ckpt.pt"
    assert_same_logits(loaded.model, sd, ARGS)
    monkeypatch.setenv(sidebar.PRETRAINED_ENV, str(out.parent))
    assert sidebar.pretrained_paths() == [out.with_suffix(".json")]

    # The vocabulary from the training text: its characters, sorted, as nanoGPT's prepare.py makes it.
    text = tmp_path / "input.txt"
    text.write_text("".join(reversed(VOCAB)) * 3, encoding="utf-8")
    assert convert.main([str(ckpt_path), "--text", str(text), "--out", str(tmp_path / "from_text")]) == 0
    assert load_checkpoint(tmp_path / "from_text").tokenizer.itos == VOCAB


def test_shakespeare_char_needs_no_vocabulary_file(tmp_path, shakespeare):
    args = {**ARGS, "vocab_size": 65}
    sd = nanogpt_state(args)
    ckpt = convert.load_nanogpt(save_like_nanogpt(tmp_path / "ckpt.pt", sd, args))  # its config names the dataset
    assert ckpt.tokenizer.itos == sorted(set(shakespeare))
    assert_same_logits(ckpt.model, sd, args)


class FakeUpload:
    """What st.file_uploader returns, as far as the picker reads it."""

    def __init__(self, path: Path):
        self.name, self._data = path.name, path.read_bytes()

    def getvalue(self) -> bytes:
        return self._data


def test_app_upload_converts_in_memory(tmp_path):
    sd = nanogpt_state(ARGS)
    ckpt_file = FakeUpload(save_like_nanogpt(tmp_path / "ckpt.pt", sd, ARGS))
    meta_file = FakeUpload(save_meta(tmp_path / "meta.pkl", VOCAB))
    ckpt = sidebar.load_upload([ckpt_file, meta_file])
    assert ckpt.name == "nanogpt-ckpt" and ckpt.tokenizer.itos == VOCAB
    assert_same_logits(ckpt.model, sd, ARGS)
    (tmp_path / "input.txt").write_text("".join(VOCAB), encoding="utf-8")
    with pytest.raises(CheckpointError, match="ckpt.pt alone, or with its meta.pkl or its training text"):
        sidebar.load_upload([ckpt_file, meta_file, FakeUpload(tmp_path / "input.txt")])


# Refused, and nothing runs -----------------------------------------------------------------


class RunsCode:
    """Unpickling this calls os.mkdir(marker): what a malicious pickle does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_meta_pkl_that_names_a_function_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    data = pickle.dumps({"vocab_size": 20, "itos": dict(enumerate(VOCAB)), "hook": RunsCode(marker)})
    with pytest.raises(CheckpointError, match=r"mkdir: only dicts, lists, strings and numbers"):
        convert.vocab_from_meta(data)
    assert not marker.exists()


@pytest.mark.parametrize("value, kind", [((1, 2), "tuple"), ({1, 2}, "set"), (None, "NoneType"), (b"x", "bytes")])
def test_meta_pkl_with_anything_but_dicts_lists_strings_numbers_is_refused(value, kind):
    data = pickle.dumps({"itos": dict(enumerate(VOCAB)), "other": [value]})
    with pytest.raises(CheckpointError, match=f"holds a {kind}: only dicts, lists, strings and numbers"):
        convert.read_plain_pickle(data)


def test_plain_pickle_reads_nanogpts_meta():
    meta = {"vocab_size": 2, "itos": {0: "a", 1: "b"}, "stoi": {"a": 0, "b": 1}, "scale": 0.5}
    assert convert.read_plain_pickle(pickle.dumps(meta)) == meta
    shared = [["a"]] * 3
    for _ in range(60):  # one list shared 2**60 ways: checked once, not 2**60 times
        shared = [shared, shared]
    convert.read_plain_pickle(pickle.dumps(shared))


def test_ckpt_with_a_pickled_object_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "ckpt.pt"
    torch.save({"model": nanogpt_state(ARGS), "model_args": ARGS, "hook": RunsCode(marker)}, path)
    refused = re.escape(f"names {os.mkdir.__module__}.mkdir), so torch.load(weights_only=True) refuses")
    with pytest.raises(CheckpointError, match=refused):
        convert.load_nanogpt(path, VOCAB)
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    (lambda ck: ck.pop("model_args"), "no 'model' and 'model_args'"),
    (lambda ck: ck["model_args"].update(n_embd=15), "model_args describe no possible model"),
    (lambda ck: ck["model_args"].update(n_layer=3), r"do not match the model config: missing \['blocks\.2\."),
    (lambda ck: ck["model"].pop("transformer.h.1.mlp.c_fc.bias"), r"missing \['blocks\.1\.ffwd\.fc\.bias'\]"),
    (lambda ck: ck["model"].update({"transformer.h.0.attn.rotary.weight": torch.ones(2)}),
     "not a parameter of nanoGPT"),
    (lambda ck: ck["model"].update({"lm_head.weight": torch.zeros(20, 16)}), "nanoGPT ties them"),
    (lambda ck: ck["model"]["transformer.wpe.weight"].fill_(float("nan")), "finite"),
    (lambda ck: ck["model_args"].update(block_size=100_000), "causal masks for block_size 100,000: 20.0 GB"),
])
def test_broken_checkpoints_are_refused(tmp_path, change, message):
    path = save_like_nanogpt(tmp_path / "ckpt.pt", nanogpt_state(ARGS), dict(ARGS))
    ck = torch.load(path, weights_only=True)
    change(ck)
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match=message):
        convert.load_nanogpt(path, VOCAB)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load, handed a meta.pkl
def test_command_line_errors_are_one_line(tmp_path, capsys):
    path = save_like_nanogpt(tmp_path / "ckpt.pt", nanogpt_state(ARGS), ARGS)
    short = save_meta(tmp_path / "meta.pkl", VOCAB[:-1])
    cases = [([str(path), "--meta", str(short)], "the vocabulary has 19 characters but the model has vocab_size 20"),
             ([str(tmp_path / "missing.pt"), "--meta", str(short)], "missing.pt"),
             ([str(short), "--meta", str(short)], "holds more than tensors and plain data (or it is damaged)")]
    for args, fragment in cases:
        assert convert.main([*args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "out.json").exists()
