"""The Experiments view's costs on pretrained/cpu-best (6 layers x 6 heads, block 128):
- ranking: Δ val loss of knocking out each of the 36 heads and 6 MLPs on the fixed 4,096
  validation characters, the fast way (each layer started from its cached hook_resid_pre, its
  heads batched) against a full forward pass per knock-out; both must agree;
- the Train view's per-snapshot probe (induction_scores + icl_gap) and one patching map.

    python -m benchmarks.ablation_speed [--quick]

The goal (ranking <= 10 s on 2 cores) is set for an AVX2 machine; to run as one on a newer
CPU, limit torch's kernels before it starts:
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.ablation_speed
"""

import time

import torch

from benchmarks import common
from core import experiments as E
from core.checkpoint import load_checkpoint
from core.data import Corpus

RANKING_TARGET_S = 10.0
CLEAN, CORRUPT, TARGET = E.PATCHING_EXAMPLE


def main() -> None:
    args = common.parse_args(__doc__)
    ckpt = load_checkpoint(common.ROOT / "pretrained" / "cpu-best.json")
    model, T = ckpt.model.eval(), ckpt.model.config.block_size
    x, y = E.val_windows(Corpus(common.shakespeare(), T, ckpt.tokenizer), T)
    rounds = 1 if args.quick else 3
    print(f"cpu-best, {y.numel():,} validation characters; {rounds} round(s) of fast and full ranking "
          f"(cpu capability: {torch.backends.cpu.get_cpu_capability()})", flush=True)
    rankings = {}

    def timed(name, fn):
        def run():
            t0 = time.perf_counter()
            rankings[name] = fn(model, x, y)
            print(f"  {name}: {time.perf_counter() - t0:.2f} s", flush=True)
        return run

    E.val_loss(model, x[:E.BATCH], y[:E.BATCH])  # warm-up: the first forward of a shape picks kernels
    timings = common.interleave({"fast": timed("fast", E.rank_ablations), "full": timed("full", E.rank_ablations_full)},
                                rounds, args.settle)
    fast, full = rankings["fast"], rankings["full"]
    gap = max(float((fast.heads - full.heads).abs().max()), float((fast.mlps - full.mlps).abs().max()))
    same_order = torch.equal(fast.heads.flatten().argsort(), full.heads.flatten().argsort())

    probe = common.interleave({"probe": lambda: (E.induction_scores(model), E.icl_gap(model))}, 3 if args.quick else 10,
                              args.settle)
    tok = ckpt.tokenizer
    patch = common.interleave({"patching": lambda: E.patching(model, tok.encode(CLEAN), tok.encode(CORRUPT),
                                                              tok.stoi[TARGET])}, 3 if args.quick else 10, args.settle)
    seconds = timings.median("fast")
    g = common.goal(seconds, RANKING_TARGET_S, higher_is_better=False, judged=not args.quick)
    rows = [
        ("ranking, fast (from each layer's hook_resid_pre, heads batched)", f"{seconds:.2f} s",
         f"goal <= {RANKING_TARGET_S:.0f} s: {common.verdict(g)}"),
        ("ranking, full forward per knock-out", f"{timings.median('full'):.2f} s",
         f"fast is {timings.speedup('fast', 'full'):.2f}x faster"),
        ("largest difference fast vs full (nats)", f"{gap:.1e}", f"same order of heads: {same_order}"),
        ("induction_scores + icl_gap (one snapshot)", f"{1000 * probe.median('probe'):.0f} ms"),
        ("patching map (residual 6 x 19, heads 6 x 6)", f"{1000 * patch.median('patching'):.0f} ms"),
        timings.row(),
    ]
    common.report("Experiments on cpu-best", rows, dict(
        machine=common.machine(), cpu_capability=torch.backends.cpu.get_cpu_capability(), val_chars=y.numel(),
        ranking_goal=g, fast_s=seconds, full_s=timings.median("full"), max_difference=gap, same_order=same_order,
        probe_ms=1000 * probe.median("probe"), patching_ms=1000 * patch.median("patching"),
        timings=timings.summary()))


if __name__ == "__main__":
    main()
