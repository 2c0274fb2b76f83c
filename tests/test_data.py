"""Finding Tiny Shakespeare, downloading it (from a local server only), user text, batches."""

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

from core.data import (
    DATA_ENV,
    SHAKESPEARE_SHA256,
    Corpus,
    DataError,
    download,
    load_shakespeare,
    min_text_length,
    shakespeare_path,
    text_from_bytes,
)

# Finding the text --------------------------------------------------------------------------


class LocalServer:
    """An HTTP server on 127.0.0.1 (port 0: any free port) serving `files`; nothing leaves the machine."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    srv = LocalServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_explicit_path_comes_first(tmp_path, monkeypatch, dead_url):
    given = write(tmp_path / "given.txt", "given text")
    monkeypatch.setenv(DATA_ENV, str(write(tmp_path / "env.txt", "env text")))
    write(tmp_path / "cache" / "tinyshakespeare.txt", "cached text")
    assert shakespeare_path(given, url=dead_url, cache_dir=tmp_path / "cache") == given
    assert load_shakespeare(str(given), url=dead_url, cache_dir=tmp_path / "cache") == "given text"


def test_environment_variable_comes_before_the_cache(tmp_path, monkeypatch, dead_url):
    monkeypatch.setenv(DATA_ENV, str(write(tmp_path / "env.txt", "env text")))
    write(tmp_path / "cache" / "tinyshakespeare.txt", "cached text")
    assert load_shakespeare(url=dead_url, cache_dir=tmp_path / "cache") == "env text"


def test_cache_comes_before_a_download(tmp_path, no_env, dead_url):
    cached = write(tmp_path / "cache" / "tinyshakespeare.txt", "cached text")
    assert shakespeare_path(url=dead_url, cache_dir=tmp_path / "cache") == cached  # dead_url: no download tried


@pytest.mark.parametrize("by_env", [False, True])
def test_a_named_file_that_is_missing_is_an_error(tmp_path, monkeypatch, by_env, dead_url):
    missing = tmp_path / "nope.txt"
    if by_env:
        monkeypatch.setenv(DATA_ENV, str(missing))
    else:
        monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DataError, match="no text file at") as err:
        shakespeare_path(None if by_env else missing, url=dead_url, cache_dir=tmp_path / "cache")
    assert str(missing) in str(err.value)
    assert (DATA_ENV in str(err.value)) == by_env  # the user learns where the bad name came from


def test_download_into_the_cache_checks_the_real_checksum(shakespeare, tmp_path, no_env, server):
    server.files["/input.txt"] = shakespeare.encode("utf-8")
    cache = tmp_path / "cache"
    dest = cache / "tinyshakespeare.txt"
    calls = []

    def progress(done, total):
        calls.append((done, total, dest.exists()))

    text = load_shakespeare(url=server.url("/input.txt"), cache_dir=cache, progress=progress)
    assert text == shakespeare
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == SHAKESPEARE_SHA256
    assert sorted(p.name for p in cache.iterdir()) == ["tinyshakespeare.txt"]  # no .part left
    size = len(server.files["/input.txt"])
    assert len(calls) > 1 and calls[-1][:2] == (size, size)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert not any(exists for _, _, exists in calls)  # the file appears only once it is complete and checked
    # Once cached, the server is not needed.
    assert shakespeare_path(url="http://127.0.0.1:9/gone", cache_dir=cache) == dest


def test_download_of_any_file(tmp_path, server):
    body = bytes(range(256)) * 1000  # several chunks
    server.files["/blob"] = body
    dest = tmp_path / "deep" / "er" / "blob.bin"
    assert download(server.url("/blob"), dest, hashlib.sha256(body).hexdigest()) == dest
    assert dest.read_bytes() == body


def test_wrong_checksum_leaves_nothing_behind(tmp_path, no_env, server):
    server.files["/input.txt"] = b"not Shakespeare at all\n" * 5000
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="not the expected one") as err:
        shakespeare_path(url=server.url("/input.txt"), cache_dir=cache)
    assert SHAKESPEARE_SHA256 in str(err.value)
    assert list(cache.iterdir()) == []  # no file, no .part


def test_server_gone_says_where_to_put_the_file(tmp_path, no_env, dead_url):
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        shakespeare_path(url=dead_url, cache_dir=cache)
    message = str(err.value)
    assert "could not download" in message
    assert str(cache / "tinyshakespeare.txt") in message and DATA_ENV in message
    assert list(cache.iterdir()) == []


def test_http_error_is_a_data_error(tmp_path, server):
    with pytest.raises(DataError, match="404"):
        download(server.url("/missing"), tmp_path / "x.txt", "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_cache_folder_that_cannot_be_made(tmp_path, no_env, dead_url):
    blocker = write(tmp_path / "a_file", "x")
    with pytest.raises(DataError, match="cannot save a download") as err:
        shakespeare_path(url=dead_url, cache_dir=blocker / "cache")
    assert DATA_ENV in str(err.value)


def test_tiny_shakespeare_is_the_lecture_text(shakespeare):
    assert len(shakespeare) == 1_115_394
    corpus = Corpus(shakespeare, block_size=8)
    assert corpus.tokenizer.vocab_size == 65
    assert "".join(corpus.tokenizer.itos) == "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    assert (len(corpus.splits["train"]), len(corpus.splits["val"])) == (1_003_854, 111_540)


# User text ---------------------------------------------------------------------------------


def test_text_from_bytes_decodes_utf8():
    assert text_from_bytes("Ça va? 👍\n".encode()) == "Ça va? 👍\n"


def test_byte_order_mark_is_stripped_only_at_the_start():
    assert text_from_bytes("\ufeffhello\ufeff".encode("utf-8")) == "hello\ufeff"


def test_binary_file_is_refused():
    with pytest.raises(DataError, match="binary"):
        text_from_bytes(b"PK\x03\x04\x00\x00text")


def test_non_utf8_is_refused_with_the_position():
    with pytest.raises(DataError, match="not UTF-8.*position 3"):
        text_from_bytes("abcé".encode("latin-1"))


def test_size_cap():
    assert text_from_bytes(b"a" * 10, max_bytes=10) == "a" * 10
    with pytest.raises(DataError, match="11 bytes; the limit is 10 bytes"):
        text_from_bytes(b"a" * 11, max_bytes=10)


# Corpus and batches ------------------------------------------------------------------------


def test_empty_text():
    with pytest.raises(DataError, match="empty"):
        Corpus("", block_size=8)


@pytest.mark.parametrize("block_size", [1, 8, 12, 256, 1000])
def test_minimum_length_is_exact(block_size):
    need = min_text_length(block_size)
    text = "".join(chr(97 + i % 26) for i in range(need))
    with pytest.raises(DataError, match=f"at least {need:,}"):
        Corpus(text[:-1], block_size)
    corpus = Corpus(text, block_size)
    # The shortest: the validation split holds exactly two windows of block_size + 1 tokens.
    assert len(corpus.splits["val"]) == block_size + 2
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        x, y = corpus.get_batch(split, 16, generator=g)
        assert x.shape == y.shape == (16, block_size)
    starts = {tuple(corpus.get_batch("val", 1, generator=g)[0][0].tolist()) for _ in range(50)}
    assert len(starts) == 2  # both windows of the validation split are drawn


def test_split_is_90_10_of_the_encoded_text(tiny_text):
    corpus = Corpus(tiny_text, block_size=8)
    n = int(0.9 * len(tiny_text))
    assert len(corpus.splits["train"]) == n and len(corpus.splits["val"]) == len(tiny_text) - n
    joined = torch.cat([corpus.splits["train"], corpus.splits["val"]])
    assert corpus.tokenizer.decode(joined) == tiny_text


@pytest.mark.parametrize("split", ["train", "val"])
def test_batches_are_windows_of_the_split_shifted_by_one(tiny_text, split):
    corpus = Corpus(tiny_text, block_size=8)
    B, T = 12, 8
    x, y = corpus.get_batch(split, B, generator=torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (B, T) and x.dtype == torch.long
    windows = corpus.splits[split].unfold(0, T + 1, 1)  # every (T+1)-window of the split
    for i in range(B):
        row = torch.cat([x[i], y[i, -1:]])
        assert (windows == row).all(dim=1).any(), f"row {i} is not a window of the {split} split"
        assert torch.equal(y[i, :-1], x[i, 1:])


def test_batches_follow_the_generator(tiny_text):
    corpus = Corpus(tiny_text, block_size=8)

    def batch(seed):
        return corpus.get_batch("train", 8, generator=torch.Generator().manual_seed(seed))

    a, b, c = batch(1), batch(1), batch(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_batch_block_size_can_be_shorter(tiny_text):
    corpus = Corpus(tiny_text, block_size=8)
    x, y = corpus.get_batch("train", 3, block_size=4)
    assert x.shape == y.shape == (3, 4)
    with pytest.raises(DataError, match="shorter than block_size"):
        corpus.get_batch("val", 3, block_size=len(corpus.splits["val"]))
