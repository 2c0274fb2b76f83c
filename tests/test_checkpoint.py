"""Checkpoints: exact round trips, every corrupt file refused with a clear message, atomic saves,
and a resumed run that matches an uninterrupted one."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from core import CharTokenizer
from core.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    load_checkpoint_bytes,
    load_state,
    paths,
    resume_trainer,
    save_checkpoint,
    save_trainer,
)
from core.data import Corpus
from core.trainer import Record, TrainConfig, Trainer
from helpers import tiny_config, tiny_model

VOCAB = CharTokenizer(list("abcdefghijklmnopqrst"))  # 20 characters: tiny_config's vocab_size


def tokens(model, seed: int = 0) -> torch.Tensor:
    cfg = model.config
    return torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(seed))


def logits(model, idx) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(idx)[0]


@pytest.fixture
def saved(tmp_path):
    """A tiny model saved as tmp_path/ckpt; returns (model, path)."""
    model = tiny_model("layernorm")
    save_checkpoint(tmp_path / "ckpt", model, VOCAB, TrainConfig(max_iters=7), Record(iters=3, tokens=96))
    return model, tmp_path / "ckpt"


def meta(path) -> dict:
    return json.loads(paths(path)[1].read_text(encoding="utf-8"))


def write_meta(path, data) -> None:
    paths(path)[1].write_text(json.dumps(data), encoding="utf-8")


# Round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, overrides", [
    ("layernorm", {}),
    ("layernorm", dict(tie_weights=True)),
    ("full", dict(bias=False, activation="gelu", tie_weights=True)),
    ("full", dict(mlp_ratio=2)),
    ("bigram", {}),
    ("ffn", {}),
])
def test_round_trip_gives_identical_logits(tmp_path, preset, overrides):
    model = tiny_model(preset, **overrides)
    save_checkpoint(tmp_path / "m", model, VOCAB)
    ckpt = load_checkpoint(tmp_path / "m")
    idx = tokens(model)
    assert torch.equal(logits(ckpt.model, idx), logits(model, idx))
    assert ckpt.model.config == model.config and ckpt.tokenizer.itos == VOCAB.itos
    assert not ckpt.model.training
    if overrides.get("tie_weights"):
        assert ckpt.model.lm_head.weight is ckpt.model.token_embedding_table.weight  # still one matrix
        assert "lm_head.weight" not in load_file(tmp_path / "m.safetensors")  # saved once


def test_float16_weights_are_smaller_and_close(tmp_path):
    model = tiny_model("layernorm")
    save_checkpoint(tmp_path / "f32", model, VOCAB)
    save_checkpoint(tmp_path / "f16", model, VOCAB, dtype=torch.float16)
    assert {t.dtype for t in load_file(tmp_path / "f16.safetensors").values()} == {torch.float16}
    assert (tmp_path / "f16.safetensors").stat().st_size < 0.6 * (tmp_path / "f32.safetensors").stat().st_size
    loaded = load_checkpoint(tmp_path / "f16").model
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    idx = tokens(model)
    torch.testing.assert_close(logits(loaded, idx), logits(model, idx), atol=2e-3, rtol=1e-2)


def test_json_holds_config_vocab_train_config_and_record(saved):
    model, path = saved
    m = meta(path)
    assert m["format"] == FORMAT and m["format_version"] == FORMAT_VERSION
    assert m["model_config"] == model.config.to_dict()
    assert m["vocab"] == VOCAB.itos
    assert m["train_config"] == TrainConfig(max_iters=7).to_dict()
    assert m["record"] == dict(iters=3, tokens=96, seconds=0.0, train_loss=None, val_loss=None)
    ckpt = load_checkpoint(path)
    assert ckpt.train_config == TrainConfig(max_iters=7) and ckpt.record == Record(iters=3, tokens=96)
    assert ckpt.name == "ckpt"


@pytest.mark.parametrize("name", ["ckpt", "ckpt.json", "ckpt.safetensors"])
def test_any_of_the_names_loads(saved, name):
    model, path = saved
    idx = tokens(model)
    assert torch.equal(logits(load_checkpoint(path.parent / name).model, idx), logits(model, idx))


def test_names_with_dots_keep_them(tmp_path):
    save_checkpoint(tmp_path / "lr-0.5", tiny_model(), VOCAB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr-0.5.json", "lr-0.5.safetensors"]
    assert load_checkpoint(tmp_path / "lr-0.5.json").name == "lr-0.5"


# Corrupt checkpoints -----------------------------------------------------------------------


class Payload:
    """A pickle that creates a file when it is unpickled: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_the_pickle_payload_is_live(tmp_path):
    pickle.loads(pickle.dumps(Payload(tmp_path / "ran")))  # the control: unpickling it does run code
    assert (tmp_path / "ran").exists()


def weights_file(path) -> Path:
    return paths(path)[0]


def truncate(path):
    data = weights_file(path).read_bytes()
    weights_file(path).write_bytes(data[: len(data) // 2])


def rewrite_tensors(path, change):
    tensors = load_file(weights_file(path))
    change(tensors)
    save_file(tensors, weights_file(path))


def edit_meta(change):
    def edit(path):
        m = meta(path)
        change(m)
        write_meta(path, m)
    return edit


CORRUPTIONS = {
    "missing json": (lambda p: paths(p)[1].unlink(), r"missing ckpt\.json"),
    "missing weights": (lambda p: weights_file(p).unlink(), r"missing ckpt\.safetensors"),
    "truncated weights": (truncate, "not a readable safetensors file"),
    "zero-byte weights": (lambda p: weights_file(p).write_bytes(b""), "not a readable safetensors file"),
    "random bytes": (lambda p: weights_file(p).write_bytes(os.urandom(4096)), "not a readable safetensors file"),
    "json not json": (lambda p: paths(p)[1].write_text("{not json", encoding="utf-8"), "not valid JSON"),
    "json not utf-8": (lambda p: paths(p)[1].write_bytes(b"\xff\xfe{}"), "not valid JSON"),
    "json of something else": (lambda p: write_meta(p, {"weights": "elsewhere"}), "not a GPT Explorer checkpoint"),
    "json a list": (lambda p: write_meta(p, [1, 2]), "not a GPT Explorer checkpoint"),
    "newer format": (edit_meta(lambda m: m.update(format_version=99)), "format version 99 is not supported"),
    "no model config": (edit_meta(lambda m: m.pop("model_config")), "no model_config"),
    "vocab not characters": (edit_meta(lambda m: m.update(vocab=[1, 2])), "vocab is not a list of single characters"),
    "vocab of strings": (edit_meta(lambda m: m["vocab"].__setitem__(0, "ab")), "vocab is not a list of single"),
    "vocab repeats": (edit_meta(lambda m: m["vocab"].__setitem__(0, "b")), "lists a character twice"),
    "vocab size differs": (edit_meta(lambda m: m["vocab"].pop()), r"19 characters but the model config says vocab_size=20"),
    "n_embd disagrees": (edit_meta(lambda m: m["model_config"].update(n_embd=32)), r"has shape \(.*\) but the config needs"),
    "impossible config": (edit_meta(lambda m: m["model_config"].update(n_embd=15)), "impossible model.*divisible by n_head"),
    "unknown setting": (edit_meta(lambda m: m["model_config"].update(flux=1)), r"unknown model settings: \['flux'\]"),
    "train config not a dict": (edit_meta(lambda m: m.update(train_config=[1])), "impossible model"),
    "record not a dict": (edit_meta(lambda m: m.update(record=[1])), "impossible model"),
    "nan weights": (lambda p: rewrite_tensors(p, lambda t: t["ln_f.weight"].__setitem__(0, float("nan"))),
                    r"ln_f\.weight holds NaN or infinite values"),
    "missing tensor": (lambda p: rewrite_tensors(p, lambda t: t.pop("blocks.1.ffwd.fc.weight")),
                       r"missing \['blocks\.1\.ffwd\.fc\.weight'\]"),
    "extra tensor": (lambda p: rewrite_tensors(p, lambda t: t.update(spare=torch.zeros(2))), r"unexpected \['spare'\]"),
    "integer weights": (lambda p: rewrite_tensors(p, lambda t: t.update({"ln_f.bias": torch.zeros(16, dtype=torch.int32)})),
                        "not floating-point"),
    "header claims a huge tensor": (lambda p: weights_file(p).write_bytes(safetensors_header(
        {"ln_f.weight": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4]}}) + bytes(4)),
        "not a readable safetensors file"),
    "json nested too deep": (lambda p: paths(p)[1].write_text("[" * 100_000 + "]" * 100_000), "not valid JSON"),
    "vocab with a lone surrogate": (edit_meta(lambda m: m["vocab"].__setitem__(0, "\ud800")),
                                    r"vocab holds '\\ud800', which is not a character"),
    "record of the wrong type": (edit_meta(lambda m: m["record"].update(iters="many")),
                                 "record.iters must be a non-negative number"),
    "notes not a mapping": (edit_meta(lambda m: m.update(extra=["x"])), "extra notes are not a mapping"),
    "a million layers": (edit_meta(lambda m: m["model_config"].update(n_layer=1_000_000)),
                         r"the model has 1,000,000 layers; this server allows at most 48 \(GPT_EXPLORER_MAX_LAYERS\)"),
    "a 100,000-character context": (edit_meta(lambda m: m["model_config"].update(block_size=100_000)),
                                    r"causal masks for block_size 100,000: 20\.0 GB\); this server allows 256 MB"),
}


def safetensors_header(header: dict) -> bytes:
    """The start of a safetensors file: the header's length (8 bytes, little-endian), then it."""
    data = json.dumps(header).encode()
    return len(data).to_bytes(8, "little") + data


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_refused_clearly(saved, case):
    corrupt, message = CORRUPTIONS[case]
    _, path = saved
    corrupt(path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_pickle_renamed_to_safetensors_is_refused_not_run(saved, tmp_path, how):
    _, path = saved
    marker = tmp_path / "code_ran"
    with open(weights_file(path), "wb") as f:
        if how == "pickle":
            pickle.dump({"ln_f.weight": Payload(marker)}, f)
        else:
            torch.save({"ln_f.weight": Payload(marker)}, f)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint_bytes(weights_file(path).read_bytes(), paths(path)[1].read_bytes())
    assert not marker.exists()


def test_load_from_bytes(saved):
    model, path = saved
    weights, meta_bytes = weights_file(path).read_bytes(), paths(path)[1].read_bytes()
    ckpt = load_checkpoint_bytes(weights, meta_bytes, name="upload")
    idx = tokens(model)
    assert torch.equal(logits(ckpt.model, idx), logits(model, idx)) and ckpt.name == "upload"
    for bad_weights, bad_meta, message in [
        (weights[: len(weights) // 2], meta_bytes, "not a readable safetensors file"),
        (b"", meta_bytes, "not a readable safetensors file"),
        (weights, b"[]", "not a GPT Explorer checkpoint"),
        (weights, meta_bytes.replace(b'"n_embd": 16', b'"n_embd": 15'), "impossible model"),
        (save({"x": torch.zeros(1)}), meta_bytes, "do not match the model config"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint_bytes(bad_weights, bad_meta)


# Saving safely -----------------------------------------------------------------------------


def assert_only_checkpoint_files(folder: Path, *names: str):
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temporary files left


def test_a_failed_rename_leaves_the_previous_checkpoint(saved, monkeypatch):
    old, path = saved
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}

    def fail(src, dst):
        assert Path(src).exists()  # the temporary file was written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(CheckpointError, match="could not save the checkpoint.*No space left"):
        save_checkpoint(path, tiny_model(seed=1), VOCAB)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before
    idx = tokens(old)
    assert torch.equal(logits(load_checkpoint(path).model, idx), logits(old, idx))


def test_a_failure_while_writing_any_file_leaves_the_previous_checkpoint(saved, monkeypatch):
    """The disk fills up while the JSON is written, after the weights were: nothing is replaced."""
    old, path = saved
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the second file written: the JSON
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(path, tiny_model(seed=1), VOCAB)
    monkeypatch.undo()
    assert_only_checkpoint_files(path.parent, "ckpt.json", "ckpt.safetensors")
    idx = tokens(old)
    assert torch.equal(logits(load_checkpoint(path).model, idx), logits(old, idx))  # the old weights, not the new


def test_saving_where_no_folder_can_be_made(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="could not save the checkpoint"):
        save_checkpoint(tmp_path / "a_file" / "sub" / "ckpt", tiny_model(), VOCAB)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write to a read-only folder")
def test_saving_into_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="could not save the checkpoint.*ermission"):
            save_checkpoint(folder / "ckpt", tiny_model(), VOCAB)
    finally:
        folder.chmod(0o755)


def test_saved_files_are_readable_by_others(saved):
    _, path = saved
    for p in paths(path)[:2]:
        assert p.stat().st_mode & 0o044 == 0o044


# Resuming ----------------------------------------------------------------------------------


@pytest.fixture
def corpus(tiny_text) -> Corpus:
    return Corpus(tiny_text, block_size=tiny_config().block_size)


def trainer_for(corpus, **train) -> Trainer:
    config = tiny_config(vocab_size=corpus.tokenizer.vocab_size, dropout=0.1)
    settings = dict(batch_size=8, max_iters=20, learning_rate=3e-3, warmup_iters=4, eval_interval=5, eval_iters=2)
    return Trainer(config, TrainConfig(**{**settings, **train}), corpus)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_equals_an_uninterrupted_run(tmp_path, corpus, optimizer):
    N = 8
    straight = trainer_for(corpus, optimizer=optimizer)
    rows = straight.run(2 * N)

    first = trainer_for(corpus, optimizer=optimizer)
    first.run(N)
    save_trainer(tmp_path / "half", first)
    torch.rand(1000)  # the global generator moves on in between: it must not matter
    resumed = resume_trainer(tmp_path / "half", corpus)
    more = resumed.run(N)

    assert [r["loss"] for r in more] == pytest.approx([r["loss"] for r in rows[N:]], abs=1e-6)
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert (p - q).abs().max().item() <= 1e-6, name
    assert resumed.record.iters == 2 * N and resumed.record.tokens == straight.record.tokens
    assert resumed.train_config == straight.train_config


def test_resume_with_evaluations_in_between(tmp_path, corpus):
    """train() evaluates and saves every eval_interval steps; a resume from any save carries on exactly."""
    straight = trainer_for(corpus, max_iters=15)
    straight.train()
    first = trainer_for(corpus, max_iters=15)

    def save_at_10(losses):
        if first.record.iters == 10:
            save_trainer(tmp_path / "at10", first)

    first.train(on_eval=save_at_10)
    resumed = resume_trainer(tmp_path / "at10", corpus)
    assert resumed.record.iters == 10
    resumed.train()
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert (p - q).abs().max().item() <= 1e-6
    assert resumed.record.val_loss == pytest.approx(straight.record.val_loss, abs=1e-6)


def test_resume_needs_the_state(tmp_path, corpus):
    trainer = trainer_for(corpus)
    trainer.run(2)
    save_trainer(tmp_path / "run", trainer)
    assert load_state(tmp_path / "run") is not None
    save_trainer(tmp_path / "run", trainer, with_state=False)  # a stale state must not outlive its weights
    assert load_state(tmp_path / "run") is None
    with pytest.raises(CheckpointError, match="without the optimizer state"):
        resume_trainer(tmp_path / "run", corpus)


def test_resume_refuses_another_vocabulary(tmp_path, corpus):
    trainer = trainer_for(corpus)
    save_trainer(tmp_path / "run", trainer)
    other = Corpus("".join(reversed(corpus.text)) + "~" * 10, block_size=corpus.block_size)
    with pytest.raises(CheckpointError, match="vocabulary differs"):
        resume_trainer(tmp_path / "run", other)


def test_corrupt_state_is_refused(tmp_path, corpus):
    trainer = trainer_for(corpus)
    trainer.run(1)
    save_trainer(tmp_path / "run", trainer)
    paths(tmp_path / "run")[2].write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not readable"):
        resume_trainer(tmp_path / "run", corpus)
