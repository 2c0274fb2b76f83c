"""Levers for loss per FLOP at nanoGPT's CPU shape: each candidate recipe trains in this one
process, one after the other; every `--every` steps (untimed) it is judged on every 64-character
window of the validation split. Prints, per candidate, the median ms a step, the training
seconds to the first judgement <= 1.88 and the final loss.

    python -m benchmarks.levers [--settle S] [--every N] [--only NAME ...]
"""

import argparse
import statistics
import sys

import torch

from benchmarks import common
from benchmarks.time_to_quality import SHAPE, TARGET_LOSS, val_loss
from core.data import Corpus
from core.train import build_parser, model_config, train_config
from core.trainer import TrainConfig, Trainer

BASE = "--batch-size 16 --max-iters 1200 --lr 2e-3 --min-lr 2e-4 --warmup-iters 100"
CANDIDATES = {
    "project recipe (AdamW, cosine)": BASE,
    "AdamW, 600 steps": BASE.replace("1200", "600"),
    "muon 0.02, 600 steps": BASE.replace("1200", "600") + " --optimizer muon --muon-lr 0.02",
    "muon 0.05, 600 steps": BASE.replace("1200", "600") + " --optimizer muon --muon-lr 0.05",
}


def run(corpus: Corpus, name: str, options: str, every: int, settle: float) -> dict:
    args = build_parser().parse_args(f"{SHAPE} {options} --eval-interval 100000".split())
    cfg = train_config(args, TrainConfig())
    trainer = Trainer(model_config(args, corpus.tokenizer.vocab_size), cfg, corpus)
    curve = []
    common.wait_for_quiet(settle)
    with common.Busy() as busy:
        while not trainer.done:
            trainer.run(every)
            curve.append((trainer.record.iters, trainer.record.seconds, val_loss(trainer.model, corpus)))
            print(f"  {name}: step {curve[-1][0]} val {curve[-1][2]:.4f} ({curve[-1][1]:.1f} s)", file=sys.stderr, flush=True)
    ms = statistics.median(r["ms_per_iter"] for r in trainer.history if "ms_per_iter" in r)
    first = next(((it, s) for it, s, v in curve if v <= TARGET_LOSS), None)
    out = dict(name=name, options=options, ms_per_iter=ms, train_s=trainer.record.seconds, final_val=curve[-1][2],
               first_at=first, curve=[(it, round(v, 4)) for it, _, v in curve], others=busy.others)
    print(f"{name:<40} {ms:6.1f} ms/it  train {trainer.record.seconds:6.1f} s  final {curve[-1][2]:.4f}  "
          f"<=1.88 at {first}  others {100 * busy.others:.0f}%", flush=True)
    return out


def main() -> None:
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--only", nargs="+", help="candidates by name")
    pick.add_argument("--every", type=int, default=100, help="steps between judgements (default: %(default)s)")
    chosen, sys.argv[1:] = pick.parse_known_args()
    args = common.parse_args(__doc__)
    args.every = chosen.every
    corpus = Corpus(common.shakespeare(), 64)
    print(common.machine(), "bf16" if torch.cpu.get_capabilities().get("amx_bf16") else "", flush=True)
    results = [run(corpus, n, o, args.every, args.settle) for n, o in CANDIDATES.items()
               if not chosen.only or n in chosen.only]
    common.report("Levers", [(r["name"], f"{r['final_val']:.4f}", f"{r['train_s']:.1f} s") for r in results],
                  dict(benchmark="levers", machine=common.machine(), results=results))


if __name__ == "__main__":
    main()
