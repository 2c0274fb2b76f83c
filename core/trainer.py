"""The training engine shared by the command line, the app and the tests.

A `Trainer` owns a model, its optimizer and the random state of its batches. A caller drives
it in pieces (`run(n)`), reads metrics, and may ask it to stop between steps. It never
prints and knows nothing of any user interface.

Under torchrun (see core.distributed) the same Trainer runs in every process: each process
draws its own batches (seeded with seed + rank), DistributedDataParallel averages the
gradients, and only rank 0 estimates the loss.
"""

import contextlib
import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass, fields, replace

import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel

from .data import Corpus
from .distributed import in_process_group, mean_over_ranks, rank_and_world_size
from .model import GPT, GPTConfig
from .tokenizer import CharTokenizer

PRECISIONS = ("auto", "float32", "bfloat16")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


@dataclass
class TrainConfig:
    batch_size: int = 32  # sequences per micro-step, in each process
    grad_accum_steps: int = 1  # micro-steps whose gradients add up to one optimizer step
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4  # the schedule ends here
    warmup_iters: int = 100
    # After the warmup, "cosine" decays to min_lr at max_iters; "wsd" (warmup-stable-decay)
    # holds learning_rate, then decays linearly to min_lr over the last decay_frac of the steps.
    schedule: str = "cosine"
    decay_frac: float = 0.2
    # Ramps: the batch size and the sequence length grow linearly from a quarter of theirs to the
    # whole over the first so many steps (0: no ramp).
    batch_ramp_iters: int = 0
    seq_ramp_iters: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 turns clipping off
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337
    threads: int | None = None  # torch intra-op threads; None leaves the process setting alone
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    # "bfloat16": matmuls in bfloat16 under torch.autocast (weights and optimizer state stay
    # float32); "auto": bfloat16 where the hardware has bfloat16 matmuls, else "float32".
    precision: str = "auto"
    # "muon": Muon for the blocks' weight matrices (at muon_lr), AdamW for the rest, as
    # modded-nanogpt and nanochat do; both follow the one schedule.
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    muon_ns_steps: int = 5  # Newton-Schulz iterations of each Muon update: fewer are cheaper, less orthogonal

    def __post_init__(self):
        for name in ("batch_size", "grad_accum_steps", "max_iters", "eval_interval", "eval_iters", "muon_ns_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(f"min_lr must be between 0 and learning_rate ({self.learning_rate}), got {self.min_lr!r}")
        if min(self.warmup_iters, self.batch_ramp_iters, self.seq_ramp_iters, self.weight_decay, self.grad_clip) < 0:
            raise ValueError("warmup_iters, the ramps, weight_decay and grad_clip must not be negative")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.decay_frac <= 1:
            raise ValueError(f"decay_frac must be between 0 and 1, got {self.decay_frac!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (self.muon_lr > 0 and math.isfinite(self.muon_lr)):
            raise ValueError(f"muon_lr must be a positive number, got {self.muon_lr!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def lr_at(self, it: int) -> float:
        """Linear warmup, then the schedule's decay from learning_rate to min_lr at max_iters."""
        if it < self.warmup_iters:
            return self.learning_rate * (it + 1) / (self.warmup_iters + 1)
        if it >= self.max_iters:
            return self.min_lr
        start = self.warmup_iters
        if self.schedule == "wsd":
            start = max(start, self.max_iters - round(self.decay_frac * self.max_iters))
            if it < start:
                return self.learning_rate
        progress = (it - start) / max(1, self.max_iters - start)
        if self.schedule == "wsd":
            return self.learning_rate + progress * (self.min_lr - self.learning_rate)
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.learning_rate - self.min_lr)

    def batch_at(self, it: int) -> int:
        return _ramp(self.batch_size, it, self.batch_ramp_iters)

    def seq_at(self, it: int, block_size: int) -> int:
        return _ramp(block_size, it, self.seq_ramp_iters)


@dataclass
class Record:
    """What a model has been through: it travels with its checkpoint."""
    iters: int = 0
    tokens: int = 0
    seconds: float = 0.0
    train_loss: float | None = None  # the last estimates
    val_loss: float | None = None


class Trainer:
    """Trains one model on one corpus, a few steps at a time."""

    def __init__(self, model_config: GPTConfig, train_config: TrainConfig, corpus: Corpus,
                 model: GPT | None = None):
        if corpus.tokenizer.vocab_size != model_config.vocab_size:
            raise ValueError(f"the model's vocab_size ({model_config.vocab_size}) differs from the "
                             f"corpus vocabulary ({corpus.tokenizer.vocab_size} characters)")
        self.config, self.train_config, self.corpus = model_config, train_config, corpus
        if train_config.threads:
            torch.set_num_threads(train_config.threads)
        self.device = _pick_device(train_config.device)
        self.rank, self.world_size = rank_and_world_size()
        if model is None:
            with torch.random.fork_rng():
                torch.manual_seed(train_config.seed)
                model = GPT(model_config)
        self.model = model.to(self.device)  # the plain GPT: evaluate, sample and save this one
        # In a process group, training steps go through DDP, which averages gradients in backward.
        # The model's only buffers are its constant causal masks: no need to broadcast them.
        self.ddp = DistributedDataParallel(self.model, broadcast_buffers=False) if in_process_group() else None
        self.optimizer = _make_optimizer(self.model, train_config, self.device)
        self.batch_rng = torch.Generator().manual_seed(train_config.seed + self.rank)
        self.record = Record()
        self.history: list[dict] = []  # one row per step, plus eval rows
        self.stop_reason: str | None = None
        self.diverged = False  # the loss stopped being finite: the weights are lost
        self.lock = threading.Lock()  # held while steps change the weights: hold it to copy them whole
        self._stop = threading.Event()

    # Driving -------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.stop_reason is not None or self.record.iters >= self.train_config.max_iters

    def request_stop(self) -> None:
        """Ask the trainer to stop before its next step (safe from any thread). The request
        holds until a step sees it, so one made between two calls of run() is not lost."""
        self._stop.set()

    def run(self, n_steps: int) -> list[dict]:
        """Take up to n_steps optimizer steps; return their metrics rows.

        Stops early at max_iters, on request, or when the loss is no longer finite. Losses
        stay on the device until the end of the call, so the host syncs once per call.
        """
        cfg = self.train_config
        if self.diverged:
            return []  # more steps on NaN weights cannot help
        self.stop_reason = None  # why an earlier call stopped; this call decides anew
        losses, lrs, tokens, times = [], [], [], []
        self.model.train()
        start_iter = self.record.iters
        t0 = time.perf_counter()
        # Dropout draws from torch's global generator: seed it per step, and give it back after.
        with self.lock, torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            while len(losses) < n_steps and self.record.iters < cfg.max_iters:
                if self._stop.is_set():
                    self._stop.clear()
                    self.stop_reason = "stopped on request"
                    break
                self._seed_dropout(_step_seed(cfg.seed + self.rank, self.record.iters))
                lrs.append(cfg.lr_at(self.record.iters))
                tokens.append(self.tokens_at(self.record.iters))
                losses.append(self._step(self.record.iters, lrs[-1]))
                times.append(time.perf_counter())
                self.record.iters += 1
                self.record.tokens += tokens[-1]
        rows = self._rows(start_iter, losses, lrs, tokens, t0, times)
        self.record.seconds += (times[-1] - t0) if times else 0.0
        self.history.extend(rows)
        limit = divergence_limit(self.config.vocab_size)
        bad = next((r for r in rows if not r["loss"] <= limit), None)  # NaN compares false
        if bad is not None:
            self._diverge("the loss", bad["loss"], bad["iter"])
        elif self.record.iters >= cfg.max_iters and self.stop_reason is None:
            self.stop_reason = f"reached max_iters ({cfg.max_iters})"
        return rows

    def tokens_at(self, it: int) -> int:
        """Tokens in optimizer step `it`, over every micro-step and every process."""
        cfg = self.train_config
        return cfg.batch_at(it) * cfg.grad_accum_steps * self.world_size * cfg.seq_at(it, self.config.block_size)

    def _seed_dropout(self, seed: int) -> None:
        """Seed the generator dropout draws from on this device. Not torch.manual_seed: that also
        queues a seed for every CUDA device, capturing a traceback each time, which cost a small
        model's step several percent on a CPU."""
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def _step(self, it: int, lr: float) -> torch.Tensor:
        """Optimizer step `it` on grad_accum_steps training batches; returns their mean loss
        (still on the device)."""
        cfg = self.train_config
        batch, seq = cfg.batch_at(it), cfg.seq_at(it, self.config.block_size)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr / cfg.learning_rate
        self.optimizer.zero_grad(set_to_none=True)
        model = self.ddp if self.ddp is not None else self.model
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum_steps):
            x, y = self.corpus.get_batch("train", batch, seq, self.batch_rng)
            with self._grad_sync(micro == cfg.grad_accum_steps - 1):
                with self._autocast():  # the forward only, as torch.autocast asks
                    _, loss = model(x.to(self.device), y.to(self.device))
                # Each micro-batch's mean loss, scaled so the summed gradients are those of the mean.
                (loss / cfg.grad_accum_steps).backward()
            total += loss.detach()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        return total / cfg.grad_accum_steps

    def _grad_sync(self, last_micro_step: bool):
        """DDP averages gradients across processes in every backward; before the last
        micro-step that exchange is wasted, so no_sync() skips it."""
        if self.ddp is None or last_micro_step:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def _rows(self, start_iter, losses, lrs, tokens, t0, times) -> list[dict]:
        # One collective per call: every rank logs the loss of all ranks' batches, and so
        # agrees on divergence and stops at the same step.
        values = mean_over_ranks(torch.stack(losses)).float().cpu().tolist() if losses else []
        rows, prev = [], t0
        for i, (loss, lr, n, t) in enumerate(zip(values, lrs, tokens, times)):
            dt = t - prev
            prev = t
            rows.append(dict(iter=start_iter + i + 1, loss=loss, lr=lr, ms_per_iter=1000 * dt,
                             tokens_per_s=n / dt if dt > 0 else float("nan")))
        return rows

    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over eval_iters batches of each split. The batches are the same at every
        call (a fixed seed), so successive estimates differ only because the model did."""
        cfg = self.train_config
        was_training = self.model.training
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            rng = torch.Generator().manual_seed(cfg.seed + 1)
            total = torch.zeros((), device=self.device)
            for _ in range(cfg.eval_iters):
                x, y = self.corpus.get_batch(split, cfg.batch_size, self.config.block_size, rng)
                with self._autocast():
                    total += self.model(x.to(self.device), y.to(self.device))[1]
            out[split] = (total / cfg.eval_iters).item()
        self.model.train(was_training)
        self.record.train_loss, self.record.val_loss = out["train"], out["val"]
        self.history.append(dict(iter=self.record.iters, train_loss=out["train"], val_loss=out["val"]))
        if not out["val"] <= divergence_limit(self.config.vocab_size):
            self._diverge("the estimated val loss", out["val"], self.record.iters)
        return out

    def _diverge(self, what: str, loss: float, step: int) -> None:
        above = "" if math.isnan(loss) else f", far above the {math.log(self.config.vocab_size):.2f} of guessing uniformly"
        self.diverged = True
        self.stop_reason = (f"{what} became {loss:.4g} at step {step}{above}: training diverged. "
                            f"Try a lower learning rate (now {self.train_config.learning_rate:g}).")

    def train(self, on_step=None, on_eval=None, chunk: int = 10, pause_every: tuple[int, ...] = ()) -> Record:
        """Run to max_iters (or a stop), evaluating every eval_interval steps and at the end.

        The one training loop: the command line, the app's live runs and the workers all drive
        it, and watch it through callbacks (as minGPT's Trainer does). on_step(rows) comes after
        every chunk of at most `chunk` steps; chunks also end at every multiple of each period
        in pause_every, so a caller can sample or look inside the model there. on_eval(losses)
        comes after each evaluation. A call after a stop carries on (Resume)."""
        cfg = self.train_config
        if not self.diverged:
            self.stop_reason = None  # why an earlier call stopped; this call decides anew
        if self.record.iters == 0:
            self._eval(on_eval)
        evaluated_at = self.record.iters
        periods = [cfg.eval_interval, *(p for p in pause_every if p)]
        while not self.done:
            it = self.record.iters
            rows = self.run(min([chunk] + [p - it % p for p in periods]))
            if on_step:
                on_step(rows)
            # A stop may end a run between eval points, or before its first step: eval each step count once.
            if self.record.iters != evaluated_at and (self.record.iters % cfg.eval_interval == 0 or self.done):
                self._eval(on_eval)
                evaluated_at = self.record.iters
        return self.record

    def _eval(self, on_eval):
        # Only rank 0 evaluates. estimate_loss holds no collective, so the other ranks go on
        # and wait for rank 0 inside their next step's gradient exchange.
        if self.diverged or self.rank != 0:
            return
        losses = self.estimate_loss()
        if on_eval:
            on_eval(losses)

    def history_frame(self) -> pd.DataFrame:
        """The history as one DataFrame: step rows have loss, eval rows train_loss and val_loss."""
        cols = ["iter", "loss", "lr", "ms_per_iter", "tokens_per_s", "train_loss", "val_loss"]
        return pd.DataFrame(self.history, columns=cols)

    @property
    def bf16(self) -> bool:
        """Whether training runs its matmuls in bfloat16 (see TrainConfig.precision)."""
        precision = self.train_config.precision
        return precision == "bfloat16" or (precision == "auto" and fast_bf16(self.device))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # State for checkpoints -----------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Optimizer moments and the batch sampler's state as named tensors, so a run can resume
        exactly. Dropout needs no state: run() seeds it from the seed and the step."""
        tensors = {"rng.batch": self.batch_rng.get_state()}
        names = {p: n for n, p in self.model.named_parameters()}
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                tensors[f"optim.{names[p]}.{key}"] = torch.as_tensor(value).detach().cpu()
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the state that state_tensors() saved. Every tensor is checked first (ValueError):
        a moment of the wrong size made the fused AdamW step crash the process."""
        _check_state(tensors, dict(self.model.named_parameters()), self.batch_rng.get_state(), self.optimizer.keys)
        if self.world_size == 1:
            self.batch_rng.set_state(tensors["rng.batch"])
        else:  # only rank 0's sampler was saved: each rank starts a stream of its own instead
            self.batch_rng.manual_seed(_step_seed(self.train_config.seed + self.rank, self.record.iters))
        params = dict(self.model.named_parameters())
        for name, value in tensors.items():
            if name.startswith("optim."):
                pname, key = name[len("optim."):].rsplit(".", 1)
                self.optimizer.state_of(params[pname])[key] = value.to(self.device)


def _ramp(full: int, it: int, iters: int) -> int:
    """A quarter of full at step 0, growing linearly to full at step iters."""
    if it >= iters:
        return full
    return max(1, round(full * (1 + 3 * it / iters) / 4))


def divergence_limit(vocab_size: int) -> float:
    """A loss above this means training diverged. Guessing uniformly scores ln(vocab_size), and
    every untrained model starts there (4.125-4.130 for every preset with 65 characters);
    measured on every preset at lr 3e-3 and 1e-2, no step ever rose above it. At lr 10 the loss
    went to 30-1.7e11 (the bigram model alone peaked at 10.7, 2.6 x ln 65, and recovered):
    three times ln(vocab_size), plus 1 for tiny vocabularies, lies between."""
    return 3 * math.log(vocab_size) + 1


# What each optimizer keeps for a parameter; the moments that may be negative.
OPTIMIZER_KEYS = {"AdamW": ("step", "exp_avg", "exp_avg_sq"), "Muon": ("momentum_buffer",)}
SIGNED_KEYS = ("exp_avg", "momentum_buffer")


def _check_state(tensors: dict, params: dict[str, torch.Tensor], rng_state: torch.Tensor,
                 keys: dict[torch.Tensor, tuple[str, ...]]) -> None:
    """keys: the state each parameter's optimizer keeps (Optimizers.keys)."""
    rng = tensors.get("rng.batch")
    if not (isinstance(rng, torch.Tensor) and rng.dtype == rng_state.dtype and rng.shape == rng_state.shape):
        raise ValueError(f"rng.batch must hold the batch sampler's state ({rng_state.numel():,} bytes)")
    try:
        torch.Generator().set_state(rng)
    except RuntimeError as e:  # "Invalid mt19937 state"
        raise ValueError(f"rng.batch is not a random generator's state: {e}") from e
    kept: dict[str, set] = {}
    for name, value in tensors.items():
        if name == "rng.batch":
            continue
        pname, _, key = name.removeprefix("optim.").rpartition(".")
        if not name.startswith("optim.") or pname not in params or key not in keys[params[pname]]:
            raise ValueError(f"{name} is not optimizer state of this model")
        want = () if key == "step" else tuple(params[pname].shape)
        if value.dtype != torch.float32 or tuple(value.shape) != want:
            raise ValueError(f"{name} must be float32 of shape {want}, got {value.dtype} of shape {tuple(value.shape)}")
        signed = key in SIGNED_KEYS
        if not bool(torch.isfinite(value).all()) or (not signed and bool((value < 0).any())):
            raise ValueError(f"{name} holds {'NaN or infinite' if signed else 'NaN, infinite or negative'} values")
        kept.setdefault(pname, set()).add(key)
    partial = next((p for p, got in kept.items() if len(got) < len(keys[params[p]])), None)
    if partial is not None:
        raise ValueError(f"the optimizer state of {partial} lacks {sorted(set(keys[params[partial]]) - kept[partial])}")


def _step_seed(seed: int, it: int) -> int:
    """Dropout's seed at step `it`: the masks depend on the run's seed and the step alone, so two
    runs with one seed, or a run and its resumed copy, draw the same masks."""
    return (seed * 1_000_003 + it) % 2**63


def fast_bf16(device: torch.device) -> bool:
    """A GPU, or a CPU with bfloat16 matmul instructions (AVX-512 BF16 or AMX) that torch may use:
    ATEN_CPU_CAPABILITY=avx2 (with oneDNN held to AVX2, how an AVX2 machine is emulated) leaves
    the instructions there but unused. Elsewhere a CPU emulates bfloat16, slower than float32."""
    if device.type == "cuda":
        return True
    caps = torch.cpu.get_capabilities()
    usable = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return usable and bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan): SGD with Nesterov momentum whose update of each weight matrix is
    orthogonalized by a quintic Newton-Schulz iteration. torch.optim.Muon runs that iteration in
    bfloat16, which a CPU without bfloat16 instructions emulates very slowly; this one runs it in
    the weights' dtype. Same state as torch's: a momentum_buffer per matrix."""

    def __init__(self, params, lr: float, momentum: float = 0.95, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = _orthogonalize(p.grad.add(buf, alpha=group["momentum"]), group["ns_steps"])
                # Keller's scale: a tall matrix's orthogonal update has the RMS of a square one's.
                p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def _orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g, roughly (torch.optim.Muon's coefficients)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.size(0) > g.size(1) else g  # the Gram matrix of the short side is the cheaper
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.size(0) > g.size(1) else x


class Optimizers:
    """Several optimizers, each over its own parameters, stepped as one. Every group keeps its
    peak learning rate as base_lr; the trainer scales them all by the schedule."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = [o for o in optimizers if o.param_groups]
        for group in self.param_groups:
            group["base_lr"] = group["lr"]
        self._owner = {p: o for o in self.optimizers for g in o.param_groups for p in g["params"]}

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def state_of(self, param: torch.Tensor) -> dict:
        return self._owner[param].state[param]

    @property
    def keys(self) -> dict[torch.Tensor, tuple[str, ...]]:
        return {p: OPTIMIZER_KEYS[type(o).__name__] for p, o in self._owner.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def _make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> Optimizers:
    # nanoGPT's rule: decay the weight matrices and embeddings, not biases or LayerNorm gains.
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Muon orthogonalizes the update of a hidden weight matrix; embeddings and lm_head are not
    # hidden layers and stay with AdamW (Keller Jordan's Muon notes).
    muon = [p for n, p in named if cfg.optimizer == "muon" and p.dim() == 2 and n.startswith("blocks.")]
    rest = [p for _, p in named if not any(p is q for q in muon)]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                              betas=(cfg.beta1, cfg.beta2), fused=True)
    return Optimizers([adamw, *([Muon(muon, lr=cfg.muon_lr, ns_steps=cfg.muon_ns_steps)] if muon else [])])


def timing_trainer(model_config: GPTConfig, train_config: TrainConfig, max_iters: int) -> Trainer:
    """A Trainer of this shape and these settings on random characters: to time, not to learn."""
    chars = [chr(0x4E00 + i) for i in range(model_config.vocab_size)]  # any vocab_size distinct characters
    ids = torch.randint(len(chars), (20 * (model_config.block_size + 1),), generator=torch.Generator().manual_seed(0))
    corpus = Corpus("".join(chars[i] for i in ids.tolist()), model_config.block_size, CharTokenizer(chars))
    return Trainer(model_config, replace(train_config, max_iters=max_iters), corpus)


def time_step(model_config: GPTConfig, train_config: TrainConfig, budget_s: float = 0.5, steps: int = 5) -> float:
    """Milliseconds of one real optimizer step of this shape on this machine (Trainer._step: the
    same autocast, clipping and optimizers as a training), on random characters. The median of
    up to `steps` steps after one to warm up, fewer once they take budget_s in all."""
    trainer = timing_trainer(model_config, train_config, steps + 1)
    trainer.run(1)
    times, start = [], time.perf_counter()
    while len(times) < steps and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        trainer.run(1)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)
