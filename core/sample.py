"""Sample text from a checkpoint, streaming characters as they are drawn.

    python -m core.sample --ckpt pretrained/full --prompt "ROMEO:" --max-new-tokens 300 --seed 0
    python -m core.sample --ckpt pretrained/full --window lecture   # the lecture's window, exactly

Ctrl-C stops it: what was written stays, and the exit code is 130.
"""

import argparse
import sys

from . import engine
from .checkpoint import CheckpointError, load_checkpoint
from .tokenizer import UnknownCharactersError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint NAME (NAME.safetensors + NAME.json)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500, help="characters to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy; higher is wilder (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely characters")
    p.add_argument("--top-p", type=float, default=None, help="sample only from the smallest set holding this probability")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--window", choices=engine.WINDOWS, default="fast",
                   help="how the context slides once the text outgrows block_size: fast (the default) drops half a "
                        "block at once, so that each character reuses the keys and values computed before; lecture "
                        "drops one character at a time and recomputes the whole window for every character, as the "
                        "lecture's generate does: its exact characters, much slower")
    p.add_argument("--unknown", choices=["error", "drop", "replace"], default="error",
                   help="what to do with prompt characters the model does not know (default: %(default)s)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ckpt = load_checkpoint(args.ckpt)
        ids = ckpt.tokenizer.encode(args.prompt, errors="strict" if args.unknown == "error" else args.unknown)
        if not ids:
            raise ValueError("the prompt is empty (after dropping unknown characters)")
        stream = engine.stream(ckpt.model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                               args.seed, args.window)
        write_sample(args.prompt, stream, ckpt.tokenizer)
    except UnknownCharactersError as e:
        shown = ", ".join(repr(ch) for ch in e.chars[:20])
        print(f"error: the prompt holds characters this model does not know ({shown}); "
              "pass --unknown drop or --unknown replace", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written stays printed
        return 130
    return 0


def write_sample(prompt: str, stream, tokenizer) -> None:
    """Print the prompt, then each character as it is drawn."""
    sys.stdout.write(prompt)
    try:
        for tok, _ in stream:
            sys.stdout.write(tokenizer.itos[tok])
            sys.stdout.flush()
    finally:
        sys.stdout.write("\n")  # end the line even when the sampling settings are refused mid-way


if __name__ == "__main__":
    sys.exit(main())
