"""Levers for loss per FLOP at nanoGPT's CPU shape, each on top of the winning recipe as it was
before them (BASE): a candidate is that recipe with a few options changed.
The candidates train in this one process taking turns, `--every` steps each, so that a noisy
neighbour slows all of them alike; after each turn (untimed) a candidate is judged on every
64-character window of the validation split. Prints, per candidate, the median ms a step, the
training seconds to the first judgement <= 1.88 and the final loss.

`--evals` instead runs that recipe whole (Trainer.train, its own evaluations included) and times
those evaluations: their share of the wall time. `--step-times` times a step of each candidate,
paired: rounds of a few steps each, in turn (the ramps' steps are timed after their ramp).

    python -m benchmarks.levers [--settle S] [--every N] [--only NAME ...] [--evals | --step-times [--rounds R]]
"""

import argparse
import statistics
import sys
import time

import torch

from benchmarks import common
from benchmarks.time_to_quality import RECIPE, TARGET_LOSS, val_loss
from core.data import Corpus
from core.train import model_config, parse_args, train_config
from core.trainer import TrainConfig, Trainer

# The recipe the levers were measured on: the fast recipe as it was before them (Muon, batch 16,
# 500 steps, lr 2e-3 cosine to 2e-4, warmup 100). What each candidate changes in it follows; the
# shapes keep the blocks' FLOPs of 4 x 128 (12 L C^2: 0.79M weights) within 3%.
BASE = f"{RECIPE} --max-iters 500 --schedule cosine --eval-interval 250"
CANDIDATES = {
    "base (cosine)": "",
    "wsd, decay 0.2": "--schedule wsd --decay-frac 0.2",
    "wsd, decay 0.4": "--schedule wsd --decay-frac 0.4",
    "batch ramp 4->16 over 100": "--batch-ramp-iters 100",
    "seq ramp 16->64 over 100": "--seq-ramp-iters 100",
    "2 x 180": "--n-layer 2 --n-embd 180",
    "8 x 92": "--n-layer 8 --n-embd 92",
    "tied embeddings": "--tie-weights",
    # The MLP's inner width (4 x n_embd in the lecture) at the same block FLOPs, (4 + 2 r) L C^2.
    "mlp 2x, 156 dims": "--mlp-ratio 2 --n-embd 156",
    "mlp 3x, 140 dims": "--mlp-ratio 3 --n-embd 140",
    "mlp 6x, 112 dims": "--mlp-ratio 6 --n-embd 112",
    "400 steps": "--max-iters 400",
    "400 steps, lr x1.5": "--max-iters 400 --lr 3e-3 --min-lr 3e-4 --muon-lr 0.03",
    "muon, 3 Newton-Schulz steps": "--muon-ns-steps 3",
    "batch 24, 350 steps": "--batch-size 24 --max-iters 350",
    # The winners together, and fewer steps of them; "wsd 0.4, 450 steps" is the fast recipe now.
    "2 x 180, wsd 0.4": "--n-layer 2 --n-embd 180 --schedule wsd --decay-frac 0.4",
    "2 x 180, wsd 0.4, 450 steps": "--n-layer 2 --n-embd 180 --schedule wsd --decay-frac 0.4 --max-iters 450",
    "wsd 0.4, 450 steps": "--schedule wsd --decay-frac 0.4 --max-iters 450",
    "wsd 0.4, 450 steps, 3 Newton-Schulz steps": "--schedule wsd --decay-frac 0.4 --max-iters 450 --muon-ns-steps 3",
}


def build(corpus: Corpus, options: str) -> Trainer:
    args = parse_args(f"{BASE} {options} --threads {torch.get_num_threads()}".split())
    return Trainer(model_config(args, corpus.tokenizer.vocab_size), train_config(args, TrainConfig()), corpus)


def levers(corpus: Corpus, names: list[str], every: int, settle: float) -> list[dict]:
    """The candidates by turns; each turn's val loss on every window (untimed)."""
    trainers = {name: build(corpus, CANDIDATES[name]) for name in names}
    curves = {name: [] for name in names}
    others = {name: [] for name in names}
    while not all(t.done for t in trainers.values()):
        for name, trainer in trainers.items():
            if trainer.done:
                continue
            common.wait_for_quiet(settle)
            with common.Busy() as busy:
                trainer.run(every)
            others[name].append(busy.others)
            curves[name].append((trainer.record.iters, trainer.record.seconds, val_loss(trainer.model, corpus)))
            print(f"  {name}: step {trainer.record.iters} val {curves[name][-1][2]:.4f} "
                  f"({trainer.record.seconds:.1f} s)", file=sys.stderr, flush=True)
    results = []
    for name, trainer in trainers.items():
        curve = curves[name]
        ms = statistics.median(r["ms_per_iter"] for r in trainer.history)
        first = next(((it, round(s, 1)) for it, s, v in curve if v <= TARGET_LOSS), None)
        results.append(dict(name=name, options=CANDIDATES[name], ms_per_iter=ms, train_s=trainer.record.seconds,
                            final_val=curve[-1][2], first_at=first, curve=[(it, round(v, 4)) for it, _, v in curve],
                            others=statistics.mean(others[name])))
        print(f"{name:<28} {ms:6.1f} ms/it  train {trainer.record.seconds:6.1f} s  final {curve[-1][2]:.4f}  "
              f"<={TARGET_LOSS} at {first}  others {100 * results[-1]['others']:.0f}%", flush=True)
    return results


TURN = 5  # steps of each candidate in a round of --step-times


def step_times(corpus: Corpus, names: list[str], settle: float, rounds: int = 8) -> common.Rounds:
    """Seconds of TURN steps of each candidate, in paired rounds."""
    trainers = {name: build(corpus, CANDIDATES[name]) for name in names}
    for trainer in trainers.values():
        trainer.run(max(1, trainer.train_config.batch_ramp_iters, trainer.train_config.seq_ramp_iters))  # warm
    return common.interleave({name: (lambda t=t: t.run(TURN)) for name, t in trainers.items()}, rounds, settle)


def eval_cost(corpus: Corpus, settle: float) -> dict:
    """The base recipe run whole, as the command line runs it, with its own evaluations timed:
    what they cost of the wall time."""
    trainer = build(corpus, "")
    spent = []
    estimate = trainer.estimate_loss

    def timed():
        t0 = time.perf_counter()
        out = estimate()
        spent.append(time.perf_counter() - t0)
        return out

    trainer.estimate_loss = timed
    common.wait_for_quiet(settle)
    with common.Busy() as busy:
        trainer.train()
    out = dict(wall_s=busy.wall, evals=len(spent), eval_s=sum(spent), eval_ms=1000 * statistics.median(spent),
               share=sum(spent) / busy.wall, train_s=trainer.record.seconds, val=val_loss(trainer.model, corpus),
               others=busy.others)
    print(f"recipe whole: {busy.wall:.1f} s, {len(spent)} evaluations {sum(spent):.2f} s "
          f"({100 * out['share']:.1f}%, {out['eval_ms']:.0f} ms each), val {out['val']:.4f}, "
          f"others {100 * busy.others:.0f}%", flush=True)
    return out


def main() -> None:
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--only", nargs="+", choices=list(CANDIDATES), help="candidates by name")
    pick.add_argument("--every", type=int, default=100, help="steps between judgements (default: %(default)s)")
    pick.add_argument("--evals", action="store_true", help="time the recipe's own evaluations instead")
    pick.add_argument("--step-times", action="store_true", help="time a step of each candidate instead, paired")
    pick.add_argument("--rounds", type=int, default=8, help="rounds of --step-times (default: %(default)s)")
    chosen, sys.argv[1:] = pick.parse_known_args()
    args = common.parse_args(__doc__)
    corpus = Corpus(common.shakespeare(), 64)
    machine = common.machine()
    print(machine, flush=True)
    if chosen.evals:
        out = eval_cost(corpus, args.settle)
        common.report("Evaluations during the recipe", [
            ("wall time, evaluations included", f"{out['wall_s']:.1f}", "s"),
            ("evaluations", f"{out['evals']}", f"{out['eval_ms']:.0f} ms each (median)"),
            ("their share of the wall time", f"{100 * out['share']:.1f}", "%"),
            ("other processes' share of the CPU", f"{100 * out['others']:.0f}", "%")],
            dict(benchmark="levers", evals=out, machine=machine))
        return
    names = chosen.only or list(CANDIDATES)
    if chosen.step_times:
        timed = step_times(corpus, names, args.settle, chosen.rounds)
        ms = {name: 1000 * timed.median(name) / TURN for name in names}
        ratio = {name: 1 / timed.speedup(name, names[0]) for name in names}
        common.report("A step of each candidate (paired rounds)",
                      [(name, f"{ms[name]:.1f} ms", f"{ratio[name]:.2f}x the first's") for name in names] + [timed.row()],
                      dict(benchmark="levers", ms_per_step=ms, vs_first=ratio, rounds=timed.summary(), machine=machine))
        return
    results = levers(corpus, names, chosen.every, args.settle)
    common.report("Levers", [(r["name"], f"{r['final_val']:.4f}", f"{r['ms_per_iter']:.1f} ms/step") for r in results],
                  dict(benchmark="levers", machine=machine, results=results))


if __name__ == "__main__":
    main()
