"""Goals 3 and 4 at the lecture's full shape (6 layers, 6 heads, 384 dims, block 256), batch 1:
- capture: a forward that fills the cache (the app's path, run_with_cache) against the fast
  forward, at T = 256, and the memory the cache holds;
- sampling: the project's generate with its key/value cache against the lecture's generate
  (crop to the last block_size tokens, a full forward per new character) on the same model,
  and a check that the cache changes the speed, not the characters.

    python -m benchmarks.inference [--quick]
"""

import torch

from benchmarks import common
from benchmarks.reference import lecture_generate
from core import GPT, GPTConfig
from core.lens import cache_nbytes, is_quadratic, run_with_cache

CAPTURE_TARGET = 1.5  # at most this times the fast forward
SAMPLING_TARGET = 8.0  # at least this times the lecture's characters/s
CHARS = 500


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
    start = torch.zeros((1, 1), dtype=torch.long)  # the lecture starts from one newline (token 0)
    out = {}

    def sample(name, fn):
        def run():
            out[name] = fn(torch.Generator().manual_seed(1337))
        return run

    contestants = {
        "lecture": sample("lecture", lambda g: lecture_generate(model, start, chars, generator=g)),
        "kv_cache": sample("kv_cache", lambda g: model.generate(start, chars, generator=g)),
        "no_kv_cache": sample("no_kv_cache", lambda g: model.generate(start, chars, generator=g, kv_cache=False)),
    }
    timings = common.interleave(contestants, rounds, settle)
    chars_s = {name: chars / timings.median(name) for name in contestants}
    kv = out["kv_cache"][0]
    # The lecture's window slides one character at a time once full, the project's by half a
    # block: the two agree until the window first fills.
    agree = int((kv != out["lecture"][0]).nonzero()[0, 0]) if not torch.equal(kv, out["lecture"][0]) else len(kv)
    return dict(chars=chars, chars_per_s=chars_s, ratio=chars_s["kv_cache"] / chars_s["lecture"],
                same_as_without_cache=torch.equal(kv, out["no_kv_cache"][0]), same_as_lecture_for_first=agree - 1,
                timings=timings)


def main() -> None:
    args = common.parse_args(__doc__)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("full", vocab_size=65)).eval()  # random weights: speed only
    cap = capture(model, rounds=5 if args.quick else 25, settle=args.settle)
    samp = sampling(model, chars=150 if args.quick else CHARS, rounds=1 if args.quick else 3, settle=args.settle)
    goals = {"capture_cost": common.goal(cap["ratio"], CAPTURE_TARGET, False, judged=not args.quick),
             "kv_sampling_speed": common.goal(samp["ratio"], SAMPLING_TARGET, True, judged=not args.quick),
             "kv_same_characters": dict(value=samp["same_as_without_cache"], target=True,
                                        met=samp["same_as_without_cache"])}
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
    rows += [("key/value cache vs lecture's generate", f"{samp['ratio']:.1f}",
              f"x; goal >= {SAMPLING_TARGET}: {common.verdict(goals['kv_sampling_speed'])}"),
             ("same characters with and without the cache", str(samp["same_as_without_cache"]), ""),
             ("same characters as the lecture's generate for the first", str(samp["same_as_lecture_for_first"]),
              "chars (then its window slides by one, the project's by half a block)"),
             ("capture: " + cap["timings"].row()[0], *cap["timings"].row()[1:]),
             ("sampling: " + samp["timings"].row()[0], *samp["timings"].row()[1:])]
    cap["timings"], samp["timings"] = cap["timings"].summary(), samp["timings"].summary()
    common.report("Capture and sampling, the lecture's full shape (6x6x384, block 256), batch 1", rows, dict(
        benchmark="inference", quick=args.quick, machine=common.machine(), capture=cap, sampling=samp, goals=goals))


if __name__ == "__main__":
    main()
