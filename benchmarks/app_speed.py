"""Goal 5, the app:
- the first page a fresh `streamlit run` shows (the teacher's first look: torch and the views
  imported, every pretrained model checked), each on a server of its own;
- the Attention view of a 6-layer, 6-head model (the lecture's full shape, random weights) at
  a 256-character prompt: the time of one script run in Streamlit's AppTest after a warm-up,
  rerun with the same prompt (served from the cache every session shares) and with a new one,
  and the size of each figure's JSON (the all-heads grid must stay under 2 MB);
- the live-training runner (a background thread, with its evaluations, samples and attention
  snapshots) against the bare trainer, on the Train view's default settings.

    python -m benchmarks.app_speed [--quick] [--profile]
"""

import asyncio
import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.load import Session, free_port, start_server, stop_server
from core import GPT, CharTokenizer, GPTConfig
from core.checkpoint import save_checkpoint
from core.data import Corpus
from core.trainer import Trainer
from explorer.glue.sidebar import PRETRAINED_ENV
from explorer.offpage.recipes import Settings, probe_ids, watch
from explorer.offpage.training_run import TrainingRunner, TrainingSlots

APP = Path(__file__).resolve().parent.parent / "explorer" / "app.py"
VIEW_TARGET_S = 1.0
GRID_TARGET_MB = 2.0
RUNNER_TARGET = 0.9
GRID_TITLE = "Attention weights of every head"


def first_page(servers: int) -> list[float]:
    """Seconds of the first page's script run (from a new session's first rerun to its end), on
    fresh servers one after another."""
    async def look(port: int) -> float:
        errors = []
        s = Session("teacher", port, errors, [])
        await s.connect()
        seconds = await s.rerun("page load")
        await s.close()
        if errors or seconds is None:
            raise RuntimeError(f"the first page failed: {errors}")
        return seconds

    seconds = []
    for _ in range(servers):
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w") as log:
            server = start_server(port, dict(os.environ, GPT_EXPLORER_ROOM_DIR=str(Path(tmp) / "room")), log)
            try:
                seconds.append(asyncio.run(look(port)))
            finally:
                stop_server(server)
    return seconds


def attention_view(text: str, reruns: int, profile: bool, settle: float) -> dict:
    from streamlit.testing.v1 import AppTest

    tokenizer = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("full", vocab_size=tokenizer.vocab_size))
    threads = torch.get_num_threads()  # the app sets one thread for itself: give the rest back after
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(Path(folder) / "full-random", model, tokenizer)
        os.environ[PRETRAINED_ENV] = folder
        at = AppTest.from_file(str(APP), default_timeout=120)
        at.run()
        at.switch_page("views/attention.py").run()
        at.text_area(key="prompt").set_value(text[:256]).run()  # the warm-up
        if at.exception:
            raise RuntimeError([e.value for e in at.exception])
        windows = iter(range(1000, len(text), 1000))

        def new_prompt():  # a prompt no session has shown: nothing of its run is cached yet
            start = next(windows)
            at.text_area(key="prompt").set_value(text[start:start + 256]).run()

        timings = common.interleave({"run": at.run, "new_prompt": new_prompt}, reruns, settle)
        hot_spots = common.profile_script_run(at) if profile else None
        specs = [chart.proto.spec for chart in at.get("plotly_chart")]
    torch.set_num_threads(threads)
    sizes = [len(spec.encode()) / 1e6 for spec in specs]
    grid = next(size for spec, size in zip(specs, sizes) if GRID_TITLE in spec)
    return dict(prompt_chars=256, run_s=timings.median("run"), new_prompt_s=timings.median("new_prompt"), grid_mb=grid,
                largest_mb=max(sizes), figures_mb=sum(sizes), n_figures=len(sizes), hot_spots=hot_spots, timings=timings)


def runner_vs_trainer(text: str, steps: int, rounds: int, settle: float) -> dict:
    """Steps/s of a whole run (evaluations included on both sides) on the Train view's defaults,
    on one thread as the app trains; and the bare trainer in float32, to show what bfloat16
    does at this small shape."""
    settings = Settings(max_iters=steps)
    corpus = Corpus(text, settings.block_size)

    def trainer(**changes):
        config = replace(settings.train_config(), threads=1, **changes)
        return Trainer(settings.model_config(corpus.tokenizer.vocab_size), config, corpus)

    def with_runner():
        runner = TrainingRunner(trainer(), TrainingSlots(1), probe_ids=probe_ids(corpus, settings.block_size),
                                **watch(settings.eval_interval))  # as the Train view builds it
        runner.start()
        runner.join()
        assert runner.snapshot().status == "finished", runner.snapshot().message

    threads = torch.get_num_threads()
    contestants = {"runner": with_runner, "bare": lambda: trainer().train(),
                   "bare_fp32": lambda: trainer(precision="float32").train()}
    timings = common.interleave(contestants, rounds, settle)
    torch.set_num_threads(threads)
    steps_s = {name: steps / timings.median(name) for name in contestants}
    return dict(settings=asdict(settings), threads=1, steps=steps, steps_s=steps_s,
                ratio=steps_s["runner"] / steps_s["bare"], timings=timings)


def main() -> None:
    args = common.parse_args(__doc__, profile=True)
    text = common.shakespeare()
    first = first_page(servers=1 if args.quick else 5)
    training = runner_vs_trainer(text, steps=100 if args.quick else 300, rounds=1 if args.quick else 5,
                                 settle=args.settle)
    view = attention_view(text, reruns=3 if args.quick else 9, profile=args.profile, settle=args.settle)
    judged = not args.quick
    goals = {"attention_view_run": common.goal(max(view["run_s"], view["new_prompt_s"]), VIEW_TARGET_S, False, judged),
             "head_grid_json": common.goal(view["grid_mb"], GRID_TARGET_MB, False, judged),
             "runner_vs_trainer": common.goal(training["ratio"], RUNNER_TARGET, True, judged)}
    rows = [("a fresh server's first page", f"{common.median(first):.2f}",
             f"s (median of {len(first)} servers: {', '.join(f'{x:.2f}' for x in first)})"),
            ("Attention view, 6x6 heads, 256-char prompt: a rerun", f"{view['run_s']:.2f}",
             "s (median; the prompt's run and figures come from the cache every session shares)"),
            ("  a run with a new prompt", f"{view['new_prompt_s']:.2f}",
             f"s (median); goal <= {VIEW_TARGET_S} for both: {common.verdict(goals['attention_view_run'])}"),
            ("  all-heads grid figure JSON", f"{view['grid_mb']:.2f}",
             f"MB; goal <= {GRID_TARGET_MB}: {common.verdict(goals['head_grid_json'])}"),
            ("  largest figure JSON (a focused head may be full resolution)", f"{view['largest_mb']:.2f}", "MB"),
            (f"  all {view['n_figures']} figures' JSON", f"{view['figures_mb']:.2f}", "MB"),
            (f"bare trainer, Train view defaults ({training['threads']} thread, {training['steps']} steps)",
             f"{training['steps_s']['bare']:.1f}", "steps/s"),
            ("  the same in float32", f"{training['steps_s']['bare_fp32']:.1f}", "steps/s"),
            ("live-training runner, same settings", f"{training['steps_s']['runner']:.1f}", "steps/s"),
            ("runner / bare trainer", f"{training['ratio']:.2f}",
             f"goal >= {RUNNER_TARGET}: {common.verdict(goals['runner_vs_trainer'])}"),
            ("Attention view: " + view["timings"].row()[0], *view["timings"].row()[1:]),
            ("training: " + training["timings"].row()[0], *training["timings"].row()[1:])]
    view["timings"], training["timings"] = view["timings"].summary(), training["timings"].summary()
    if view["hot_spots"]:
        print(view["hot_spots"])
    view.pop("hot_spots")
    common.report("The app: a fresh server's first page, the Attention view and the live-training runner", rows, dict(
        benchmark="app_speed", quick=args.quick, machine=common.machine(), first_page_s=first, attention_view=view, training=training,
        goals=goals))


if __name__ == "__main__":
    main()
