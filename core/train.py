"""Train a GPT from the command line.

    python -m core.train --preset layernorm --max-iters 2000 --out runs/layernorm
    python -m core.train --recipe fast --out runs/fast
    python -m core.train --out runs/layernorm --resume --max-iters 4000
    python -m core.train --preset full --out runs/layernorm --overwrite
    torchrun --standalone --nproc_per_node=2 -m core.train --preset layernorm --out runs/ddp

The engine is core.trainer.Trainer; this file only adds arguments, progress bars and saving.
A checkpoint is written at every evaluation, so an interrupted run loses little. An existing
checkpoint at --out is carried on with --resume or replaced with --overwrite, never silently;
a file there that is not a checkpoint is never replaced. Exit codes: 0 done, 2 bad input,
3 training diverged, 130 interrupted before training began.
Under torchrun every process trains (see core.distributed); only rank 0 evaluates, prints
and saves.
"""

import argparse
import os
import platform
import shlex
import sys
import time

import torch
from tqdm import tqdm

from . import distributed
from .budget import Budgets, check_config
from .checkpoint import CheckpointError, foreign_file, load_checkpoint, paths, resume_trainer, save_trainer
from .data import Corpus, DataError, load_shakespeare, text_from_bytes
from .model import PRESETS, GPTConfig
from .tokenizer import CharTokenizer, UnknownCharactersError
from .trainer import OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig, Trainer

SAVE_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_PRESET = "layernorm"
DIVERGED = 3  # the exit code of a run whose loss diverged
# Named recipes: options that go before the ones given, so that those win (--recipe fast --max-iters 600).
NANOGPT_SHAPE = ("--preset layernorm --n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --dropout 0 --no-bias "
                 "--activation gelu")
RECIPES = {
    # nanoGPT's shakespeare_char recipe for a CPU (its README's), on this trainer.
    "nanogpt": f"{NANOGPT_SHAPE} --batch-size 12 --max-iters 2000 --lr 1e-3 --min-lr 1e-4 --warmup-iters 100 "
               "--eval-interval 250 --eval-iters 20",
    # Val loss 1.88 on Tiny Shakespeare in the least wall time, on every CPU (benchmarks/README.md, goal 2).
    "fast": f"{NANOGPT_SHAPE} --batch-size 16 --max-iters 450 --lr 2e-3 --min-lr 2e-4 --warmup-iters 100 "
            "--schedule wsd --decay-frac 0.4 --eval-interval 450 --eval-iters 20 --optimizer muon --muon-lr 0.02",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="a named set of options, which the options given override: fast (val loss 1.88 on Tiny "
                        "Shakespeare soonest), nanogpt (nanoGPT's CPU recipe)")
    m = p.add_argument_group("model (a lecture stage preset, then any size you override; with --resume, the checkpoint's)")
    m.add_argument("--preset", choices=list(PRESETS), help=f"lecture stage (default: {DEFAULT_PRESET})")
    m.add_argument("--n-layer", type=int, help="number of transformer blocks")
    m.add_argument("--n-head", type=int, help="attention heads per block")
    m.add_argument("--n-embd", type=int, help="embedding size C (divisible by n_head)")
    m.add_argument("--block-size", type=int, help="context length T in characters")
    m.add_argument("--dropout", type=float, help="dropout probability in [0, 1)")
    m.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None, help="biases in Linear and LayerNorm")
    m.add_argument("--activation", choices=["relu", "gelu"], help="MLP nonlinearity")
    m.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="lm_head shares the token embedding matrix")
    m.add_argument("--mlp-ratio", type=int, help="the feed-forward layer's inner size in multiples of n_embd (default 4)")
    t = p.add_argument_group("training (with --resume, an option left out keeps the checkpoint's value)")
    defaults = TrainConfig()
    t.add_argument("--max-iters", type=int, default=None, help=f"optimizer steps in all (default: {defaults.max_iters})")
    t.add_argument("--batch-size", type=int, default=None,
                   help=f"sequences per micro-step in each process (default: {defaults.batch_size})")
    t.add_argument("--grad-accum-steps", type=int, default=None,
                   help=f"micro-steps per optimizer step (default: {defaults.grad_accum_steps})")
    t.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {defaults.learning_rate})")
    t.add_argument("--min-lr", type=float, default=None, help=f"learning rate at the end of the cosine decay (default: {defaults.min_lr})")
    t.add_argument("--warmup-iters", type=int, default=None, help=f"linear warmup steps (default: {defaults.warmup_iters})")
    t.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                   help=f"after the warmup: cosine decay, or wsd: hold the lr, then a linear decay over the last "
                        f"--decay-frac of the steps (default: {defaults.schedule})")
    t.add_argument("--decay-frac", type=float, default=None,
                   help=f"wsd: the share of the steps that decays (default: {defaults.decay_frac})")
    t.add_argument("--batch-ramp-iters", type=int, default=None,
                   help="grow the batch from a quarter of --batch-size to the whole over these first steps (default: 0, off)")
    t.add_argument("--seq-ramp-iters", type=int, default=None,
                   help="grow the sequences from a quarter of --block-size to the whole over these first steps "
                        "(default: 0, off)")
    t.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None,
                   help=f"muon: Muon for the blocks' weight matrices, AdamW for the rest (default: {defaults.optimizer})")
    t.add_argument("--muon-lr", type=float, default=None, help=f"Muon's peak learning rate (default: {defaults.muon_lr})")
    t.add_argument("--muon-ns-steps", type=int, default=None,
                   help=f"Newton-Schulz iterations of each Muon update (default: {defaults.muon_ns_steps})")
    t.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay (default: {defaults.weight_decay})")
    t.add_argument("--grad-clip", type=float, default=None,
                   help=f"clip the gradient norm to this; 0 is off (default: {defaults.grad_clip})")
    t.add_argument("--eval-interval", type=int, default=None,
                   help=f"steps between loss estimates and saves (default: {defaults.eval_interval})")
    t.add_argument("--eval-iters", type=int, default=None, help=f"batches per loss estimate (default: {defaults.eval_iters})")
    t.add_argument("--seed", type=int, default=None, help=f"seed for weights, batches and dropout (default: {defaults.seed})")
    # torchrun's processes on one machine share its cores.
    threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    t.add_argument("--threads", type=int, default=threads,
                   help="torch CPU threads (default: the cores, shared among torchrun's processes: %(default)s)")
    t.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where to train (default: %(default)s)")
    t.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bfloat16: matmuls in bfloat16, weights in float32; auto: bfloat16 on a GPU or a CPU "
                        f"with bfloat16 instructions (default: {defaults.precision})")
    io = p.add_argument_group("data and output")
    io.add_argument("--data", help="a UTF-8 text file (default: Tiny Shakespeare, from $GPT_EXPLORER_DATA, data/ or downloaded)")
    io.add_argument("--out", default=None, help="checkpoint name, written as OUT.safetensors + OUT.json (default: runs/PRESET)")
    io.add_argument("--resume", action="store_true", help="carry on from the checkpoint at --out (needs its .state.safetensors)")
    io.add_argument("--overwrite", action="store_true", help="replace the checkpoint at --out with a new run")
    io.add_argument("--save-dtype", choices=list(SAVE_DTYPES), default="float32",
                    help="precision of the saved weights (default: %(default)s)")
    io.add_argument("--keep-best", action="store_true",
                    help="save only when the val loss improves (small corpora overfit late in a run)")
    io.add_argument("--no-state", action="store_true", help="do not save the optimizer state (smaller, but cannot resume)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options given, after those of the --recipe they name."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.recipe:
        args = parser.parse_args([*shlex.split(RECIPES[args.recipe]), *argv])
    return args


SHAPE_OPTIONS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "activation", "tie_weights",
                 "mlp_ratio")
STAGE_SWITCHES = ("attention", "feed_forward", "residual", "layer_norm")  # what makes a preset that stage


def model_config(args, vocab_size: int) -> GPTConfig:
    overrides = {name: getattr(args, name) for name in SHAPE_OPTIONS if getattr(args, name) is not None}
    return GPTConfig.from_preset(args.preset or DEFAULT_PRESET, vocab_size=vocab_size, **overrides)


def check_same_model(args, config: GPTConfig) -> None:
    """A resumed run keeps its checkpoint's model: a model option that says otherwise is refused,
    not ignored."""
    for name in SHAPE_OPTIONS:
        given = getattr(args, name)
        if given is not None and given != getattr(config, name):
            raise ValueError(f"--{name.replace('_', '-')} {given} differs from the checkpoint's {name} "
                             f"{getattr(config, name)}: a resumed run keeps its model (leave the option out, "
                             "or start a new run at another --out)")
    if args.preset:
        stage = GPTConfig.from_preset(args.preset, vocab_size=config.vocab_size)
        differ = [name for name in STAGE_SWITCHES if getattr(stage, name) != getattr(config, name)]
        if differ:
            raise ValueError(f"--preset {args.preset} differs from the checkpoint's model ({differ[0]}="
                             f"{getattr(config, differ[0])}): a resumed run keeps its model")


def check_out(args) -> None:
    """A new run replaces an earlier checkpoint at --out only when asked, and a file that is no
    checkpoint never."""
    foreign = foreign_file(args.out)
    if foreign is not None:
        raise CheckpointError(f"{foreign} exists and is not a GPT Explorer checkpoint: choose another --out")
    existing = next((p for p in paths(args.out) if p.exists()), None)
    if existing is not None and not args.overwrite:
        raise CheckpointError(f"a checkpoint is already at {args.out} ({existing.name}): pass --resume to carry on "
                              "from it, or --overwrite to replace it")


# Training options and the TrainConfig fields they set (threads and device belong to the machine).
TRAIN_OPTIONS = {"batch_size": "batch_size", "grad_accum_steps": "grad_accum_steps", "max_iters": "max_iters",
                 "lr": "learning_rate", "min_lr": "min_lr", "warmup_iters": "warmup_iters", "schedule": "schedule",
                 "decay_frac": "decay_frac", "batch_ramp_iters": "batch_ramp_iters", "seq_ramp_iters": "seq_ramp_iters",
                 "weight_decay": "weight_decay", "grad_clip": "grad_clip", "eval_interval": "eval_interval",
                 "eval_iters": "eval_iters", "seed": "seed", "precision": "precision",
                 "optimizer": "optimizer", "muon_lr": "muon_lr", "muon_ns_steps": "muon_ns_steps"}


def train_config(args, base: TrainConfig) -> TrainConfig:
    """base (the defaults, or a resumed run's settings) with the options given on the command line."""
    given = {name: getattr(args, option) for option, name in TRAIN_OPTIONS.items() if getattr(args, option) is not None}
    config = TrainConfig(**{**base.to_dict(), **given, "threads": args.threads, "device": args.device})
    if not -2**63 <= config.seed < 2**63:  # what a torch.Generator takes
        raise ValueError(f"seed must be a whole number from -2**63 to 2**63 - 1, got {config.seed}")
    return config


def read_text(path: str | None) -> str:
    if path is None:
        bar = None

        def progress(done, total):
            nonlocal bar
            bar = bar or tqdm(total=total, unit="B", unit_scale=True, desc="downloading Tiny Shakespeare", file=sys.stderr)
            bar.update(done - bar.n)

        return load_shakespeare(progress=progress)
    with open(path, "rb") as f:
        return text_from_bytes(f.read(), max_bytes=1 << 40)  # the command line trusts its user with size


def make_trainer(args) -> Trainer:
    if args.resume:
        saved = load_checkpoint(args.out)
        check_same_model(args, saved.model.config)
        args.preset = args.preset or str(saved.extra.get("preset", "resumed"))
        corpus = Corpus(read_text(args.data), saved.model.config.block_size, saved.tokenizer)
        return resume_trainer(args.out, corpus, train_config(args, saved.train_config or TrainConfig()))
    text = read_text(args.data)
    tokenizer = CharTokenizer.from_text(text)
    args.preset = args.preset or DEFAULT_PRESET
    config = model_config(args, tokenizer.vocab_size)
    check_config(config)  # the budgets a checkpoint must fit to be opened (core.budget)
    return Trainer(config, train_config(args, TrainConfig()), Corpus(text, config.block_size, tokenizer))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    launcher = ["python"]
    if "LOCAL_WORLD_SIZE" in os.environ:  # started by torchrun
        launcher = ["torchrun", f"--nnodes={os.environ.get('GROUP_WORLD_SIZE', 1)}",
                    f"--nproc-per-node={os.environ['LOCAL_WORLD_SIZE']}"]
    args.command = shlex.join([*launcher, "-m", "core.train", *argv])
    with distributed.process_group(args.device):  # does nothing unless torchrun started us
        return run(args)


def machine(device: torch.device) -> str:
    """The hardware a run trained on, in words, for the checkpoint's record."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def run(args) -> int:
    # NAME, whichever of NAME, NAME.json or NAME.safetensors was given (never NAME.json.json).
    args.out = str(paths(args.out or os.path.join("runs", args.recipe or args.preset or DEFAULT_PRESET))[1])[:-len(".json")]
    for note in Budgets.from_env().notes:
        print(f"note: setting ignored: {note}", file=sys.stderr)
    try:
        if not args.resume:
            check_out(args)
        trainer = make_trainer(args)
    except (ValueError, DataError, UnknownCharactersError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training began; nothing was saved", file=sys.stderr)
        return 130
    cfg, tcfg = trainer.config, trainer.train_config
    main_process = trainer.rank == 0  # under torchrun the others train in silence
    processes = f" x {trainer.world_size} processes" if trainer.world_size > 1 else ""
    if main_process:
        print(f"model: {trainer.model.num_params():,} parameters ({args.preset}: {cfg.n_layer} layers, "
              f"{cfg.n_head} heads, {cfg.n_embd} dims, block {cfg.block_size}) on {trainer.device}{processes}",
              file=sys.stderr)
    t0 = time.perf_counter()
    written = []

    def save():
        # The JSON keeps how the checkpoint was made: pretrained/README.md is built from it.
        extra = dict(preset=args.preset, command=args.command, machine=machine(trainer.device),
                     wall_seconds=round(time.perf_counter() - t0, 1))
        save_trainer(args.out, trainer, with_state=not args.no_state, dtype=SAVE_DTYPES[args.save_dtype], extra=extra)
        written[:] = paths(args.out)[:2 if args.no_state else 3]
    bar = tqdm(total=tcfg.max_iters, initial=trainer.record.iters, desc="training", unit="it", file=sys.stderr,
               disable=not main_process)

    def on_step(rows):
        bar.update(len(rows))
        if rows:
            bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", tok_s=f"{rows[-1]['tokens_per_s']:.0f}")

    best = float("inf")

    def on_eval(losses):
        nonlocal best
        bar.write(f"step {trainer.record.iters}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if trainer.record.iters > 0 and not trainer.diverged and not (args.keep_best and losses["val"] >= best):
            save()
        best = min(best, losses["val"])

    try:
        trainer.train(on_step=on_step, on_eval=on_eval)
    except KeyboardInterrupt:
        trainer.stop_reason = "interrupted"
        if main_process and not args.keep_best:
            save()
    except CheckpointError as e:  # --out cannot be written: found at the first save
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    if not main_process:
        return DIVERGED if trainer.diverged else 0
    saved = f"wrote {', '.join(map(str, written))}" if written else "nothing was saved"
    if trainer.diverged:  # the last checkpoint written, if any, is from before the loss ran away
        print(f"error: {trainer.stop_reason} {saved[0].upper()}{saved[1:]}.", file=sys.stderr)
        return DIVERGED
    rec = trainer.record
    losses = f"val loss {rec.val_loss:.4f}, train loss {rec.train_loss:.4f}" if rec.val_loss is not None else "no loss estimate"
    print(f"{trainer.stop_reason}. {losses}, {wall:.1f} s, {rec.tokens / max(rec.seconds, 1e-9):,.0f} "
          f"tokens/s in training steps; {saved}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
