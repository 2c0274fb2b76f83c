"""The room: N participants start the "Room (everyone at once)" recipe within a few seconds of
each other, then each generates 200 characters on the Sample page while the room trains, and
goes back to the Train page to watch the end; on a server whose trainings are threads, then on
one whose trainings are Ray workers; the two side by side.

Each backend gets a fresh `streamlit run explorer/app.py` driven by benchmarks/load.py's
browserless sessions (Streamlit's own websocket protocol). Measured: the time from the first
Start to the last training's end, against the compute bound (one training's CPU seconds, alone
in one process with its board reports, the median of 3 before the room and 3 after, times N
over the cores; and the same with one such training on every core at once, as the room's
workers train: a machine's cores share caches and memory); script-run latency while the room
trains (p50, p95); each Generate's time from the click to the whole sample (p50, p95) and the
room's characters a second; the peak memory of
the server's process and of the processes it started (Ray's workers and daemons), and the CPU
seconds each side and these clients used; errors (on a page, in the protocol, in the server's
log). The room begins once the server, opened by one session as the teacher's would be, has
gone quiet (its workers started and warm); each server gets an empty room (board) of its own.

    python -m benchmarks.room [--participants 30] [--within 10] [--backends threads ray]
"""

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

from streamlit.proto.WidgetStates_pb2 import WidgetState

from benchmarks import common
from benchmarks.load import (
    ROOT,
    Session,
    free_port,
    generate,
    only_model,
    percentiles,
    poll,
    read_progress,
    server_log_errors,
    start_server,
    stop_server,
    warm_up,
)
from core.data import CACHE_DIR, DATA_ENV, load_shakespeare
from explorer.offpage.classroom import EvalReporter, open_room
from explorer.offpage.recipes import RECIPES, ROOM_RECIPE, make_trainer, probe_ids, watch
from explorer.offpage.training_run import TrainingRunner, TrainingSlots

SAMPLE_S = 1.0
SAMPLE_CHARS = 200  # the Sample view's default length
ALONE_RUNS = 3  # one training alone varies by a fifth from run to run: the bound takes the median of 3 before the room and 3 after


def training_cpu_s() -> float:
    """CPU seconds of one room training, alone in this process on one thread, with the live
    view's samples and snapshots and the board's checkpoint and val loss at each evaluation
    (what every participant's training also does)."""
    import torch

    from core.data import Corpus

    torch.set_num_threads(1)
    settings = RECIPES[ROOM_RECIPE][1]
    trainer = make_trainer(settings, None, lambda block_size: Corpus(load_shakespeare(), block_size))
    runner = TrainingRunner(trainer, TrainingSlots(1), probe_ids=probe_ids(trainer.corpus, settings.block_size),
                            **watch(settings.eval_interval))
    with tempfile.TemporaryDirectory() as tmp:
        room = open_room(tmp)
        training = room.add_training(room.join("alone")[0].id, "run", ROOM_RECIPE, "", settings.max_iters)
        runner.room_reporter = EvalReporter(tmp, training)
        t0 = time.process_time()
        runner.start()
        runner.join()
        return time.process_time() - t0


def crowded_training_cpu_s(core: int) -> list[float]:
    """training_cpu_s() ALONE_RUNS times in a process of its own pinned to one core (Linux), while
    a process on every other core does the same: what a training costs when the whole machine
    trains, as in the room, whose cores share caches and memory (and may be one physical core's
    two threads)."""
    if hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {allowed[core % len(allowed)]})
    return [training_cpu_s() for _ in range(ALONE_RUNS)]


def crowded_runs(cores: int) -> list[float]:
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        return [s for runs in pool.map(crowded_training_cpu_s, range(cores)) for s in runs]


def settle(pid: int, quiet_s: float = 0.05, at_most_s: float = 60.0) -> None:
    """Wait until the server and its processes use under quiet_s CPU seconds in a second."""
    def used() -> float:
        server, children = family_cpu_s(pid)
        return server + sum(children.values())

    deadline, before = time.monotonic() + at_most_s, used()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = used()
        if now - before < quiet_s:
            return
        before = now


def descendants(pid: int) -> list[int]:
    """The processes the server started, and theirs (Ray's workers and daemons), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_stat(int(entry.name))[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo, found = list(children.get(pid, [])), []
    while todo:
        child = todo.pop()
        todo += children.get(child, [])
        found.append(child)
    return found


def family_memory_mb(pid: int) -> tuple[float, float]:
    """(the server's resident MB, its descendants' summed)."""
    return _rss_mb(pid), sum(_rss_mb(child) for child in descendants(pid))


def family_cpu_s(pid: int) -> tuple[float, dict[str, float]]:
    """(the server's CPU seconds so far, its living descendants' by process name)."""
    by_name: dict[str, float] = {}
    for child in descendants(pid):
        name = _name(child)
        by_name[name] = by_name.get(name, 0.0) + _cpu_s(child)
    return _cpu_s(pid), by_name


def _name(pid: int) -> str:
    """A process's title without its arguments (Ray's workers title themselves `ray::Actor`)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    return Path(argv[0].decode(errors="replace").split()[0] if argv[0] else "?").name[:40]


def machine_busy_s() -> float:
    """CPU seconds every core has spent on anything but idling and waiting, since boot (/proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command's name (field 3, the state, first)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_s(pid: int) -> float:
    try:
        fields = _stat(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)


async def participant(i: int, port: int, args, errors: list, latencies: list, deadline: float,
                      written: list) -> Session:
    s = Session(f"participant{i}", port, errors, latencies)
    await asyncio.sleep(i * args.within / max(1, args.participants))
    await s.connect()
    try:
        await s.rerun("page load")
        await s.open_page("train")
        s.values["train_recipe"] = WidgetState(string_value=ROOM_RECIPE)
        await s.rerun("recipe")
        s.training.clicked = time.monotonic()
        await s.rerun("start", trigger="train_start")
        await s.open_page("sample")  # while the training waits or runs
        s.set_number("sample_seed", i)
        clicked = time.monotonic()
        seconds = await generate(s, deadline)
        if seconds is not None:  # the whole sample is on the page
            written.append((clicked, seconds))
        await s.open_page("train")
        read_progress(s)  # the room's trainings are short: this one may have finished meanwhile
        while time.monotonic() < deadline and s.training.finished is None:
            if any(kind == "ERROR" for kind, _ in s.texts):  # could not start, or failed: counted in errors
                break
            if not s.auto_reruns:
                await asyncio.sleep(0.2)
                continue
            await poll(s, "train poll", deadline, after=read_progress)
    except (KeyError, RuntimeError) as e:
        errors.append((s.name, "room script", f"{type(e).__name__}: {e}"))
    finally:
        await s.close()
    return s


async def room(port: int, pid: int, args) -> tuple[list[Session], list, list, list, list, dict]:
    errors, latencies, memory, written = [], [], [], []
    deadline = time.monotonic() + args.timeout

    async def sample() -> None:
        while True:
            memory.append(family_memory_mb(pid))
            await asyncio.sleep(SAMPLE_S)

    sampler = asyncio.create_task(sample())
    cpu0, wall0, own0, busy0 = family_cpu_s(pid), time.monotonic(), time.process_time(), machine_busy_s()
    sessions = await asyncio.gather(*(participant(i, port, args, errors, latencies, deadline, written)
                                      for i in range(args.participants)))
    cpu1 = family_cpu_s(pid)
    by_name = {name: round(s - cpu0[1].get(name, 0.0), 2) for name, s in sorted(cpu1[1].items(), key=lambda kv: -kv[1])}
    cpu = dict(server_s=cpu1[0] - cpu0[0], children_s=sum(by_name.values()), children_by_name=by_name,
               clients_s=time.process_time() - own0, machine_s=machine_busy_s() - busy0, wall_s=time.monotonic() - wall0)
    sampler.cancel()
    return sessions, errors, latencies, memory, written, cpu


def run_backend(workers: str, args, text: Path) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GPT_EXPLORER_WORKERS=workers, GPT_EXPLORER_DATA=str(text),
                   GPT_EXPLORER_PRETRAINED=only_model(args.model, Path(tmp)), STREAMLIT_RUNNER_POST_SCRIPT_GC="false",
                   GPT_EXPLORER_ROOM_DIR=str(Path(tmp) / "room"))  # a room of its own: the board starts empty
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            server = start_server(port, env, log)
            try:
                asyncio.run(warm_up(port))
                settle(server.pid)
                sessions, errors, latencies, memory, written, cpu = asyncio.run(room(port, server.pid, args))
            finally:
                stop_server(server)
        errors += server_log_errors(log_path)
    trainings = [s.training for s in sessions]
    first = min(t.clicked for t in trainings)
    done = [t.finished for t in trainings if t.finished is not None]
    while_training = [s for k, s in latencies if k.startswith(("train poll", "sample poll"))]
    span = max((g + w for g, w in written), default=0) - min((g for g, _ in written), default=0)
    return dict(finished=len(done), last_done_s=(max(done) - first) if len(done) == len(trainings) else None,
                to_done_s=percentiles([t.finished - t.clicked for t in trainings if t.finished]),
                poll_latency_s=percentiles(while_training), all_latency_s=percentiles([s for _, s in latencies]),
                latency_by_kind_s={kind: percentiles([s for k, s in latencies if k == kind])
                                   for kind in sorted({k for k, _ in latencies})},
                written_s=percentiles([w for _, w in written]), samples=len(written),
                chars_per_s=SAMPLE_CHARS * len(written) / span if span else None,
                server_peak_mb=max((m[0] for m in memory), default=None),
                children_peak_mb=max((m[1] for m in memory), default=None), cpu=cpu,
                errors=len(errors), error_examples=sorted({f"{kind}: {what}"[:160] for _, kind, what in errors})[:5])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--participants", type=int, default=30)
    p.add_argument("--within", type=float, default=10.0, help="seconds over which they press Start (default 10)")
    p.add_argument("--backends", nargs="+", default=["threads", "ray"], choices=["threads", "ray"])
    p.add_argument("--timeout", type=float, default=900, help="give up on a backend after this many seconds")
    p.add_argument("--model", default=str(ROOT / "pretrained" / "cpu-best"),
                   help="the checkpoint the sidebar shows, which the room samples (default: pretrained/cpu-best)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    text = Path(os.environ.get(DATA_ENV) or CACHE_DIR / "tinyshakespeare.txt")
    if not text.is_file():
        sys.exit(f"error: no Tiny Shakespeare at {text}: set {DATA_ENV} to a copy of its input.txt")
    os.environ[DATA_ENV] = str(text)
    cores = os.cpu_count() or 1
    alone = [training_cpu_s() for _ in range(ALONE_RUNS)]
    results = {workers: run_backend(workers, args, text) for workers in args.backends}
    alone += [training_cpu_s() for _ in range(ALONE_RUNS)]  # after too: a VM's speed drifts over minutes
    crowded = crowded_runs(cores)
    one, one_crowded = common.median(alone), common.median(crowded)
    bound, bound_crowded = one * args.participants / cores, one_crowded * args.participants / cores
    rows = [("one training alone", f"{one:.1f} s CPU",
             f"{ROOM_RECIPE}: the median of {', '.join(f'{a:.1f}' for a in alone[:ALONE_RUNS])} (before the room) "
             f"and {', '.join(f'{a:.1f}' for a in alone[ALONE_RUNS:])} (after)"),
            ("one training, every core training", f"{one_crowded:.1f} s CPU",
             f"the median of {len(crowded)}: {cores} processes at once, one a core, as the room's workers are"),
            ("compute bound", f"{bound:.0f} s", f"{args.participants} trainings over {cores} cores, each as alone"),
            ("compute bound, every core training", f"{bound_crowded:.0f} s", "each as with every core training")]
    for workers, r in results.items():
        last = f"{r['last_done_s']:.0f} s" if r["last_done_s"] is not None else f"{r['finished']} finished"
        ratio = (f"{r['last_done_s'] / bound:.2f} x the bound; {r['last_done_s'] / bound_crowded:.2f} x with every "
                 "core training" if r["last_done_s"] else "")
        rows += [(f"{workers}: last training done", last, ratio),
                 (f"{workers}: Start to done p50 / p95", f"{_s(r['to_done_s']['p50'])} / {_s(r['to_done_s']['p95'])}",
                  "each participant's wait for a trained model"),
                 (f"{workers}: poll latency p50 / p95", f"{_s(r['poll_latency_s']['p50'])} / {_s(r['poll_latency_s']['p95'])}",
                  f"{r['poll_latency_s']['n']} polls while the room trains and samples"),
                 (f"{workers}: every script run p50 / p95", f"{_s(r['all_latency_s']['p50'])} / {_s(r['all_latency_s']['p95'])}",
                  ", ".join(f"{kind} {_s(q['p95'])}" for kind, q in r["latency_by_kind_s"].items())),
                 (f"{workers}: Generate to the whole sample p50 / p95", f"{_s(r['written_s']['p50'])} / {_s(r['written_s']['p95'])}",
                  f"{r['samples']} samples of {SAMPLE_CHARS}; the room wrote {_num(r['chars_per_s'])} characters/s"),
                 (f"{workers}: server / its children peak", f"{_mb(r['server_peak_mb'])} / {_mb(r['children_peak_mb'])}",
                  "resident memory"),
                 (f"{workers}: CPU, server / its children / clients", " / ".join(
                     f"{r['cpu'][k]:.0f} s" for k in ("server_s", "children_s", "clients_s")),
                  f"of {cores} x {r['cpu']['wall_s']:.0f} s; the machine was busy {r['cpu']['machine_s']:.0f} s"),
                 (f"{workers}: CPU of the children", ", ".join(
                     f"{name} {s:.0f} s" for name, s in list(r["cpu"]["children_by_name"].items())[:5]), ""),
                 (f"{workers}: errors", r["errors"], "; ".join(r["error_examples"]))]
    common.report(f"The room: {args.participants} participants start within {args.within:g} s", rows,
                  dict(machine=common.machine(), participants=args.participants, within_s=args.within,
                       training_cpu_s=one, training_cpu_s_runs=alone, bound_s=bound,
                       crowded_training_cpu_s=one_crowded, crowded_training_cpu_s_runs=crowded,
                       crowded_bound_s=bound_crowded, backends=results))


def _s(x) -> str:
    return f"{x:.2f} s" if x is not None else "-"


def _num(x) -> str:
    return f"{x:.0f}" if x is not None else "-"


def _mb(x) -> str:
    return f"{x:.0f} MB" if x is not None else "-"


if __name__ == "__main__":
    main()
