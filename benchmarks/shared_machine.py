"""Training on a shared machine: the trainer's step (nanoGPT's CPU recipe, CLI defaults) alone
and beside a busy neighbour (a process spinning on one core), with OpenMP's default wait policy
(a thread that waits for its sibling spins), with OMP_WAIT_POLICY=PASSIVE (it sleeps), and on
one thread. Each setting runs in a child process: OpenMP reads its settings when torch loads.

    python -m benchmarks.shared_machine [--quick]
"""

import json
import os
import subprocess
import sys
import time

from benchmarks import common

SETTINGS = {  # name: (extra environment, threads)
    "2 threads (default)": ({}, 2),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    "1 thread": ({}, 1),
}


def child(threads: int, seconds: float) -> None:
    """Print the median ms/iter of chunks of 5 steps, run for about `seconds`."""
    from benchmarks.train_speed import trainer_contestant

    _, run = trainer_contestant(f"--threads {threads}")
    run(5)  # warm-up
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        run(5)
        times.append((time.perf_counter() - t0) / 5)
    print(json.dumps(1000 * common.median(times)))


def step_ms(env: dict, threads: int, seconds: float) -> float:
    code = f"from benchmarks.shared_machine import child; child({threads}, {seconds})"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True, cwd=common.ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = common.parse_args(__doc__)
    seconds, neighbours = (4.0, [True]) if args.quick else (8.0, [False, True])
    results = {}
    for busy in neighbours:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            common.wait_for_quiet(0 if busy else args.settle)
            with common.Busy() as meter:
                ms = {name: step_ms(env, threads, seconds) for name, (env, threads) in SETTINGS.items()}
        finally:
            if spinner:
                spinner.kill()
        results["beside a spinning process" if busy else "alone"] = dict(ms_per_iter=ms, others_cpu_share=meter.others)
    rows = [(f"{name}, {where}", f"{ms:.1f}", f"ms/iter (other processes {100 * r['others_cpu_share']:.0f}% of the CPU)")
            for where, r in results.items() for name, ms in r["ms_per_iter"].items()]
    common.report("The trainer on a shared machine (nanoGPT's CPU recipe, CLI defaults)", rows, dict(
        benchmark="shared_machine", quick=args.quick, machine=common.machine(), results=results))


if __name__ == "__main__":
    main()
