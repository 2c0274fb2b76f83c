"""Goal 1: training throughput at nanoGPT's CPU recipe (4 layers, 4 heads, 128 dims, block 64,
batch 12), the project's trainer as the command line builds it against nanoGPT's loop, with
the levers measured one at a time on the reference. All contestants take turns in one process.

    python -m benchmarks.train_speed [--quick]
"""

import time

import torch

from benchmarks import common
from benchmarks.reference import LectureGPT, NanoGPT, NanoRecipe, RefConfig, lecture_step, nano_get_batch, nanogpt_step
from core import GPT, GPTConfig
from core.train import build_parser, make_trainer

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


def main() -> None:
    args = common.parse_args(__doc__)
    rounds, steps = (3, 6) if args.quick else (12, 15)
    common.wait_for_quiet(args.settle)
    peaks = {"float32": common.matmul_peak(torch.float32), "bfloat16": common.matmul_peak(torch.bfloat16)}
    trainer, trainer_run = trainer_contestant()
    other = "float32" if trainer.bf16 else "bfloat16"
    _, other_run = trainer_contestant(f"--precision {other}")
    data = trainer.corpus.splits["train"]
    refs = {"nanoGPT reference (fp32, default AdamW, .item() each step)": Reference(data),
            "  + fused AdamW": Reference(data, fused_adamw=True),
            "  + bf16 autocast": Reference(data, bf16=True),
            "  + no .item() per step": Reference(data, item=False),
            "  with 1 thread": Reference(data, threads=1)}
    if not args.quick:  # compiling takes longer than the whole --quick budget
        refs["  + torch.compile"] = Reference(data, compile=True)
    precision = "bfloat16" if trainer.bf16 else "float32"
    contestants = {f"project trainer, CLI defaults (precision auto: {precision})": trainer_run,
                   f"project trainer --precision {other}": other_run,
                   "lecture per-head modules (fp32)": lecture_contestant(data),
                   **{name: ref.run for name, ref in refs.items()}}
    for run in contestants.values():
        run(3)  # warm-up: allocator, oneDNN kernels
    timings = common.interleave({name: (lambda r=run: r(steps)) for name, run in contestants.items()}, rounds,
                                args.settle)

    flops = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=BLOCK, bias=False)).flops_per_token(BLOCK)
    reference = next(iter(refs))
    ms = {name: 1000 * timings.median(name) / steps for name in contestants}
    figures = {}
    for name, m in ms.items():
        tokens_s = BATCH * BLOCK / (m / 1000)
        figures[name] = dict(ms_per_iter=m, tokens_per_s=tokens_s, vs_reference=ms[reference] / m,
                             mfu_fp32_peak=tokens_s * flops / (peaks["float32"] * 1e9))
    headline = next(iter(contestants))
    g = common.goal(figures[headline]["vs_reference"], TARGET, True, judged=not args.quick)
    batches = batch_cost_us(trainer, data)

    rows = [(f"matmul peak, 2048^2 ({k})", f"{v:.0f}", "GFLOP/s") for k, v in peaks.items()]
    rows += [(name, f"{f['ms_per_iter']:.1f}", f"ms/iter  {f['tokens_per_s']:,.0f} tok/s  "
              f"x{f['vs_reference']:.2f} vs reference  MFU {100 * f['mfu_fp32_peak']:.0f}% of fp32 peak")
             for name, f in figures.items()]
    if not args.quick:
        rows.append(("torch.compile: compile + first 2 steps", f"{refs['  + torch.compile'].compile_s:.1f}", "s"))
    rows += [(f"one batch, {k}", f"{v:.0f}", "µs") for k, v in batches.items()]
    rows += [timings.row(), (f"goal: trainer >= {TARGET}x reference tokens/s", f"{g['value']:.2f}", common.verdict(g))]
    common.report(f"Training throughput, nanoGPT's CPU recipe ({rounds} rounds x {steps} steps, medians)", rows, dict(
        benchmark="train_speed", quick=args.quick, machine=common.machine(), rounds=rounds, steps_per_round=steps,
        cli=f"python -m core.train {CLI}", flops_per_token=flops, matmul_peak_gflops=peaks, contestants=figures,
        compile_s=None if args.quick else refs["  + torch.compile"].compile_s, batch_us=batches,
        timings=timings.summary(), goals={"train_throughput": g}))


if __name__ == "__main__":
    main()
