"""Text in, batches out: Tiny Shakespeare (found, cached or downloaded), user text, get_batch."""

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch

from .tokenizer import CharTokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_ENV = "GPT_EXPLORER_DATA"
CACHE_DIR = Path(__file__).resolve().parent.parent / "data"
MAX_TEXT_BYTES = 5_000_000  # user uploads: enough for a novel, small enough for a shared server
TRAIN_FRACTION = 0.9

Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes or None)


class DataError(ValueError):
    """Text that cannot be used, with a message that says what to do instead."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str, progress: Progress | None = None, timeout: float = 30) -> Path:
    """Download url to dest, verify its checksum, and only then move it into place."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    except OSError as e:
        raise DataError(f"cannot save a download in {dest.parent}: {e.strerror or e}. {_offline_hint(dest)}") from e
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers["Content-Length"]) if resp.headers.get("Content-Length") else None
            done = 0
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
        if h.hexdigest() != sha256:
            raise DataError(f"the file downloaded from {url} is not the expected one "
                            f"(sha256 {h.hexdigest()}, expected {sha256}); nothing was saved")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"could not download {url}: {e}. {_offline_hint(dest)}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def _offline_hint(dest: Path) -> str:
    return f"Put a copy of Tiny Shakespeare's input.txt at {dest}, or point the environment variable {DATA_ENV} at one."


def shakespeare_path(path: str | os.PathLike | None = None, url: str = SHAKESPEARE_URL,
                     cache_dir: Path = CACHE_DIR, progress: Progress | None = None) -> Path:
    """Where Tiny Shakespeare is: the given path, $GPT_EXPLORER_DATA, the cache, else downloaded."""
    given = path or os.environ.get(DATA_ENV)
    if given:
        if not Path(given).is_file():
            source = "" if path else f" (named by ${DATA_ENV})"
            raise DataError(f"no text file at {given}{source}")
        return Path(given)
    cached = Path(cache_dir) / "tinyshakespeare.txt"
    if cached.is_file():
        return cached
    return download(url, cached, SHAKESPEARE_SHA256, progress)


def load_shakespeare(path: str | os.PathLike | None = None, **kwargs) -> str:
    return shakespeare_path(path, **kwargs).read_text(encoding="utf-8")


def text_from_bytes(data: bytes, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """Decode an uploaded file: UTF-8 text only, within the size cap."""
    if len(data) > max_bytes:
        raise DataError(f"the file is {len(data):,} bytes; the limit is {max_bytes:,} bytes")
    if b"\x00" in data:
        raise DataError("this looks like a binary file, not text: upload a UTF-8 .txt file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"the file is not UTF-8 text (bad byte at position {e.start}): "
                        "save it as UTF-8 and upload it again") from e
    return text.removeprefix("\ufeff")  # a byte-order mark is not part of the text


def min_text_length(block_size: int) -> int:
    """The shortest text whose validation split still holds more than one block."""
    need = block_size + 2  # two distinct (x, y) windows
    # The validation split grows by 0 or 1 per character: step up from safely below the answer,
    # with the same int() rounding as Corpus, so float error cannot make it off by one.
    length = max(need, int((need - 2) / (1 - TRAIN_FRACTION)))
    while length - int(TRAIN_FRACTION * length) < need:
        length += 1
    return length


def check_length(text: str, block_size: int) -> None:
    """Raise DataError unless the text is long enough to train on with this block size."""
    if not text:
        raise DataError("the text is empty")
    need = min_text_length(block_size)
    if len(text) < need:
        raise DataError(f"the text has {len(text):,} characters; with a block size of {block_size} "
                        f"it needs at least {need:,} so the validation split holds more than one block")


class Corpus:
    """A text, its tokenizer, and the lecture's 90/10 train/val split of the encoded text."""

    def __init__(self, text: str, block_size: int, tokenizer: CharTokenizer | None = None):
        check_length(text, block_size)
        self.text = text
        self.block_size = block_size
        self.tokenizer = tokenizer or CharTokenizer.from_text(text)
        data = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        n = int(TRAIN_FRACTION * len(data))
        self.splits = {"train": data[:n], "val": data[n:]}

    def get_batch(self, split: str, batch_size: int, block_size: int | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """batch_size random windows: x (B, T) and y, the same windows shifted by one."""
        data = self.splits[split]
        T = block_size or self.block_size
        if len(data) <= T:
            raise DataError(f"the {split} split ({len(data)} tokens) is shorter than block_size + 1 ({T + 1})")
        ix = torch.randint(len(data) - T, (batch_size,), generator=generator)
        offsets = torch.arange(T + 1)
        windows = data[ix[:, None] + offsets]  # (B, T+1) in one gather
        return windows[:, :-1], windows[:, 1:]
