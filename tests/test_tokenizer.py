import pytest

from core import CharTokenizer, UnknownCharactersError, visible


def test_round_trip():
    tok = CharTokenizer.from_text("hello world\n")
    text = "low hold\nwell"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set("hello world\n"))
    assert tok.itos == sorted(set("hello world\n"))


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc ")
    with pytest.raises(UnknownCharactersError) as err:
        tok.encode("abzx zé")
    assert err.value.chars == ["z", "x", "é"]
    assert "'z'" in str(err.value) and "drop" in str(err.value)


def test_drop_and_replace():
    tok = CharTokenizer.from_text("abc ")
    assert tok.decode(tok.encode("azb", errors="drop")) == "ab"
    assert tok.decode(tok.encode("azb", errors="replace")) == "a b"
    assert tok.decode(tok.encode("azb", errors="replace", replacement="c")) == "acb"
    with pytest.raises(ValueError):
        tok.encode("a", errors="ignore")


def test_json_round_trip_keeps_order_and_odd_characters():
    tok = CharTokenizer(["\n", " ", "é", "\u0301", "a"])
    again = CharTokenizer.from_json(tok.to_json())
    assert again.itos == tok.itos


@pytest.mark.parametrize("bad", ['"abc"', '["ab"]', "[1, 2]", '["a", "a"]', "[]"])
def test_bad_vocabulary_json(bad):
    with pytest.raises(ValueError):
        CharTokenizer.from_json(bad)


def test_visible_labels():
    assert visible(" ") == "␣" and visible("\n") == "⏎" and visible("\t") == "⇥"
    assert visible("a") == "a"
    assert visible("\x07") == "\\x07"
