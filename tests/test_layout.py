"""The layout says what may import Streamlit: core/ and explorer/offpage/ never do (they run
off the page: training runs, sampling, figures), and only model.py and lens.py spell the names
of cached activations."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NO_STREAMLIT = [p for folder in ("core", "explorer/offpage") for p in sorted((ROOT / folder).rglob("*.py"))]


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", NO_STREAMLIT, ids=lambda p: str(p.relative_to(ROOT)))
def test_off_page_code_never_imports_streamlit(path):
    assert "streamlit" not in imports(path)
    assert "explorer" not in imports(path) or path.is_relative_to(ROOT / "explorer")  # core never imports the app


def test_the_scan_sees_an_import():
    assert "streamlit" in imports(ROOT / "explorer" / "app.py")


def test_only_the_model_and_the_lens_spell_activation_names():
    spelled = [p.relative_to(ROOT).as_posix() for folder in ("core", "explorer") for p in (ROOT / folder).rglob("*.py")
               if '"hook_' in p.read_text(encoding="utf-8") or "'hook_" in p.read_text(encoding="utf-8")]
    assert sorted(spelled) == ["core/lens.py", "core/model.py"]
