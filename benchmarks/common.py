"""What every benchmark shares: the machine's description, a matmul ceiling, interleaved timing,
a meter of how busy the rest of the machine was, the table + JSON output, and a profile of one
AppTest script run."""

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from core.data import load_shakespeare

ROOT = Path(__file__).resolve().parent.parent
QUIET = 0.1  # a measurement counts as quiet when other processes used under 10% of the CPU


def parse_args(description: str, profile: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run in under 60 s: fewer repeats, goals not judged")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores, %(default)s)")
    p.add_argument("--settle", type=float, default=None,
                   help="on a shared machine, wait up to this many seconds before each measurement for the "
                        "other processes to go quiet (default: 20, 0 with --quick)")
    if profile:
        p.add_argument("--profile", action="store_true", help="also print where the time of one run goes (cProfile)")
    args = p.parse_args()
    if args.settle is None:
        args.settle = 0.0 if args.quick else 20.0
    torch.set_num_threads(args.threads)
    return args


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    flags = _read("/proc/cpuinfo")
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f} " in flags]
    # The kernels torch picked: "AVX2" where ATEN_CPU_CAPABILITY=avx2 emulates an AVX2 machine.
    return dict(cpu=cpu, isa=isa, kernels=torch.backends.cpu.get_cpu_capability(), cores=os.cpu_count(),
                threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                load_avg_1m=os.getloadavg()[0])


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n matmul, the best of `repeats` (the ceiling MFU is measured against)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):  # warm-up: kernels chosen and compiled, AMX state granted
        a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _seconds(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class Rounds:
    """Seconds of each contestant in each round, and how busy the rest of the machine was."""
    times: dict[str, list[float]]
    others: list[float] = field(default_factory=list)  # other processes' share of the CPU, a round

    @property
    def kept(self) -> list[int]:
        """The quiet rounds, if at least 3; else every round. On 2 cores a busy neighbour stalls
        each parallel region of a 2-thread run, so a busy round says little about the code."""
        quiet = [i for i, share in enumerate(self.others) if share < QUIET]
        return quiet if len(quiet) >= 3 else list(range(len(self.others)))

    def median(self, name: str) -> float:
        return statistics.median(self.times[name][i] for i in self.kept)

    def speedup(self, name: str, over: str) -> float:
        """Median over the kept rounds of over's time / name's time. Paired within each round,
        so that the machine's drift from round to round cancels out."""
        return statistics.median(self.times[over][i] / self.times[name][i] for i in self.kept)

    def summary(self) -> dict:
        return dict(rounds=len(self.others), rounds_used=len(self.kept), others_cpu_share=self.others,
                    times_s=self.times)

    def row(self) -> tuple:
        """A table row: how many rounds the medians come from, and how busy the machine was."""
        shares = ", ".join(f"{100 * o:.0f}" for o in self.others)
        return ("rounds used (quiet: other processes < 10% of the CPU)", f"{len(self.kept)} of {len(self.others)}",
                f"others' share in each round, %: {shares}")


def interleave(contestants: dict[str, Callable[[], object]], rounds: int, settle: float = 0.0,
               label: str = "") -> Rounds:
    """Contestants take turns round after round, so that a noisy neighbour slows all of them
    alike. Each round first waits up to `settle` seconds for the machine to go quiet. With a
    label, each round's end is reported on stderr."""
    result = Rounds({name: [] for name in contestants})
    for i in range(rounds):
        wait_for_quiet(settle)
        with Busy() as busy:
            for name, fn in contestants.items():
                result.times[name].append(_seconds(fn))
        result.others.append(busy.others)
        if label:
            progress(f"{label}: round {i + 1}/{rounds}, {sum(t[-1] for t in result.times.values()):.1f} s, "
                     f"others {100 * busy.others:.0f}% of the CPU")
    return result


def progress(line: str) -> None:
    """A line on stderr at once: a long benchmark shows where it is (its table comes at the end)."""
    print(line, file=sys.stderr, flush=True)


def wait_for_quiet(timeout: float) -> None:
    """Return once other processes used under QUIET of the CPU for half a second, or at timeout."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        with Busy() as busy:
            time.sleep(0.5)
        if busy.others < QUIET:
            return


def median(xs) -> float:
    return statistics.median(xs)


class Busy:
    """How much of the machine's CPU time other processes used while the block ran (0..1).
    Reads /proc/stat (all processes) and subtracts this process's own time and its children's."""

    def __enter__(self):
        self._start = (_busy_jiffies(), os.times(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        jiffies, times, wall = self._start
        hz = os.sysconf("SC_CLK_TCK")
        total = (_busy_jiffies() - jiffies) / hz
        now = os.times()
        own = sum(now[:4]) - sum(times[:4])  # this process and its finished children
        self.wall = time.perf_counter() - wall
        self.others = max(0.0, total - own) / max(self.wall * (os.cpu_count() or 1), 1e-9)


def _busy_jiffies() -> int:
    fields = _read("/proc/stat").split("\n", 1)[0].split()[1:]
    if not fields:
        return 0
    values = [int(v) for v in fields]
    return sum(values) - values[3] - values[4]  # all but idle and iowait


def report(title: str, rows: list[tuple], result: dict) -> None:
    """A table of (measure, value, note) rows, then the whole result as one JSON line (last)."""
    width = max(len(str(r[0])) for r in rows)
    vwidth = max(len(str(r[1])) for r in rows)
    print(f"\n{title}\n" + "-" * len(title))
    for name, value, *note in rows:
        print(f"{str(name):<{width}}  {str(value):>{vwidth}}  {note[0] if note else ''}".rstrip())
    print(json.dumps(_rounded(result)), flush=True)


def goal(value: float, target: float, higher_is_better: bool, judged: bool = True) -> dict:
    """A goal's figure, its target and whether it is met (None when not judged, as in --quick)."""
    met = (value >= target if higher_is_better else value <= target) if judged else None
    return dict(value=round(value, 4), target=target, met=met)


def verdict(g: dict) -> str:
    return {True: "met", False: "MISSED", None: "not judged (--quick)"}[g["met"]]


def _rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def shakespeare() -> str:
    """Tiny Shakespeare as the project finds it ($GPT_EXPLORER_DATA, data/, else a download)."""
    return load_shakespeare()


def profile_script_run(at) -> str:
    """cProfile of one script run: AppTest runs the script on its own thread, so the profiler is
    switched on from that thread's first traced call."""
    profiler = cProfile.Profile()

    def start(*_):
        threading.setprofile(None)
        sys.setprofile(None)
        profiler.enable()

    threading.setprofile(start)
    try:
        at.run()
    finally:
        threading.setprofile(None)
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
    return out.getvalue()
