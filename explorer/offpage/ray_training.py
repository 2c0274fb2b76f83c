"""Trainings on Ray workers: a warm pool of worker processes, one per CPU of the cluster, each
training one leg at a time, so a room trains on every core of one machine or of several, and
a training that dies (out of memory, a crash in a native kernel) takes only its own worker down.

The page keeps a `RayTrainingRunner`, the same kind of object as the thread backend's
TrainingRunner: its thread waits for a slot in the server's queue, borrows a `TrainingHost`
from the server's `HostPool` and mirrors the leg's progress book a few times a second (only
what is new crosses the wire). Hosts are started with the server's first training and kept:
a room's thirty trainings pay a worker's start (a process, torch, the text) once per core, not
once each. When a leg ends (finished, stopped or failed) the weights, the optimizer state and
the record come back as safetensors and JSON bytes, never pickled modules, and the host goes
back to the pool: Resume borrows one again and starts from those bytes. A host that died or
hung is killed and replaced. Nothing here calls st.*.

    GPT_EXPLORER_RAY_ADDRESS       join this cluster (HEAD:6379) instead of starting a local one
    GPT_EXPLORER_GPU_PER_TRAINING  share of a GPU each training asks for where the cluster has
                                   GPUs (default 0.1: ten trainings share a card)
"""

import itertools
import os
import tempfile
import threading
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import ray
import torch
from ray.exceptions import RayError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from core.checkpoint import Checkpoint, checkpoint_bytes, load_checkpoint_bytes
from core.data import Corpus, load_shakespeare
from core.trainer import Record, Trainer
from explorer.offpage.recipes import RECIPES, ROOM_RECIPE, Settings, make_trainer, probe_ids, watch
from explorer.offpage.training_run import LiveTraining, Progress, ProgressBook, Runner, TrainingSlots

ADDRESS_ENV = "GPT_EXPLORER_RAY_ADDRESS"
GPU_ENV = "GPT_EXPLORER_GPU_PER_TRAINING"
DEFAULT_GPU_SHARE = 0.1
# Trainings yield the CPU to the server's pages and to the sampling worker, which Ray starts,
# as every worker, at nice 15 (RAY_worker_niceness): the lowest priority there is.
WORKER_NICE = 19
POLL_S = 0.5  # how often the page side asks its worker for news
STOP_GRACE_S = 30.0  # a stopped training whose worker has not answered by then is killed
WARM_UP_STEPS = 10  # a host's first leg, cold, ran slower than the ones after it (benchmarks/README.md, the room)

ROOT = Path(__file__).resolve().parents[2]  # workers import core and explorer from here, on every machine
_start_lock = threading.Lock()
_start: tuple[threading.Event, list] | None = None  # (set once Ray is up or failed, the failure)


def prepare(hosts: int | None = None, num_cpus: int | None = None) -> threading.Event:
    """Start Ray in the background and then warm `hosts` hosts (None: one per CPU of the
    cluster); returns at once, with an event set once Ray is up or could not start. A server on
    Ray calls it at its first page view, so the room's Start finds the workers up. Joins
    GPT_EXPLORER_RAY_ADDRESS, or starts a local instance with a worker per core (or num_cpus).

    ray.init runs on a thread of its own that lives as long as Ray does: Ray's local daemons
    die with the thread that started them (Linux's PR_SET_PDEATHSIG), and a script run's thread
    ends with the run."""
    global _start
    with _start_lock:
        if _start is None or (_start[0].is_set() and not ray.is_initialized()):  # never, failed, or shut down since
            HOSTS.clear()  # hosts of an earlier Ray instance are gone
            _start = (threading.Event(), [])
            threading.Thread(target=_keep_ray, args=(num_cpus, hosts, *_start), name="gpt-explorer-ray",
                             daemon=True).start()
        return _start[0]


def start_ray(num_cpus: int | None = None) -> None:
    """Ray up, started here if need be: raises what kept it from starting."""
    prepare(num_cpus=num_cpus).wait()
    failure = _start[1]
    if failure:
        raise failure[0]


def _keep_ray(num_cpus: int | None, hosts: int | None, started: threading.Event, failure: list) -> None:
    _release_the_first_core()  # an instance shut down a moment ago: its daemons must not inherit one core
    try:
        job = ray.job_config.JobConfig(code_search_path=[str(ROOT)])
        address = os.environ.get(ADDRESS_ENV)
        if address:
            ray.init(address=address, log_to_driver=False, job_config=job)
        else:
            # "local": a new instance of the app's own, even where another one runs on this machine
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     log_to_driver=False, job_config=job)
    except Exception as e:  # told to the caller: the Start that asked for Ray says why it cannot
        failure.append(e)
        return
    finally:
        started.set()
    HOSTS.warm(min(hosts or cluster_cpus(), cluster_cpus()))
    while ray.is_initialized():
        time.sleep(1.0)
    _release_the_first_core()


def cluster_cpus() -> int:
    """Training slots: one per CPU of the cluster, as it is now."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def gpu_per_training() -> float:
    """The GPU share each training asks for: none where the cluster has no GPU."""
    if not ray.cluster_resources().get("GPU"):
        return 0.0
    try:
        share = float(os.environ.get(GPU_ENV, DEFAULT_GPU_SHARE))
    except ValueError:
        share = DEFAULT_GPU_SHARE
    return share if 0 < share <= 1 else DEFAULT_GPU_SHARE


@lru_cache(maxsize=4)
def _shakespeare(block_size: int) -> Corpus:
    return Corpus(load_shakespeare(), block_size)  # read on the worker's machine, once: only the settings travel


class Leg:
    """One leg of one training in a worker process: built from the settings and the text, or
    from the bytes of the leg before (Resume)."""

    def __init__(self, settings: Settings, text: str | None, watch: dict, resume: tuple[bytes, bytes, bytes] | None,
                 iters: int):
        self.settings, self.text, self.watch, self.resume = settings, text, watch, resume
        self.book = ProgressBook(Progress(status="running", iters=iters, max_iters=settings.max_iters))
        self.trainer: Trainer | None = None
        self._stop = threading.Event()

    def train(self) -> tuple[bytes, bytes, bytes] | None:
        """Train to the end or a stop; the weights, the description and the optimizer state,
        or None when there is nothing to keep (diverged, or it could not start)."""
        try:
            trainer = self._build()
        except Exception as e:  # settings or text this worker cannot train: said in the session
            self.book.set(status="failed", message=f"cannot start: {type(e).__name__}: {e}")
            return None
        self.trainer = trainer
        if self._stop.is_set():
            trainer.request_stop()
        probe = probe_ids(trainer.corpus, trainer.config.block_size)
        LiveTraining(trainer, self.book, probe, **self.watch).run()
        if trainer.diverged:
            return None
        weights, meta = checkpoint_bytes(trainer.model, trainer.corpus.tokenizer, trainer.train_config, trainer.record)
        return weights, meta, save_tensors({k: v.contiguous() for k, v in trainer.state_tensors().items()})

    def stop(self) -> None:
        self._stop.set()
        if self.trainer is not None:
            self.trainer.request_stop()

    def _build(self) -> Trainer:
        if self.resume is None:
            return make_trainer(self.settings, self.text, _shakespeare)
        weights, meta, state = self.resume
        ckpt = load_checkpoint_bytes(weights, meta)
        config = ckpt.model.config
        corpus = _shakespeare(config.block_size) if self.text is None else Corpus(self.text, config.block_size,
                                                                                    ckpt.tokenizer)
        trainer = Trainer(config, ckpt.train_config, corpus, model=ckpt.model)
        trainer.record = ckpt.record
        trainer.load_state_tensors(load_tensors(state))
        return trainer


def take_a_core() -> None:
    """Pin this process to a core that no other training host on this machine holds, if one is
    left (Linux): the scheduler otherwise moves a training between cores as the server's threads
    come and go, and each move starts it on cold caches (benchmarks/README.md, the room). The
    lock is the machine's: hosts start together."""
    if not hasattr(os, "sched_setaffinity"):
        return
    import fcntl  # Unix only, as sched_setaffinity is Linux only

    with open(Path(tempfile.gettempdir()) / "gpt-explorer-cores.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        taken = set()
        for pid in _other_hosts():
            try:
                cores = os.sched_getaffinity(pid)
            except OSError:  # gone meanwhile
                continue
            if len(cores) == 1:
                taken |= cores
        free = sorted(os.sched_getaffinity(0) - taken)
        if free:
            _pin({free[0]})


_unpinned: set[int] | None = None  # the server's cores before it kept to the first one
_pin_lock = threading.Lock()  # every session's first page view may ask at once


def keep_to_the_first_core() -> None:
    """The app's server keeps to the first core while Ray runs (Linux): the first training host
    shares that core with it, the sampling worker the last (keep_to_the_last_core), and every
    other host has one nobody else wakes on (each wake-up leaves a training cold caches:
    benchmarks/README.md, the room). The pages lose nothing: the server is one interpreter, its
    torch on one thread. Called once Ray is up (its daemons, started from this process, keep
    every core for the workers they start); undone when Ray shuts down."""
    global _unpinned
    with _pin_lock:
        if _unpinned is not None or not hasattr(os, "sched_setaffinity") or not ray.is_initialized():
            return
        _unpinned = os.sched_getaffinity(0)
        _pin({min(_unpinned)})


def keep_to_the_last_core() -> None:
    """The sampling worker's place (Linux): beside the last training host, which yields to it, and
    off the server's core, whose script runs come in bursts as a room samples (beside them the
    room's samples took three times as long: benchmarks/README.md, the room)."""
    if hasattr(os, "sched_setaffinity"):
        _pin({max(os.sched_getaffinity(0))})


def _release_the_first_core() -> None:
    global _unpinned
    with _pin_lock:
        if _unpinned is not None:
            _pin(_unpinned)
            _unpinned = None


def _pin(cores: set[int]) -> None:
    """Every thread of this process, Ray's too; threads started later inherit it from theirs."""
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), cores)
        except OSError:  # ended meanwhile
            pass


def _other_hosts() -> list[int]:
    """The pids of this machine's other training hosts (Ray names its actor processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::TrainingHost"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


class TrainingHost:
    """A warm worker process that trains legs one after another (one at a time: the pool lends
    it to one training). Its methods run on a few threads (a threaded actor), so progress and
    stop are answered while `train` runs; a stop may even arrive before its leg does."""

    def __init__(self):
        os.nice(max(0, WORKER_NICE - os.nice(0)))  # Ray may have niced its workers already
        torch.set_num_threads(1)  # one core a training: the slots count cores
        take_a_core()
        self.legs: dict[int, Leg] = {}
        self._early_stops: set[int] = set()
        self._warm_up()

    @staticmethod
    def _warm_up() -> None:
        """A few steps of the room's recipe, watched as a training is, before the host is lent
        (it starts at the server's first page view): the text is read and encoded, and torch's
        first calls are made, here and not in the first participant's training."""
        settings = replace(RECIPES[ROOM_RECIPE][1], max_iters=WARM_UP_STEPS)
        Leg(settings, None, watch(settings.eval_interval), None, 0).train()

    def pid(self) -> int:
        return os.getpid()

    def train(self, leg_id: int, *leg) -> tuple[bytes, bytes, bytes] | None:
        self.legs[leg_id] = current = Leg(*leg)
        if leg_id in self._early_stops:
            current.stop()
        return current.train()

    def progress_since(self, leg_id: int, cursor):
        """The leg's news since the cursor, or None before the leg has arrived."""
        leg = self.legs.get(leg_id)
        return None if leg is None else leg.book.since(cursor)

    def stop(self, leg_id: int) -> None:
        if leg_id in self.legs:
            self.legs[leg_id].stop()
        else:
            self._early_stops.add(leg_id)

    def forget(self, leg_id: int) -> None:
        """The leg's news has been read: its model and optimizer state may go."""
        self.legs.pop(leg_id, None)
        self._early_stops.discard(leg_id)


class HostPool:
    """The server's warm hosts, started with its first training: as many as trainings may run
    at once. `borrow` gives a free one (or starts one); `give_back` keeps it for the next
    training, or kills it when it died or hung (the next borrow starts a fresh one)."""

    def __init__(self):
        self._free: list = []
        self._lock = threading.Lock()
        self._leg_ids = itertools.count()

    @property
    def idle(self) -> int:
        """Hosts started and not lent."""
        return len(self._free)

    def warm(self, n: int) -> None:
        """Start hosts until n exist or are free (their processes start in the background)."""
        with self._lock:
            while len(self._free) < n:
                self._free.append(self._start())

    def borrow(self) -> tuple[object, int]:
        """A host and a new leg id for it."""
        with self._lock:
            host = self._free.pop() if self._free else self._start()
            return host, next(self._leg_ids)

    def give_back(self, host, healthy: bool) -> None:
        if not healthy:
            ray.kill(host)
            return
        with self._lock:
            self._free.append(host)

    def clear(self) -> None:
        """Forget every free host (Ray was shut down: they are gone)."""
        with self._lock:
            self._free.clear()

    @staticmethod
    def _start():
        options = dict(num_cpus=1, num_gpus=gpu_per_training(), max_concurrency=4)
        return ray.remote(TrainingHost).options(**options).remote()


HOSTS = HostPool()


class RayTrainingRunner(Runner):
    """The page's side of a training on a Ray worker: the interface of TrainingRunner."""

    def __init__(self, settings: Settings, text: str | None, vocab_size: int, slots: TrainingSlots,
                 name: str = "training", step_ms: float | None = None, **watch):
        super().__init__(slots, name, settings.max_iters, step_ms)
        start_ray()  # up since the server's first page view (or started now, for a caller of its own)
        self.settings, self.watch = settings, watch
        self.config, self.train_config = settings.model_config(vocab_size), settings.train_config()
        self._text = ray.put(text) if text is not None else None  # sent to the cluster once, for every leg
        self._files: tuple[bytes, bytes, bytes] | None = None  # the last leg's weights, description, state
        self._checkpoint: Checkpoint | None = None
        self._lost = False
        self._actor = None  # the host training this runner's leg, while it does
        self._leg = -1
        self._killed = False  # the host was killed for not obeying a stop
        self._stopped_at: float | None = None

    @property
    def record(self) -> Record:
        return self._checkpoint.record if self._checkpoint is not None else Record()

    @property
    def weights_lost(self) -> bool:
        """Nothing to resume or publish: the loss diverged, or the worker died with the weights."""
        return self._lost

    def checkpoint(self) -> Checkpoint:
        ckpt = self._checkpoint
        return Checkpoint(ckpt.model, ckpt.tokenizer, ckpt.train_config, ckpt.record, self.name)

    def checkpoint_files(self) -> tuple[bytes, bytes]:
        return self._files[0], self._files[1]

    def _request_stop(self) -> None:
        self._stopped_at = time.monotonic()
        actor = self._actor
        if actor is not None:
            actor.stop.remote(self._leg)

    def _train(self) -> None:
        host, leg = HOSTS.borrow()
        watch = {**self.watch, "reporter": self.room_reporter}  # the room's reporter is plain data: it travels
        done = host.train.remote(leg, self.settings, self._text, watch, self._files, self.record.iters)
        self._actor, self._leg = host, leg
        if self._stop.is_set():  # a stop that came before the host was lent
            host.stop.remote(leg)
        healthy, self._killed = True, False
        try:
            files, last = self._follow(host, leg, done)
            if files is None:  # diverged, or could not start
                self._lost = True
            else:
                self._files, self._checkpoint = files, load_checkpoint_bytes(files[0], files[1], name=self.name)
            self.book.merge(last)  # the end is told once its weights are here
            host.forget.remote(leg)
        except RayError as e:
            healthy = False
            self._lost = True
            self.book.set(status="failed", message=f"the worker running this training stopped: {why_stopped(e)}. "
                                                   "Reset to start again.")
        finally:
            self._actor = None
            HOSTS.give_back(host, healthy and not self._killed)

    def _follow(self, host, leg: int, done) -> tuple[tuple[bytes, bytes, bytes] | None, Progress]:
        """Mirror the leg's progress until it ends; then what the leg returned, and the last
        news, not yet merged."""
        mine = self.book.snapshot()
        last = mine.snapshots[-1][0] if mine.snapshots else -1
        cursor = (0, 0, 0, last, mine.head_scores[-1]["iter"] if mine.head_scores else -1)
        while True:
            ended = bool(ray.wait([done], timeout=0)[0])
            news = host.progress_since.remote(leg, cursor)
            while not ray.wait([news], timeout=POLL_S)[0]:  # the host is starting (or stuck)
                self._kill_if_unresponsive(host)
            answer = ray.get(news)
            if answer is not None:  # the leg has arrived (it has, once it has ended)
                progress, cursor = answer
                if ended:
                    return ray.get(done), progress
                self.book.merge(replace(progress, status="running"))  # not finished before the weights are back
            ray.wait([done], timeout=POLL_S)
            self._kill_if_unresponsive(host)

    def _kill_if_unresponsive(self, host) -> None:
        """A stop not obeyed in STOP_GRACE_S (a host that never started, a hung kernel) frees
        the slot anyway: the host is killed (the pool starts a fresh one when needed)."""
        if self._stop.is_set() and self._stopped_at is not None and time.monotonic() - self._stopped_at > STOP_GRACE_S:
            self._killed = True
            ray.kill(host)


def why_stopped(error: Exception) -> str:
    """Ray's explanation in a few words: "its worker process has died", "it was killed by
    `ray.kill`", or the error's first line."""
    text = str(error)
    marker = "The actor is dead because "
    if marker in text:
        return text.split(marker, 1)[1].split(". ", 1)[0].split("\n", 1)[0].rstrip(".")
    return text.strip().split("\n", 1)[0].rstrip(".")
