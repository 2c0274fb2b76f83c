"""The lecture's character tokenizer: every distinct character of the text is one token."""

import json

# How characters that are invisible in a label are drawn (heatmap axes, tables).
_VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}


def visible(ch: str) -> str:
    """A printable label for one character: space, newline, tab and control codes made visible."""
    if ch in _VISIBLE:
        return _VISIBLE[ch]
    if not ch.isprintable():
        return f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"
    return ch


class UnknownCharactersError(ValueError):
    """Raised by encode when the text holds characters the vocabulary lacks."""

    def __init__(self, chars: list[str]):
        self.chars = chars
        shown = ", ".join(repr(c) for c in chars[:20]) + (" ..." if len(chars) > 20 else "")
        super().__init__(
            f"{len(chars)} character(s) not in the vocabulary: {shown}. "
            "Pass errors='drop' to leave them out or errors='replace' to swap them for a known character."
        )


class CharTokenizer:
    def __init__(self, chars: list[str] | str):
        chars = list(chars)
        if not chars:
            raise ValueError("a tokenizer needs at least one character")
        if len(set(chars)) != len(chars):
            raise ValueError("the vocabulary lists a character twice")
        self.itos = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of text that are not in the vocabulary, in order of appearance."""
        return list(dict.fromkeys(ch for ch in text if ch not in self.stoi))

    def encode(self, text: str, errors: str = "strict", replacement: str | None = None) -> list[int]:
        """Characters to ids. errors: 'strict' raises UnknownCharactersError, 'drop' leaves
        unknown characters out, 'replace' swaps them for `replacement` (default: a space if
        the vocabulary has one, else its first character)."""
        if errors == "strict":
            missing = self.unknown(text)
            if missing:
                raise UnknownCharactersError(missing)
            return [self.stoi[ch] for ch in text]
        if errors == "drop":
            return [self.stoi[ch] for ch in text if ch in self.stoi]
        if errors == "replace":
            fill = replacement if replacement is not None else (" " if " " in self.stoi else self.itos[0])
            if fill not in self.stoi:
                raise ValueError(f"replacement {fill!r} is not in the vocabulary")
            return [self.stoi.get(ch, self.stoi[fill]) for ch in text]
        raise ValueError(f"errors must be 'strict', 'drop' or 'replace', got {errors!r}")

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)

    def to_json(self) -> str:
        return json.dumps(self.itos, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> "CharTokenizer":
        chars = json.loads(s)
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError("a vocabulary must be a JSON list of single characters")
        return cls(chars)
