"""The Train view's timed recipe, the "1-minute demo": its steps sized from what a training of its
shape costs on this machine (explorer/offpage/step_times.py), then trained as the view trains it
(a TrainingRunner on one thread, as the app: evaluations, samples and attention snapshots
included). Prints each variant's wall time against the minute and the val loss the minute bought
(every window of the validation split); then the room's recipe ("Room (everyone at once)", a
fixed 400 steps) with each optimizer.

    python -m benchmarks.minute [--settle S] [--seconds 60]
"""

import argparse
import sys
from dataclasses import replace

import torch

from benchmarks import common
from benchmarks.time_to_quality import val_loss
from core.data import Corpus
from explorer.offpage.recipes import RECIPE_SECONDS, RECIPES, ROOM_RECIPE, Settings, make_trainer, probe_ids, watch
from explorer.offpage.step_times import fit_steps, measure, run_seconds
from explorer.offpage.training_run import TrainingRunner, TrainingSlots

DEMO, ROOM = "1-minute demo", ROOM_RECIPE
VARIANTS = {  # what each changes in the recipe
    "adamw": dict(optimizer="adamw"),
    "muon": dict(optimizer="muon"),
    "muon, evaluate every 200": dict(optimizer="muon", eval_interval=200),
}


def train(settings: Settings, text: str, settle: float) -> dict:
    corpus = Corpus(text, settings.block_size)
    runner = TrainingRunner(make_trainer(settings, None, lambda block: corpus), TrainingSlots(1),
                            probe_ids=probe_ids(corpus, settings.block_size), **watch(settings.eval_interval))
    common.wait_for_quiet(settle)
    with common.Busy() as busy:
        runner.start()
        runner.join()
    assert runner.snapshot().status == "finished", runner.snapshot().message
    trainer = runner.trainer
    return dict(steps=settings.max_iters, wall_s=busy.wall, train_s=trainer.record.seconds,
                val=val_loss(trainer.model, corpus, block=settings.block_size), own_val=trainer.record.val_loss,
                others=busy.others)


def main() -> None:
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--seconds", type=float, default=RECIPE_SECONDS[DEMO], help="the demo's target (default: %(default)s)")
    chosen, sys.argv[1:] = pick.parse_known_args()
    args = common.parse_args(__doc__)
    torch.set_num_threads(1)  # as the app trains
    text = common.shakespeare()
    vocab = len(set(text))
    results, rows = [], []
    for name, changes in VARIANTS.items():
        settings = replace(RECIPES[DEMO][1], **changes)
        costs = measure(settings, vocab)
        sized = replace(settings, max_iters=fit_steps(costs, settings, chosen.seconds, 1_000_000))
        out = dict(recipe=DEMO, variant=name, costs=vars(costs), predicted_s=run_seconds(costs, sized),
                   **train(sized, text, args.settle))
        results.append(out)
        print(f"{DEMO}, {name}: {out['steps']} steps ({costs.step_ms:.1f} ms a step, an evaluation "
              f"{costs.eval_ms:.0f} ms, a sample {costs.look_ms:.0f} ms): {out['wall_s']:.1f} s "
              f"(predicted {out['predicted_s']:.1f} s), val {out['val']:.4f}, others {100 * out['others']:.0f}%",
              file=sys.stderr, flush=True)
        rows.append((f"{DEMO}, {name}: {out['steps']} steps", f"{out['wall_s']:.1f} s",
                     f"val {out['val']:.4f}; others {100 * out['others']:.0f}%"))
    for name in ("adamw", "muon"):
        out = dict(recipe=ROOM, variant=name, **train(replace(RECIPES[ROOM][1], optimizer=name), text, args.settle))
        results.append(out)
        rows.append((f"{ROOM}, {name}: {out['steps']} steps", f"{out['wall_s']:.1f} s",
                     f"val {out['val']:.4f}; others {100 * out['others']:.0f}%"))
    common.report(f"The timed recipe ({chosen.seconds:.0f} s) and the room's", rows,
                  dict(benchmark="minute", machine=common.machine(), results=results))


if __name__ == "__main__":
    main()
