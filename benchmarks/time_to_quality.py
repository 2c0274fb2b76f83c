"""Goal 2: time to a val loss of 1.88 on Tiny Shakespeare at nanoGPT's CPU shape (4 layers,
4 heads, 128 dims, block 64). nanoGPT's recipe run by its own loop (2000 iterations of batch
12, evaluating every 250) against the project's trainer with its own recipe (`--recipe fast`),
one after the other in one process, in `--rounds` pairs (in alternating order). Both runs are
timed whole, evaluations included; afterwards (untimed) both models are judged on the same
loss: every 64-character window of the validation split.
Then nanoGPT's recipe on the project's trainer in float32 and in bfloat16: the same loss?

    python -m benchmarks.time_to_quality [--quick] [--rounds N] [--no-check]
"""

import argparse
import statistics
import sys
import time

import torch

from benchmarks import common
from benchmarks.reference import NanoGPT, NanoRecipe, RefConfig, nanogpt_train
from core.data import Corpus
from core.train import RECIPES, model_config, parse_args, train_config
from core.trainer import TrainConfig, Trainer, fast_bf16

TARGET_LOSS = 1.88
TARGET_TIME = 0.5  # at most this fraction of the reference's wall time
# nanoGPT's recipe and the project's (`python -m core.train --recipe fast`), as command-line options.
NANOGPT_RECIPE, RECIPE = RECIPES["nanogpt"], RECIPES["fast"]


@torch.no_grad()
def val_loss(model, corpus: Corpus, block: int = 64, batch: int = 256) -> float:
    """Mean loss over every non-overlapping window of the validation split (float32)."""
    data = corpus.splits["val"]
    n = (len(data) - 1) // block
    x, y = data[:n * block].view(n, block), data[1:n * block + 1].view(n, block)
    was_training = model.training
    model.eval()
    total = sum(model(x[i:i + batch], y[i:i + batch])[1].item() * len(x[i:i + batch]) for i in range(0, n, batch))
    model.train(was_training)
    return total / n


def scaled(options: str, fraction: float) -> str:
    """The recipe with its iterations (and evaluation interval) cut to a fraction, for --quick."""
    words = options.split()
    for flag in ("--max-iters", "--eval-interval", "--warmup-iters"):
        if flag in words:
            i = words.index(flag) + 1
            words[i] = str(max(1, int(int(words[i]) * fraction)))
    return " ".join(words)


def run_reference(corpus: Corpus, fraction: float, settle: float) -> dict:
    recipe = NanoRecipe()
    recipe.max_iters = recipe.lr_decay_iters = int(recipe.max_iters * fraction)
    recipe.eval_interval = max(1, int(recipe.eval_interval * fraction))
    recipe.warmup_iters = int(recipe.warmup_iters * fraction)
    common.wait_for_quiet(settle)
    with common.Busy() as busy:
        torch.manual_seed(1337)
        model = NanoGPT(RefConfig(vocab_size=corpus.tokenizer.vocab_size))
        losses = nanogpt_train(model, corpus.splits, recipe)
    return dict(recipe=recipe.__dict__, wall_s=busy.wall, own_val_loss=losses["val"],
                val_loss=val_loss(model, corpus), others_cpu_share=busy.others)


def run_project(text_corpus: Corpus, options: str, settle: float) -> dict:
    args = parse_args(f"{options} --threads {torch.get_num_threads()}".split())  # as many as the reference's
    common.wait_for_quiet(settle)
    with common.Busy() as busy:
        trainer = Trainer(model_config(args, text_corpus.tokenizer.vocab_size), train_config(args, TrainConfig()),
                          text_corpus)
        trainer.train(on_eval=lambda losses: common.progress(f"  step {trainer.record.iters}: val {losses['val']:.4f}"))
    evals = [(row["iter"], round(row["val_loss"], 4)) for row in trainer.history if "val_loss" in row]
    return dict(cli=f"python -m core.train {options}", bf16=trainer.bf16, wall_s=busy.wall,
                own_val_loss=trainer.record.val_loss, val_loss=val_loss(trainer.model, text_corpus),
                evals=evals, others_cpu_share=busy.others)


def pairs(corpus: Corpus, rounds: int, fraction: float, settle: float) -> tuple[list[dict], list[dict]]:
    """Both runs in each round, the reference first in odd rounds and the project first in even
    ones, so that a machine growing busier or quieter favours neither."""
    references, projects = [], []
    for r in range(rounds):
        for side in ("reference", "project") if r % 2 == 0 else ("project", "reference"):
            if side == "reference":
                common.progress(f"round {r + 1}: nanoGPT's recipe, its loop ...")
                references.append(run_reference(corpus, fraction, settle))
                done = references[-1]
            else:
                common.progress(f"round {r + 1}: the project's recipe ...")
                projects.append(run_project(corpus, scaled(RECIPE, fraction), settle))
                done = projects[-1]
            common.progress(f"  {done['wall_s']:.1f} s, val {done['val_loss']:.4f}, others {100 * done['others_cpu_share']:.0f}%")
    return references, projects


def main() -> None:
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--rounds", type=int, default=1, help="pairs of runs, in alternating order (default: %(default)s)")
    pick.add_argument("--no-check", action="store_true", help="skip the float32/bfloat16 check of nanoGPT's recipe")
    chosen, sys.argv[1:] = pick.parse_known_args()
    args = common.parse_args(__doc__)
    fraction = 0.1 if args.quick else 1.0
    corpus = Corpus(common.shakespeare(), 64)
    t0 = time.perf_counter()
    references, projects = pairs(corpus, chosen.rounds, fraction, args.settle)
    # Is bfloat16 as good as float32? nanoGPT's recipe on the project's trainer, once in each
    # (bfloat16 only where the CPU has it: elsewhere it is emulated, and never used).
    precisions = () if chosen.no_check else ("float32", "bfloat16") if fast_bf16(torch.device("cpu")) else ("float32",)
    precision = {p: run_project(corpus, scaled(f"{NANOGPT_RECIPE} --precision {p}", fraction), args.settle)
                 for p in precisions}
    ratios = [ours["wall_s"] / reference["wall_s"] for ours, reference in zip(projects, references)]
    ratio = statistics.median(ratios)
    reference, ours = references[0], projects[0]  # the losses: the same in every round
    ref_wall, our_wall = (statistics.median(run["wall_s"] for run in runs) for runs in (references, projects))
    judged = not args.quick
    goals = {"val_loss": common.goal(ours["val_loss"], TARGET_LOSS, False, judged),
             "wall_time_vs_reference": common.goal(ratio, TARGET_TIME, False, judged)}

    def each(runs, key, scale=1.0, digits=1):
        return ", ".join(f"{scale * run[key]:.{digits}f}" for run in runs)

    rows = [("nanoGPT recipe, its loop: wall time (median)", f"{ref_wall:.1f}", f"s; each round: {each(references, 'wall_s')}"),
            ("  val loss (all validation windows)", f"{reference['val_loss']:.4f}",
             f"(its own 20-batch estimate: {reference['own_val_loss']:.4f})"),
            ("project trainer, its recipe: wall time (median)", f"{our_wall:.1f}", f"s; each round: {each(projects, 'wall_s')}"),
            ("  val loss (all validation windows)", f"{ours['val_loss']:.4f}",
             f"(its own estimate: {ours['own_val_loss']:.4f}); goal <= {TARGET_LOSS}: {common.verdict(goals['val_loss'])}"),
            ("wall time, project / reference (median of the rounds)", f"{ratio:.2f}",
             f"goal <= {TARGET_TIME}: {common.verdict(goals['wall_time_vs_reference'])}; each round: "
             + ", ".join(f"{r:.2f}" for r in ratios)),
            ("other processes' share of the CPU, %", "",
             f"reference {each(references, 'others_cpu_share', 100, 0)}; project {each(projects, 'others_cpu_share', 100, 0)}"),
            ("project recipe", "", ours["cli"])]
    rows += [(f"nanoGPT's recipe on the project trainer, {p}: val loss", f"{run['val_loss']:.4f}",
              f"in {run['wall_s']:.1f} s (other processes {100 * run['others_cpu_share']:.0f}%)")
             for p, run in precision.items()]
    common.report("Time to quality on Tiny Shakespeare" + (" (--quick: a tenth of each run)" if args.quick else ""),
                  rows, dict(benchmark="time_to_quality", quick=args.quick, machine=common.machine(),
                             references=references, projects=projects, wall_ratios=ratios, wall_ratio=ratio,
                             precision_check=precision, total_s=time.perf_counter() - t0, goals=goals))


if __name__ == "__main__":
    main()
