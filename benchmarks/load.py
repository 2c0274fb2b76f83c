"""Workshop load: a room of participants on one server, some of them training.

Starts a real `streamlit run explorer/app.py` on 127.0.0.1 (a free port) and drives it with
browserless sessions that speak Streamlit's websocket protocol with Streamlit's own protobufs,
as a browser does: a BackMsg rerun_script carrying every widget's state, widget ids read from
the ForwardMsgs of the runs before, pages changed by their page_script_hash, and the
auto-rerun messages of the polling fragments (Train's progress, Sample's text arriving)
honoured at their interval (a new request once the previous one has finished, so each
latency is one request's).

- viewers: explore at random with a think time between actions: on Attention, change the
  layer, the head or the step, or go to Sample; there, Generate with a fresh seed (and watch
  the text arrive), pick a written character, or go back.
- trainers: open Train, set the steps of the default recipe, click Start, watch it poll; with
  fewer training slots than trainers, the others queue until a slot frees.

Measured: script-run latency (a rerun sent -> its script_finished), overall and by kind;
errors (an exception or st.error on a page, a run that never finishes, a dropped connection,
a traceback in the server's log); each training's wait in the queue, steps/s and tokens/s
(from the progress text "step X of Y · Z tokens/s"); the server's memory and CPU.

    python -m benchmarks.load [--viewers 20] [--trainers 4] [--duration 90] [--steps 100]
    python -m benchmarks.load --max-trainings 2
"""

import argparse
import asyncio
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websockets
from streamlit.proto.Alert_pb2 import Alert
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState

from benchmarks import common
from core.checkpoint import paths
from core.data import CACHE_DIR, DATA_ENV
from explorer.offpage.recipes import read_limits

ROOT = Path(__file__).resolve().parent.parent
P95_TARGET_S = 2.0
RUN_TIMEOUT_S = 60.0  # a run that has not finished by then counts as an error
PROGRESS = re.compile(r"step ([\d,]+) of ([\d,]+) · ([\d,]+) tokens/s")
FINISHED = {ForwardMsg.FINISHED_SUCCESSFULLY, ForwardMsg.FINISHED_FRAGMENT_RUN_SUCCESSFULLY,
            ForwardMsg.FINISHED_WITH_COMPILE_ERROR}  # FINISHED_EARLY_FOR_RERUN: the run it gave way to is awaited


# The server -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, env: dict, log) -> subprocess.Popen:
    """`streamlit run` in its own process group, answering only on 127.0.0.1."""
    cmd = [sys.executable, "-m", "streamlit", "run", "explorer/app.py", "--server.address", "127.0.0.1",
           "--server.port", str(port), "--server.headless", "true", "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.read() == b"ok":
                    return proc
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError("the server did not answer /_stcore/health within 60 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def proc_status(pid: int) -> tuple[float, float]:
    """(resident memory in MB, CPU seconds so far) of a process, from /proc."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss / 1024, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# One browser session ----------------------------------------------------------------------------


@dataclass
class Training:
    """What one trainer saw of its training."""
    clicked: float = 0.0
    queue_position: int = 0  # the highest place in the queue it was shown
    started: float | None = None  # first progress text with a step > 0
    finished: float | None = None
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (time, step, tokens/s)

    def steps_per_s(self) -> float | None:
        if len(self.samples) < 2 or self.samples[-1][0] == self.samples[0][0]:
            return None
        (t0, s0, _), (t1, s1, _) = self.samples[0], self.samples[-1]
        return (s1 - s0) / (t1 - t0)


class Session:
    """One browser tab: a websocket, the widgets of the page it shows, its runs' latencies."""

    def __init__(self, name: str, port: int, errors: list, latencies: list):
        self.name, self.port = name, port
        self.errors, self.latencies = errors, latencies  # shared by every session
        self.widgets: dict[str, object] = {}  # user key -> the widget's element proto (id, options)
        self.values: dict[str, WidgetState] = {}  # user key -> the state the browser holds
        self.pages: dict[str, str] = {}  # page title in lower case -> page_script_hash
        self.page_hash = ""
        self.auto_reruns: dict[str, float] = {}  # fragment id -> interval (s)
        self.texts: list[tuple[str, str]] = []  # (element kind, text) drawn since the last request
        self.training = Training()
        self.written: list[float] = []  # seconds from a click on Generate to the whole sample on the page
        self._finished: asyncio.Future | None = None
        self._ws = None

    async def connect(self) -> None:
        self._ws = await websockets.connect(f"ws://127.0.0.1:{self.port}/_stcore/stream", subprotocols=["streamlit"],
                                            origin=f"http://127.0.0.1:{self.port}", max_size=None)
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._reader.cancel()

    async def rerun(self, kind: str, fragment_id: str = "", trigger: str | None = None) -> float | None:
        """Send rerun_script with every widget's state (and a button's trigger); the seconds
        until its script_finished, also recorded under `kind`."""
        msg = BackMsg()
        state = msg.rerun_script
        state.page_script_hash = self.page_hash
        state.fragment_id, state.is_auto_rerun = fragment_id, bool(fragment_id)
        for key, value in self.values.items():
            if key in self.widgets:
                state.widget_states.widgets.append(value)
                state.widget_states.widgets[-1].id = self.widgets[key].id
        if trigger:
            state.widget_states.widgets.add(id=self.widgets[trigger].id, trigger_value=True)
        self.texts = []
        self._finished = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        try:
            await self._ws.send(msg.SerializeToString())
            await asyncio.wait_for(asyncio.shield(self._finished), RUN_TIMEOUT_S)
        except (TimeoutError, websockets.ConnectionClosed) as e:
            self.errors.append((self.name, kind, f"no script_finished: {type(e).__name__}"))
            return None
        seconds = time.perf_counter() - t0
        if fragment_id and fragment_id not in self.auto_reruns:  # the poll that saw the end redrew the page
            kind += ", last"
        self.latencies.append((kind, seconds))
        return seconds

    # What the server sends -------------------------------------------------------------------
    async def _read(self) -> None:
        try:
            async for frame in self._ws:
                msg = ForwardMsg()
                msg.ParseFromString(frame)
                self._handle(msg)
        except websockets.ConnectionClosed as e:
            if e.rcvd is None or e.rcvd.code != 1000:
                self.errors.append((self.name, "connection", f"closed: {e}"))

    def _handle(self, msg: ForwardMsg) -> None:
        kind = msg.WhichOneof("type")
        if kind == "new_session":
            self.page_hash = msg.new_session.page_script_hash
            if not msg.metadata.run.fragment_ids:  # a full run: the browser drops its polling timers
                self.auto_reruns.clear()
        elif kind == "navigation":
            self.pages = {p.page_name.lower(): p.page_script_hash for p in msg.navigation.app_pages}
        elif kind == "auto_rerun":
            self.auto_reruns[msg.auto_rerun.fragment_id] = msg.auto_rerun.interval
        elif kind == "stop_auto_rerun":
            for fragment_id in msg.stop_auto_rerun.fragment_ids:
                self.auto_reruns.pop(fragment_id, None)
        elif kind == "delta" and msg.delta.WhichOneof("type") == "new_element":
            self._element(msg.delta.new_element)
        elif (kind == "script_finished" and msg.script_finished in FINISHED and self._finished is not None
              and not self._finished.done()):
            self._finished.set_result(msg.script_finished)

    def _element(self, element) -> None:
        kind = element.WhichOneof("type")
        proto = getattr(element, kind)
        widget_id = getattr(proto, "id", "")
        if isinstance(widget_id, str) and widget_id.startswith("$$ID-"):
            self.widgets[widget_id.split("-", 2)[2]] = proto
        if kind == "exception" and not proto.is_warning:
            self.errors.append((self.name, "exception", f"{proto.type}: {proto.message}"))
        elif kind == "alert":
            if proto.format == Alert.ERROR:
                self.errors.append((self.name, "st.error", proto.body))
            self.texts.append((Alert.Format.Name(proto.format), proto.body))
        elif kind == "progress":
            self.texts.append(("progress", proto.text))

    # What a user does ----------------------------------------------------------------------------
    def choose(self, key: str, rng: random.Random) -> None:
        """Pick another option of a selectbox, radio or select_slider."""
        proto = self.widgets[key]
        value = rng.choice(list(proto.options))
        self.values[key] = (WidgetState(string_array_value={"data": [value]}) if proto.DESCRIPTOR.name == "Slider"
                            else WidgetState(string_value=value))

    def set_number(self, key: str, value: float) -> None:
        self.values[key] = WidgetState(double_value=value)

    async def open_page(self, path: str) -> None:
        self.page_hash = self.pages[path]
        self.values.clear()  # a browser unmounts the old page's widgets
        self.auto_reruns.clear()
        await self.rerun("page change")


# The two kinds of participant ------------------------------------------------------------------


async def viewer(s: Session, deadline: float, think: tuple[float, float], rng: random.Random) -> None:
    """Explores at random, as a room does once the instructor lets go: on Attention, change the
    layer, the head or the step, or (1 in 4) go to Sample; on Sample, generate with a fresh seed,
    pick a written character or go back to Attention, as likely as each other."""
    page = "attention"
    while True:
        await asyncio.sleep(min(rng.uniform(*think), max(0.0, deadline - time.monotonic())))
        if time.monotonic() >= deadline:
            return
        if rng.random() < (0.25 if page == "attention" else 1 / 3):  # leave for the other page
            page = "sample" if page == "attention" else "attention"
            await s.open_page(page)
        elif page == "attention":
            s.choose(rng.choice(["attn_layer", "attn_head", "attn_step"]), rng)
            await s.rerun("attention")
        elif "sample_pick" in s.widgets and rng.random() < 0.5:  # once something was written
            s.choose("sample_pick", rng)
            await s.rerun("pick a character")
        else:
            s.set_number("sample_seed", rng.randrange(1_000_000))
            written = await generate(s, deadline)  # it watches the text arrive
            if written is not None:
                s.written.append(written)


async def trainer(s: Session, deadline: float, steps: int) -> None:
    """Train: the default recipe for `steps` steps; Start; poll as the fragment asks until done."""
    await s.open_page("train")
    s.set_number("train_max_iters", steps)
    s.set_number("train_eval_interval", max(10, steps // 3))
    await s.rerun("train setup")
    s.training.clicked = time.monotonic()
    await s.rerun("start", trigger="train_start")
    while time.monotonic() < deadline and s.training.finished is None:
        if not s.auto_reruns:  # not polling (queued runs poll too): a full run shows the end
            await asyncio.sleep(0.2)
            continue
        await poll(s, "train poll", deadline, after=read_progress)


async def poll(s: Session, kind: str, deadline: float, after=lambda s: None, follow: set[str] | None = None) -> None:
    """Rerun the page's polling fragments, each at the interval it asks, as a browser does (the
    first at once), while any of `follow` (default: every fragment) still polls; `after(s)`
    reads each result."""
    due: dict[str, float] = {}
    while time.monotonic() < deadline:
        polling = set(s.auto_reruns) if follow is None else follow & set(s.auto_reruns)
        if not polling:
            return
        now = time.monotonic()
        for fragment_id in s.auto_reruns:
            due.setdefault(fragment_id, now)
        fragment_id = min(s.auto_reruns, key=due.__getitem__)
        await asyncio.sleep(max(0.0, due[fragment_id] - now))
        if fragment_id not in s.auto_reruns:  # a full run ended it meanwhile
            continue
        await s.rerun(kind, fragment_id=fragment_id)
        after(s)
        due[fragment_id] = time.monotonic() + s.auto_reruns.get(fragment_id, 0.0)


async def generate(s: Session, deadline: float) -> float | None:
    """Click Generate and follow the sample's own polling fragment (not the sidebar's, say) until
    it stops: the seconds from the click to the whole sample on the page, or None if it never did."""
    before = set(s.auto_reruns)
    clicked = time.monotonic()
    await s.rerun("generate", trigger="sample_generate")
    mine = set(s.auto_reruns) - before
    await poll(s, "sample poll", deadline, follow=mine)
    return None if mine & set(s.auto_reruns) else time.monotonic() - clicked


def read_progress(s: Session) -> None:
    t, now = s.training, time.monotonic()
    for kind, text in s.texts:
        place = re.search(r"number (\d+) in the queue", text)
        if place:
            t.queue_position = max(t.queue_position, int(place[1]))
        m = PROGRESS.search(text) if kind == "progress" else None
        if m and int(m[1].replace(",", "")) > 0:
            t.started = t.started or now
            t.samples.append((now, int(m[1].replace(",", "")), int(m[3].replace(",", ""))))
        if kind == "SUCCESS" and text.startswith("Finished"):
            t.finished = now


async def participant(role: str, i: int, arrival: int, port: int, args, deadline: float, shared: tuple) -> Session:
    s = Session(f"{role}{i}", port, *shared)
    await asyncio.sleep(arrival * args.stagger)  # a room does not open the page in the same millisecond
    await s.connect()
    try:
        await s.rerun("page load")
        if role == "trainer":
            await trainer(s, deadline, args.steps)
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))  # the tab stays open, its model listed
        else:
            await viewer(s, deadline, tuple(args.think), random.Random(args.seed * 1000 + i))
    except (KeyError, RuntimeError) as e:  # a widget the page never drew, say
        s.errors.append((s.name, "load script", f"{type(e).__name__}: {e}"))
    finally:
        await s.close()
    return s


async def drive(port: int, args) -> tuple[list[Session], list, list]:
    errors, latencies = [], []
    deadline = time.monotonic() + args.duration
    roles = [("trainer", i) for i in range(args.trainers)] + [("viewer", i) for i in range(args.viewers)]
    sessions = await asyncio.gather(*(participant(role, i, arrival, port, args, deadline, (errors, latencies))
                                      for arrival, (role, i) in enumerate(roles)))
    return sessions, errors, latencies


async def sample_server(pid: int, every: float, out: list) -> None:
    while True:
        out.append(proc_status(pid)[0])
        await asyncio.sleep(every)


async def run_load(port: int, pid: int, args) -> tuple:
    rss: list[float] = []
    sampler = asyncio.create_task(sample_server(pid, 1.0, rss))
    try:
        return *await drive(port, args), rss
    finally:
        sampler.cancel()


async def warm_up(port: int) -> None:
    """One session loads the model and every view's code once, as the instructor's check does."""
    s = Session("warm-up", port, [], [])
    await s.connect()
    await s.rerun("page load")
    for path in ("sample", "train", "attention"):
        await s.open_page(path)
    await s.close()


# The report --------------------------------------------------------------------------------------


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return dict(n=0, p50=None, p95=None, max=None)
    q = statistics.quantiles(xs, n=20, method="inclusive") if len(xs) > 1 else [xs[0]] * 19
    return dict(n=len(xs), p50=statistics.median(xs), p95=q[18], max=max(xs))


def summarise(sessions, errors, latencies, memory, cpu, args, cap) -> tuple[list, dict]:
    by_kind = {kind: percentiles([s for k, s in latencies if k == kind]) for kind in dict.fromkeys(k for k, _ in latencies)}
    overall = percentiles([s for _, s in latencies])
    written = percentiles([w for s in sessions for w in s.written])
    trainings = [s.training for s in sessions if s.name.startswith("trainer")]
    per_training = [dict(queued_at_most=t.queue_position, waited_s=(t.started - t.clicked) if t.started else None,
                         ran_s=(t.finished - t.started) if t.finished and t.started else None,
                         steps_per_s=t.steps_per_s(),
                         tokens_per_s=statistics.median([x for _, _, x in t.samples]) if t.samples else None,
                         finished=t.finished is not None) for t in trainings]
    finished = sum(t["finished"] for t in per_training)
    goals = {"p95_latency_s": common.goal(overall["p95"] or float("inf"), P95_TARGET_S, False),
             "errors": common.goal(len(errors), 0, False),
             "trainings_finished": common.goal(finished, len(trainings), True)}
    result = dict(benchmark="load", machine=common.machine(), viewers=args.viewers, trainers=args.trainers,
                  duration_s=args.duration, steps=args.steps, think_s=args.think, training_slots=cap,
                  latency_s=overall, latency_by_kind_s=by_kind, sample_written_s=written, errors=len(errors),
                  error_samples=errors[:10],
                  trainings=per_training, trainings_finished=finished, server=dict(**memory, **cpu), goals=goals)
    rows = [("sessions", f"{args.viewers} + {args.trainers}", f"viewers + trainers, {args.duration:.0f} s, "
             f"think {args.think[0]:g}-{args.think[1]:g} s; training slots: {cap}"),
            ("script runs", overall["n"], ""),
            ("latency p50 / p95 / max", _fmt(overall), f"s; goal p95 <= {P95_TARGET_S}: {common.verdict(goals['p95_latency_s'])}")]
    rows += [(f"  {kind}", _fmt(p), f"s, {p['n']} runs") for kind, p in by_kind.items()]
    rows += [("Generate: click to the whole sample", _fmt(written), f"s, {written['n']} samples (not a script run)")]
    rows += [("errors", len(errors), f"goal 0: {common.verdict(goals['errors'])}")]
    rows += [(f"  {name}", kind, text[:100]) for name, kind, text in errors[:5]]
    rows += [("trainings finished", f"{finished} of {len(trainings)}", f"{common.verdict(goals['trainings_finished'])}")]
    for i, t in enumerate(per_training):
        rows.append((f"  training {i}", _num(t["steps_per_s"], ".1f"), f"steps/s, {_num(t['tokens_per_s'], ',.0f')} tokens/s; "
                     f"waited {_num(t['waited_s'], '.0f')} s (queue place {t['queued_at_most']}), ran {_num(t['ran_s'], '.0f')} s"))
    rows += [("server memory: idle / peak / after", f"{memory['rss_idle_mb']:.0f} / {memory['rss_peak_mb']:.0f} / "
              f"{memory['rss_after_mb']:.0f}", f"MB; {memory['mb_per_session']:.1f} MB a session at the peak"),
             ("server CPU", f"{cpu['cores_used']:.2f}", f"cores on average ({os.cpu_count()} here); "
              f"this script {cpu['load_script_cores']:.2f}"),
             ("other processes' share of the CPU", f"{100 * cpu['others_share']:.0f}", "% (this script's own excluded)")]
    return rows, result


def _fmt(p: dict) -> str:
    return "-" if not p["n"] else f"{p['p50']:.2f} / {p['p95']:.2f} / {p['max']:.2f}"


def _num(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def server_log_errors(log_path: Path) -> list:
    """Each traceback in the server's log, by its last line (the exception)."""
    lines = log_path.read_text(errors="replace").splitlines()
    return [("server", "log", next((end for end in lines[i + 1:] if end and not end.startswith(" ")), line))
            for i, line in enumerate(lines) if line.startswith("Traceback")]


def only_model(name: str, folder: Path) -> str:
    """A folder for the picker with just this checkpoint in it (links to its two files)."""
    for path in paths(name)[:2]:
        (folder / path.name).symlink_to(path.resolve())
    return str(folder)


def measure(pid: int, port: int, args) -> tuple:
    """The load run, with the server's memory (idle, peak, after the tabs closed) and CPU."""
    idle_mb, cpu0 = proc_status(pid)
    own0 = sum(os.times()[:2])
    with common.Busy() as busy:  # CPU used by every process but this one, the server included
        sessions, errors, latencies, rss = asyncio.run(run_load(port, pid, args))
        cpu1 = proc_status(pid)[1]
    own = (sum(os.times()[:2]) - own0) / busy.wall
    time.sleep(3)  # closed tabs release their sessions
    peak = max(rss, default=idle_mb)
    memory = dict(rss_idle_mb=idle_mb, rss_peak_mb=peak, rss_after_mb=proc_status(pid)[0],
                  mb_per_session=(peak - idle_mb) / max(1, args.viewers + args.trainers))
    server_cores = (cpu1 - cpu0) / busy.wall
    cpu = dict(cores_used=server_cores, load_script_cores=own,
               others_share=max(0.0, busy.others - server_cores / (os.cpu_count() or 1)))
    return sessions, errors, latencies, memory, cpu


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--viewers", type=int, default=20)
    p.add_argument("--trainers", type=int, default=4)
    p.add_argument("--duration", type=float, default=90, help="seconds of load (default %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="steps of each training (default %(default)s)")
    p.add_argument("--think", type=float, nargs=2, default=(2.0, 8.0), metavar=("MIN", "MAX"),
                   help="a viewer's pause between actions, uniform in seconds (default 2 8)")
    p.add_argument("--stagger", type=float, default=0.3, help="seconds between two sessions' arrivals")
    p.add_argument("--max-trainings", type=int, help="the server's GPT_EXPLORER_MAX_TRAININGS (default: its own)")
    p.add_argument("--model", default=str(ROOT / "pretrained" / "full-gpu"),
                   help="the checkpoint everyone views, NAME for NAME.json + NAME.safetensors (default: "
                        "pretrained/full-gpu, the lecture's final model, 10.7M parameters)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    text = Path(os.environ.get(DATA_ENV) or CACHE_DIR / "tinyshakespeare.txt")  # never downloaded: 127.0.0.1 only
    if not text.is_file():
        sys.exit(f"error: no Tiny Shakespeare at {text}: set {DATA_ENV} to a copy of its input.txt")
    if args.max_trainings:
        os.environ["GPT_EXPLORER_MAX_TRAININGS"] = str(args.max_trainings)
    cap = read_limits()[0].max_trainings or "default"  # as the server reads the same environment
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GPT_EXPLORER_PRETRAINED=only_model(args.model, Path(tmp)), GPT_EXPLORER_DATA=str(text),
                   GPT_EXPLORER_ROOM_DIR=str(Path(tmp) / "room"))  # a room of its own: the board starts empty
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            server = start_server(port, env, log)
            try:
                asyncio.run(warm_up(port))
                sessions, errors, latencies, memory, cpu = measure(server.pid, port, args)
            finally:
                stop_server(server)
        errors += server_log_errors(log_path)
    rows, result = summarise(sessions, errors, latencies, memory, cpu, args, cap)
    common.report("Workshop load: one server, browserless sessions over Streamlit's websocket", rows, result)


if __name__ == "__main__":
    main()
