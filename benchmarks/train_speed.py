"""Goal 1: training throughput at nanoGPT's CPU recipe (4 layers, 4 heads, 128 dims, block 64,
batch 12), the project's trainer as the command line builds it against nanoGPT's loop, with
the levers measured one at a time on the reference. All contestants take turns in one process.
bfloat16 (its matmul peak and its levers) is measured only where the CPU has bfloat16 matmul
instructions that torch uses: elsewhere it is emulated (a 2048^2 product took 56 s on an AVX2
EPYC) and the trainer never picks it. Progress goes to stderr as it runs.

    python -m benchmarks.train_speed [--quick]
"""

import time

import torch

from benchmarks import common
from benchmarks.reference import LectureGPT, NanoGPT, NanoRecipe, RefConfig, lecture_step, nano_get_batch, nanogpt_step
from core import GPT, GPTConfig
from core.train import build_parser, make_trainer
from core.trainer import fast_bf16

BATCH, BLOCK = 12, 64
# The recipe as command-line options of `python -m core.train`.
CLI = (f"--preset layernorm --n-layer 4 --n-head 4 --n-embd 128 --block-size {BLOCK} --dropout 0 --no-bias "
       f"--activation gelu --batch-size {BATCH} --max-iters 1000000")
TARGET = 1.25  # the trainer's tokens/s over the reference's


def trainer_contestant(extra: str = ""):
    trainer = make_trainer(build_parser().parse_args((CLI + " " + extra).split()))
    return trainer, trainer.run


class Reference:
    """nanoGPT's model and loop; each keyword changes one thing (a lever)."""

    def __init__(self, data: torch.Tensor, fused_adamw=False, bf16=False, item=True, threads=None, compile=False):
        torch.manual_seed(1337)
        self.model = NanoGPT(RefConfig(block_size=BLOCK))
        self.recipe, self.data, self.it = NanoRecipe(batch_size=BATCH), data, 0
        self.optimizer = self.model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), fused=fused_adamw)
        self.bf16, self.item, self.threads = bf16, item, threads
        self.compile_s = 0.0
        if compile:
            self.model = torch.compile(self.model)
            t0 = time.perf_counter()
            self.run(2)  # the first steps compile the forward and the backward
            self.compile_s = time.perf_counter() - t0

    def run(self, n: int) -> None:
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            for _ in range(n):
                loss = nanogpt_step(self.model, self.optimizer, self.data, self.recipe, self.it) if self.item \
                    else self._step_without_item()
                self.it += 1
        torch.set_num_threads(before)
        return loss

    def _step_without_item(self):
        x, y = nano_get_batch(self.data, BATCH, BLOCK)
        _, loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def lecture_contestant(data: torch.Tensor):
    torch.manual_seed(1337)
    model = LectureGPT(RefConfig(block_size=BLOCK, bias=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return lambda n: [lecture_step(model, optimizer, data, BATCH) for _ in range(n)]


def batch_cost_us(trainer, data: torch.Tensor, calls: int = 200) -> dict[str, float]:
    """Microseconds to draw one (x, y) batch: nanoGPT's Python-list stack vs the project's gather."""
    def per_call(fn):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return 1e6 * (time.perf_counter() - t0) / calls
    rng = torch.Generator().manual_seed(0)
    return dict(nanogpt_stack=per_call(lambda: nano_get_batch(data, BATCH, BLOCK)),
                project_gather=per_call(lambda: trainer.corpus.get_batch("train", BATCH, BLOCK, rng)))


def measure(contestants: dict, reference: str, rounds: int, steps: int, settle: float, flops: float,
            peak: float, label: str) -> tuple[dict, common.Rounds]:
    """ms/iter, tokens/s, speed-up over the reference (paired by round) and MFU of each contestant."""
    timings = common.interleave({name: (lambda r=run: r(steps)) for name, run in contestants.items()}, rounds, settle,
                                label)
    figures = {}
    for name in contestants:
        ms = 1000 * timings.median(name) / steps
        tokens_s = BATCH * BLOCK / (ms / 1000)
        figures[name] = dict(ms_per_iter=ms, tokens_per_s=tokens_s, vs_reference=timings.speedup(name, reference),
                             mfu_fp32_peak=tokens_s * flops / (peak * 1e9))
    return figures, timings


def main() -> None:
    args = common.parse_args(__doc__)
    common.wait_for_quiet(args.settle)
    bf16 = fast_bf16(torch.device("cpu"))
    peaks = {}
    for name, dtype in {"float32": torch.float32, **({"bfloat16": torch.bfloat16} if bf16 else {})}.items():
        peaks[name] = common.matmul_peak(dtype)
        common.progress(f"matmul peak, 2048^2 ({name}): {peaks[name]:.0f} GFLOP/s")
    flops = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=BLOCK, bias=False)).flops_per_token(BLOCK)
    trainer, trainer_run = trainer_contestant()
    precision = "bfloat16" if trainer.bf16 else "float32"
    data = trainer.corpus.splits["train"]
    reference = "nanoGPT reference (fp32, default AdamW, .item() each step)"
    headline = f"project trainer, CLI defaults (precision auto: {precision})"
    pair = {headline: trainer_run, reference: Reference(data).run}
    # The bfloat16 levers only where it is fast (there precision auto took it: float32 is the lever).
    levers = {reference: pair[reference],
              "project trainer --precision float32": bf16 and trainer_contestant("--precision float32")[1],
              "lecture per-head modules (fp32)": lecture_contestant(data),
              "  + fused AdamW": Reference(data, fused_adamw=True).run,
              "  + bf16 autocast": bf16 and Reference(data, bf16=True).run,
              "  + no .item() per step": Reference(data, item=False).run,
              "  with 1 thread": Reference(data, threads=1).run}
    levers = {name: run for name, run in levers.items() if run}
    compiled = None
    if not args.quick:  # longer than the --quick budget
        common.progress("torch.compile: compiling the reference's forward and backward ...")
        compiled = Reference(data, compile=True)
        levers["  + torch.compile"] = compiled.run
    common.progress("warm-up: 3 steps of each contestant ...")
    for run in [trainer_run, *levers.values()]:
        run(3)  # warm-up: allocator, oneDNN kernels
    # The goal's pair in many short rounds; then every lever against the same reference.
    steps = 5 if args.quick else 10
    figures, timings = measure(pair, reference, 4 if args.quick else 30, steps, args.settle, flops, peaks["float32"],
                               "the goal's pair")
    lever_figures, lever_timings = measure(levers, reference, 2 if args.quick else 8, steps, args.settle, flops,
                                           peaks["float32"], "levers")
    g = common.goal(figures[headline]["vs_reference"], TARGET, True, judged=not args.quick)
    batches = batch_cost_us(trainer, data)

    def lines(figs):
        return [(name, f"{f['ms_per_iter']:.1f}", f"ms/iter  {f['tokens_per_s']:,.0f} tok/s  "
                 f"x{f['vs_reference']:.2f} vs reference  MFU {100 * f['mfu_fp32_peak']:.0f}% of fp32 peak")
                for name, f in figs.items()]

    rows = [(f"matmul peak, 2048^2 ({k})", f"{v:.0f}", "GFLOP/s") for k, v in peaks.items()]
    if not bf16:
        rows.append(("bfloat16", "skipped", "this CPU has no bfloat16 matmul instructions torch uses: emulated"))
    rows += lines(figures) + [timings.row(), ("levers, one at a time:", "", "")] + lines(lever_figures)
    if compiled:
        rows.append(("torch.compile: compile + first 2 steps", f"{compiled.compile_s:.1f}", "s"))
    rows += [(f"one batch, {k}", f"{v:.0f}", "µs") for k, v in batches.items()]
    rows += [lever_timings.row(), (f"goal: trainer >= {TARGET}x reference tokens/s (paired by round)",
                                   f"{g['value']:.2f}", common.verdict(g))]
    common.report(f"Training throughput, nanoGPT's CPU recipe ({steps} steps a round, medians)", rows, dict(
        benchmark="train_speed", quick=args.quick, machine=common.machine(), steps_per_round=steps,
        cli=f"python -m core.train {CLI}", flops_per_token=flops, matmul_peak_gflops=peaks, goal_pair=figures,
        levers=lever_figures, compile_s=compiled.compile_s if compiled else None, batch_us=batches,
        timings=timings.summary(), lever_timings=lever_timings.summary(), goals={"train_throughput": g}))


if __name__ == "__main__":
    main()
