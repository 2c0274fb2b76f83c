"""The command lines: `python -m core.train` and `python -m core.sample`, end to end on a tiny run,
and bad input answered with exit code 2 and one line "error: ..." (never a traceback)."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import sample, train
from core.trainer import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--eval-iters", "2",
        "--batch-size", "4", "--threads", "1"]


def python_m(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, encoding="utf-8", timeout=300)


def assert_one_line_error(stderr: str, *fragments: str):
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in last, last


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "play.txt"
    lines = ["First Citizen:", "Before we proceed any further, hear me speak.", "", "All:", "Speak, speak.", ""]
    path.write_text("\n".join(lines * 12), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file):
    """One tiny run of `python -m core.train`: (checkpoint name, the finished process)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    done = python_m("core.train", "--data", text_file, "--out", out, *TINY, "--max-iters", 20,
                    "--eval-interval", 10, "--lr", 3e-3, "--warmup-iters", 2)
    return out, done


def meta(out: Path) -> dict:
    return json.loads(Path(f"{out}.json").read_text(encoding="utf-8"))


def test_train_end_to_end(trained, text_file):
    out, done = trained
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    for suffix in (".json", ".safetensors", ".state.safetensors"):
        assert Path(f"{out}{suffix}").is_file()
    m = meta(out)
    assert m["record"]["iters"] == 20 and m["record"]["val_loss"] is not None
    assert m["model_config"]["n_embd"] == 16 and m["model_config"]["block_size"] == 16
    assert m["train_config"]["max_iters"] == 20 and m["train_config"]["learning_rate"] == 3e-3
    assert m["vocab"] == sorted(set(text_file.read_text(encoding="utf-8")))
    evals = [line.split(":")[0] for line in done.stdout.splitlines()]  # losses on stdout, progress on stderr
    assert evals == ["step 0", "step 10", "step 20"]
    assert "reached max_iters (20)" in done.stderr


def test_sample_prints_the_prompt_and_is_repeatable(trained, capsys):
    out, _ = trained
    args = ["--ckpt", out, "--prompt", "All:", "--max-new-tokens", 40, "--seed", 0]
    done = python_m("core.sample", *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("All:") and done.stdout.endswith("\n")
    generated = done.stdout[len("All:"):-1]
    assert len(generated) == 40 and set(generated) <= set(meta(out)["vocab"])

    assert sample.main([str(a) for a in args]) == 0  # the same seed in another process: the same text
    assert capsys.readouterr().out == done.stdout
    assert sample.main([str(a) for a in args[:-1]] + ["1"]) == 0
    assert capsys.readouterr().out != done.stdout


def test_resume_continues_with_the_saved_settings(trained, text_file, tmp_path):
    out, _ = trained
    copy = tmp_path / "tiny"
    for suffix in (".json", ".safetensors", ".state.safetensors"):
        shutil.copy(f"{out}{suffix}", f"{copy}{suffix}")
    done = python_m("core.train", "--data", text_file, "--out", copy, "--resume", "--max-iters", 30, "--threads", 1)
    assert done.returncode == 0, done.stderr
    assert "reached max_iters (30)" in done.stderr
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == ["step 30"]
    m = meta(copy)
    assert m["record"]["iters"] == 30
    assert m["record"]["tokens"] == 30 * 4 * 16
    # Options not given again keep the first run's values, not the command line's defaults.
    assert m["train_config"]["max_iters"] == 30
    assert (m["train_config"]["learning_rate"], m["train_config"]["batch_size"]) == (3e-3, 4)
    assert m["train_config"]["eval_interval"] == 10
    assert m["model_config"] == meta(out)["model_config"]


# Bad input ---------------------------------------------------------------------------------


def test_train_with_indivisible_heads_in_a_real_process(text_file, tmp_path):
    done = python_m("core.train", "--data", text_file, "--out", tmp_path / "x", *TINY, "--n-embd", 30, "--n-head", 4)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0  # one line, nothing before it
    assert_one_line_error(done.stderr, "n_embd (30) must be divisible by n_head (4)")
    assert not list(tmp_path.iterdir())


def test_sample_with_a_corrupt_checkpoint_in_a_real_process(trained, tmp_path):
    out, _ = trained
    shutil.copy(f"{out}.json", tmp_path / "bad.json")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 100)
    done = python_m("core.sample", "--ckpt", tmp_path / "bad")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0
    assert_one_line_error(done.stderr, "bad.safetensors is not a readable safetensors file")


def train_main(*args) -> subprocess.CompletedProcess:
    """What python_m("core.train", *args) returns, run in this process: a new one costs seconds of
    imports. torch's thread count, which --threads sets, is given back after."""
    threads, err = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = train.main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["core.train", *map(str, args)], code, "", err.getvalue())


def test_train_bad_input(text_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abc" * 10, encoding="utf-8")
    cases = [
        (["--data", tmp_path / "missing.txt"], ["No such file", "missing.txt"]),
        (["--data", short], ["needs at least"]),
        (["--data", text_file, "--lr", -1], ["learning_rate must be a positive number"]),
        (["--data", text_file, "--max-iters", 0], ["max_iters must be a positive integer"]),
        (["--data", text_file, "--dropout", 1.5], ["dropout must be in [0, 1)"]),
        (["--data", text_file, "--resume"], ["missing x.json"]),
    ]
    for args, fragments in cases:
        done = train_main(*args, "--out", tmp_path / "x", *TINY)
        assert done.returncode == 2, args
        assert done.stderr.strip().count("\n") == 0, done.stderr
        assert_one_line_error(done.stderr, *fragments)


def test_train_resume_from_a_corrupt_checkpoint(trained, text_file, tmp_path):
    out, _ = trained
    for suffix in (".json", ".safetensors", ".state.safetensors"):
        shutil.copy(f"{out}{suffix}", tmp_path / f"tiny{suffix}")
    data = (tmp_path / "tiny.safetensors").read_bytes()
    (tmp_path / "tiny.safetensors").write_bytes(data[: len(data) // 3])
    done = train_main("--data", text_file, "--out", tmp_path / "tiny", "--resume", "--threads", 1)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "not a readable safetensors file")


def test_train_output_that_cannot_be_written(text_file, tmp_path):
    (tmp_path / "a_file").write_text("x")
    done = train_main("--data", text_file, "--out", tmp_path / "a_file" / "run", *TINY, "--max-iters", 4,
                      "--eval-interval", 2)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "could not save the checkpoint")


def test_train_that_diverges_exits_with_3(text_file, tmp_path):
    done = train_main("--data", text_file, "--out", tmp_path / "run", *TINY, "--lr", 1e6, "--min-lr", 0, "--grad-clip", 0,
                      "--warmup-iters", 0, "--max-iters", 50, "--eval-interval", 10)
    assert done.returncode == 3
    assert_one_line_error(done.stderr, "training diverged", "lower learning rate")


def test_sample_bad_input(capsys, trained, tmp_path):
    out, _ = trained
    cases = [
        (["--ckpt", out, "--prompt", "€uro"], ["'€'", "--unknown drop"]),
        (["--ckpt", tmp_path / "nothing"], ["missing nothing.json"]),
        (["--ckpt", out, "--prompt", "€", "--unknown", "drop"], ["prompt is empty"]),
    ]
    for args, fragments in cases:
        assert sample.main([str(a) for a in args]) == 2, args
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.strip().count("\n") == 0, captured.err
        assert_one_line_error(captured.err, *fragments)


def test_sample_settings_refused_after_the_prompt_end_the_line(capsys, trained):
    out, _ = trained
    assert sample.main(["--ckpt", str(out), "--prompt", "All:", "--temperature", "-1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "All:\n"  # the half-written line is ended on stdout, not on stderr
    assert captured.err.strip().count("\n") == 0
    assert_one_line_error(captured.err, "temperature must be >= 0")


def test_unknown_characters_can_be_dropped_or_replaced(capsys, trained):
    out, _ = trained
    for how in ("drop", "replace"):
        args = ["--ckpt", str(out), "--prompt", "All:€", "--unknown", how, "--max-new-tokens", "5"]
        assert sample.main(args) == 0
        printed = capsys.readouterr().out
        assert printed.startswith("All:€") and len(printed) == len("All:€") + 5 + 1


@pytest.mark.parametrize("module, words", [(train, ["--max-iters", "--resume", "--data"]),
                                           (sample, ["--ckpt", "--prompt", "--seed"])])
def test_help(capsys, module, words):
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: python -m core.")
    assert all(word in usage for word in words)


def test_missing_required_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        sample.main([])
    assert exit_.value.code == 2
    assert "--ckpt" in capsys.readouterr().err


def test_precision_option_reaches_the_train_config():
    parse = train.build_parser().parse_args
    assert train.train_config(parse([]), TrainConfig()).precision == TrainConfig().precision
    assert train.train_config(parse(["--precision", "float32"]), TrainConfig()).precision == "float32"


def test_a_recipe_sets_its_options_and_the_options_given_win():
    fast = train.parse_args(["--recipe", "fast"])
    assert (fast.n_layer, fast.n_embd, fast.block_size, fast.optimizer, fast.max_iters) == (4, 128, 64, "muon", 450)
    assert fast.schedule == "wsd" and fast.bias is False and fast.activation == "gelu"
    for argv in (["--recipe", "fast", "--max-iters", "600"], ["--max-iters", "600", "--recipe", "fast"]):
        args = train.parse_args(argv)
        assert args.max_iters == 600 and args.optimizer == "muon"  # wherever it stands, a given option wins
    nanogpt = train.train_config(train.parse_args(["--recipe", "nanogpt"]), TrainConfig())
    assert (nanogpt.batch_size, nanogpt.max_iters, nanogpt.learning_rate, nanogpt.optimizer) == (12, 2000, 1e-3, "adamw")
    assert train.parse_args([]).optimizer is None  # no recipe: the defaults


def test_train_with_a_recipe_in_a_real_process(text_file, tmp_path):
    out = tmp_path / "fast"
    done = python_m("core.train", "--recipe", "fast", "--data", text_file, "--out", out, "--max-iters", 6,
                    "--eval-interval", 3, "--eval-iters", 1, "--threads", 1)
    assert done.returncode == 0, done.stderr
    m = meta(out)
    assert m["model_config"]["n_embd"] == 128 and m["model_config"]["n_layer"] == 4
    assert (m["train_config"]["optimizer"], m["train_config"]["max_iters"]) == ("muon", 6)
    assert m["extra"]["command"].startswith("python -m core.train --recipe fast")
