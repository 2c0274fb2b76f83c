"""Goals 3, 4 and 6:
- capture (the lecture's full shape: 6 layers, 6 heads, 384 dims, block 256; batch 1): a forward
  that fills the cache (the app's path, run_with_cache) against the fast forward, at T = 256,
  and the memory the cache holds;
- sampling (same model, one stream): the sampling engine's single-request path (core.engine,
  key/value cache) in both windows against the lecture's generate (crop to the last block_size
  tokens, a full forward per new character), and checks that the cache changes the speed, not
  the characters;
- the room (pretrained/cpu-best): 30 requests of 200 characters submitted at once to one
  engine, against one request alone (the median of 3 in each round): aggregate characters/s,
  and each request's time to its whole text (p50, p95).

    python -m benchmarks.inference [--quick] [--threads N]
"""

import time

import torch

from benchmarks import common
from benchmarks.reference import lecture_generate
from core import GPT, GPTConfig
from core.checkpoint import load_checkpoint
from core.engine import Engine, stream
from core.lens import cache_nbytes, is_quadratic, run_with_cache

CAPTURE_TARGET = 1.5  # at most this times the fast forward
SAMPLING_TARGET = 8.0  # at least this times the lecture's characters/s
ROOM_SPEEDUP_TARGET = 10.0  # the room's aggregate characters/s, at least this times one stream's
ROOM_P95_TARGET = 3.0  # seconds to a request's whole text, at most
CHARS = 500
ROOM, ROOM_CHARS = 30, 200
ONE_STREAM_RUNS = 3  # one stream of 200 takes under a second: its median of a few, each round
ROOM_MODEL = common.ROOT / "pretrained" / "cpu-best.json"
PROMPTS = ["ROMEO:", "JULIET:\n", "First Citizen:\n", "KING RICHARD III:\nNow is the winter", "O", "\n",
           "To be, or not to be", "MENENIUS:\nWhat work's, my countrymen, in hand?"]


def capture(model: GPT, rounds: int, settle: float) -> dict:
    T = model.config.block_size
    idx = torch.randint(model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        timings = common.interleave({"fast": lambda: model(idx), "cache": lambda: run_with_cache(model, idx)}, rounds,
                                    settle)
    _, cache = run_with_cache(model, idx)
    total = cache_nbytes(cache)
    quadratic = cache_nbytes({n: t for n, t in cache.items() if is_quadratic(n)})
    fast, slow = timings.median("fast"), timings.median("cache")
    return dict(T=T, fast_ms=1000 * fast, cache_ms=1000 * slow, ratio=slow / fast, cache_bytes=total,
                bytes_per_token=total / T, linear_bytes_per_token=(total - quadratic) / T,
                attention_bytes_per_token=quadratic / T, timings=timings)


def sampling(model: GPT, chars: int, rounds: int, settle: float) -> dict:
    start = [0]  # the lecture starts from one newline (token 0)
    out = {}

    def sample(name, fn):
        def run():
            out[name] = fn()
        return run

    engine = lambda window: [t for t, _ in stream(model, start, chars, seed=1337, window=window)]
    contestants = {
        "lecture": sample("lecture", lambda: lecture_generate(model, torch.tensor([start]), chars,
                                                              generator=torch.Generator().manual_seed(1337))[0, 1:].tolist()),
        "kv_cache": sample("kv_cache", lambda: engine("fast")),
        "kv_cache_lecture_window": sample("kv_cache_lecture_window", lambda: engine("lecture")),
        "no_kv_cache": sample("no_kv_cache", lambda: model.generate(
            torch.tensor([start]), chars, generator=torch.Generator().manual_seed(1337), kv_cache=False)[0, 1:].tolist()),
    }
    timings = common.interleave(contestants, rounds, settle)
    chars_s = {name: chars / timings.median(name) for name in contestants}
    for name, v in chars_s.items():
        common.progress(f"one stream, {chars} characters: {name} {v:.0f} characters/s")
    kv, lecture = out["kv_cache"], out["lecture"]
    # The fast window slides by half a block, the lecture's by one: they agree until the window first fills.
    agree = next((i for i, (a, b) in enumerate(zip(kv, lecture)) if a != b), len(kv))
    return dict(chars=chars, chars_per_s=chars_s, ratio=chars_s["kv_cache"] / chars_s["lecture"],
                same_as_without_cache=kv == out["no_kv_cache"], lecture_window_same_as_lecture=out[
                    "kv_cache_lecture_window"] == lecture, same_as_lecture_for_first=agree, timings=timings)


def room(rounds: int, settle: float) -> dict:
    """One request alone, then ROOM at once, round after round: the same engine, prompts and settings."""
    ckpt = load_checkpoint(ROOM_MODEL)
    engine = Engine(ckpt.model)
    prompts = [ckpt.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(ROOM)]
    settings = [dict(temperature=(0.8, 1.0)[i % 2], top_k=(None, 20)[i % 3 == 0], seed=i) for i in range(ROOM)]

    def submit(n):
        began = time.perf_counter()
        requests = [engine.submit(prompts[i], ROOM_CHARS, **settings[i]) for i in range(n)]
        for r in requests:
            r.wait()
        assert all(r.error is None and len(r.new_ids) == ROOM_CHARS for r in requests)
        return time.perf_counter() - began, sorted(r.finished - r.submitted for r in requests)

    for r in [engine.submit(prompts[i], 10, **settings[i]) for i in range(ROOM)]:  # warm-up: the cache grown
        r.wait()
    one, many, p50, p95, others = [], [], [], [], []
    for i in range(rounds):
        common.wait_for_quiet(settle)
        with common.Busy() as busy:
            one.append(ROOM_CHARS / common.median([submit(1)[0] for _ in range(ONE_STREAM_RUNS)]))
            wall, waits = submit(ROOM)
        many.append(ROOM * ROOM_CHARS / wall)
        p50.append(common.median(waits))
        p95.append(waits[min(len(waits) - 1, round(0.95 * (len(waits) - 1)))])
        others.append(busy.others)
        common.progress(f"room round {i + 1}/{rounds}: one stream {one[-1]:.0f} characters/s; {ROOM} at once "
                        f"{many[-1]:.0f} characters/s ({many[-1] / one[-1]:.1f}x), whole text p50 {p50[-1]:.2f} s, "
                        f"p95 {p95[-1]:.2f} s; others {100 * busy.others:.0f}% of the CPU")
    while engine.running:  # its thread ends on its own: let it, before the interpreter exits
        time.sleep(0.01)
    speedups = [m / o for m, o in zip(many, one)]
    return dict(model=ROOM_MODEL.stem, requests=ROOM, chars=ROOM_CHARS, one_stream_chars_per_s=common.median(one),
                room_chars_per_s=common.median(many), speedup=common.median(speedups), p50_s=common.median(p50),
                p95_s=common.median(p95), rounds=dict(one=one, room=many, p50=p50, p95=p95, others_cpu_share=others))


def main() -> None:
    args = common.parse_args(__doc__)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("full", vocab_size=65)).eval()  # random weights: speed only
    cap = capture(model, rounds=5 if args.quick else 25, settle=args.settle)
    common.progress(f"capture: fast forward {cap['fast_ms']:.1f} ms, filling the cache {cap['cache_ms']:.1f} ms")
    samp = sampling(model, chars=150 if args.quick else CHARS, rounds=1 if args.quick else 3, settle=args.settle)
    rm = room(rounds=1 if args.quick else 5, settle=args.settle)
    judged = not args.quick
    goals = {"capture_cost": common.goal(cap["ratio"], CAPTURE_TARGET, False, judged=judged),
             "kv_sampling_speed": common.goal(samp["ratio"], SAMPLING_TARGET, True, judged=judged),
             "kv_same_characters": dict(value=samp["same_as_without_cache"], target=True,
                                        met=samp["same_as_without_cache"]),
             "room_speedup": common.goal(rm["speedup"], ROOM_SPEEDUP_TARGET, True, judged=judged),
             "room_p95_s": common.goal(rm["p95_s"], ROOM_P95_TARGET, False, judged=judged)}
    kib = 1024
    rows = [(f"fast forward, T={cap['T']}", f"{cap['fast_ms']:.1f}", "ms"),
            (f"forward filling the cache, T={cap['T']}", f"{cap['cache_ms']:.1f}", "ms"),
            ("capture cost", f"{cap['ratio']:.2f}", f"x fast forward; goal <= {CAPTURE_TARGET}: "
             f"{common.verdict(goals['capture_cost'])}"),
            ("cache memory", f"{cap['cache_bytes'] / kib**2:.1f}", f"MiB at T={cap['T']}"),
            ("cache memory per token", f"{cap['bytes_per_token'] / kib:.1f}",
             f"KiB ({cap['linear_bytes_per_token'] / kib:.1f} per token at any T + "
             f"{cap['attention_bytes_per_token'] / kib:.1f} of scores and weights, which grow with T)")]
    rows += [(f"sampling {samp['chars']} chars: {name}", f"{v:.0f}", "chars/s") for name, v in samp["chars_per_s"].items()]
    rows += [("key/value cache (fast window) vs lecture's generate", f"{samp['ratio']:.1f}",
              f"x; goal >= {SAMPLING_TARGET}: {common.verdict(goals['kv_sampling_speed'])}"),
             ("same characters with and without the cache", str(samp["same_as_without_cache"]), ""),
             ("lecture window: same characters as the lecture's generate", str(samp["lecture_window_same_as_lecture"]), ""),
             ("fast window: same characters as the lecture's generate for the first", str(samp["same_as_lecture_for_first"]),
              "chars (then the lecture's window slides by one, the fast one by half a block)"),
             (f"{rm['model']}: one stream of {rm['chars']}", f"{rm['one_stream_chars_per_s']:.0f}", "chars/s"),
             (f"{rm['model']}: {rm['requests']} requests of {rm['chars']} at once", f"{rm['room_chars_per_s']:.0f}",
              "chars/s, all of them together"),
             ("the room vs one stream", f"{rm['speedup']:.1f}",
              f"x; goal >= {ROOM_SPEEDUP_TARGET}: {common.verdict(goals['room_speedup'])}"),
             ("a request's time to its whole text, p50", f"{rm['p50_s']:.2f}", "s"),
             ("a request's time to its whole text, p95", f"{rm['p95_s']:.2f}",
              f"s; goal <= {ROOM_P95_TARGET}: {common.verdict(goals['room_p95_s'])}"),
             ("capture: " + cap["timings"].row()[0], *cap["timings"].row()[1:]),
             ("sampling: " + samp["timings"].row()[0], *samp["timings"].row()[1:]),
             ("room: others' share in each round, %", ", ".join(f"{100 * o:.0f}" for o in rm["rounds"]["others_cpu_share"]), "")]
    cap["timings"], samp["timings"] = cap["timings"].summary(), samp["timings"].summary()
    common.report("Capture, sampling and the room", rows, dict(
        benchmark="inference", quick=args.quick, machine=common.machine(), capture=cap, sampling=samp, room=rm,
        goals=goals))


if __name__ == "__main__":
    main()
