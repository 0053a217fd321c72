"""The floors of docs/architecture.md ("Layers") hold: `lint-imports` (import-linter, configured in
pyproject.toml) passes, fails on an upward import, and imports of instatune's own modules sit at the top of
each module (a function-local one only for a documented reason)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
#: where instatune's own modules may be imported inside a function, and why
LOCAL_OK = {
    "instatune_cli/cli/": "each command imports the library when it runs, so `instatune --help` stays light",
}
MARK = "# lazy:"  # an import line that says why it is local (e.g. the module imports torch and this one does not)


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    if not Path(LINT).exists():
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]' (import-linter)")
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(cwd)})


def test_import_contracts_are_kept() -> None:
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def test_an_upward_import_breaks_the_floors(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "instatune_cli", tmp_path / "instatune_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    space = tmp_path / "instatune_cli" / "space.py"
    space.write_text(space.read_text() + "\n\ndef _upward() -> None:\n    from instatune_cli import deliver  # noqa\n")
    r = lint(tmp_path)
    assert r.returncode != 0 and "floors BROKEN" in r.stdout
    assert "instatune_cli.space -> instatune_cli.deliver" in r.stdout


def local_imports(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line: import` of every function-local import of an instatune_cli module without the `# lazy:` mark."""
    src = path.read_text()
    lines = src.splitlines()
    tree = ast.parse(src)
    found = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for n in ast.walk(fn):
            mods = [n.module or ""] if isinstance(n, ast.ImportFrom) else \
                [a.name for a in n.names] if isinstance(n, ast.Import) else []
            if any(m == "instatune_cli" or m.startswith("instatune_cli.") for m in mods) and \
                    MARK not in lines[n.lineno - 1]:
                found.append(f"{path.relative_to(root)}:{n.lineno}: {lines[n.lineno - 1].strip()}")
    return sorted(set(found))


def library_files(skip: Any) -> list[Path]:
    return [p for p in sorted((ROOT / "instatune_cli").rglob("*.py")) if not skip(p.relative_to(ROOT))]


def test_own_modules_are_imported_at_module_level() -> None:
    files = library_files(lambda rel: "standalone" in rel.parts or any(str(rel).startswith(k) for k in LOCAL_OK))
    bad = [hit for p in files for hit in local_imports(p)]
    assert not bad, "import these at the top of the module (or mark the line `# lazy: why`):\n" + "\n".join(bad)


def found_in(check: Any, src: str, tmp_path: Path) -> list[str]:
    """What `check` reports in a module holding `src`, without the `file:line: ` prefix."""
    f = tmp_path / "m.py"
    f.write_text(src)
    return [h.split(": ", 1)[1] for h in check(f, tmp_path)]


def test_the_local_import_check_catches_one(tmp_path: Path) -> None:
    src = ("def f():\n    from instatune_cli import deliver\n    import instatune_cli.export\n"
           "    from instatune_cli.adapters import elastic  # lazy: imports torch\n    import json\n")
    want = ["from instatune_cli import deliver", "import instatune_cli.export"]
    assert found_in(local_imports, src, tmp_path) == want


def family_tests(path: Path, root: Path = ROOT) -> list[str]:
    """Comparisons of a `modality` or a `model_type` with literal values: a family question a stage should ask
    the family's capabilities or methods instead (docs/architecture.md, "Families")."""
    src = path.read_text()
    found = []
    for n in ast.walk(ast.parse(src)):
        if not isinstance(n, ast.Compare):
            continue
        sides = [n.left, *n.comparators]
        names = {s.attr if isinstance(s, ast.Attribute) else s.id if isinstance(s, ast.Name) else "" for s in sides}
        literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) or
                      isinstance(s, (ast.Set, ast.Tuple, ast.List)) and s.elts and
                      all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in s.elts) for s in sides)
        if names & {"modality", "model_type"} and literal:
            found.append(f"{path.relative_to(root)}:{n.lineno}: {ast.unparse(n)}")
    return found


def test_stages_ask_families_not_modalities() -> None:
    bad = [hit for p in library_files(lambda rel: "adapters" in rel.parts) for hit in family_tests(p)]
    assert not bad, "ask the family (a FamilyAdapter capability or method) instead:\n" + "\n".join(bad)


def test_the_family_check_catches_one(tmp_path: Path) -> None:
    src = ("def f(fam, cfg):\n    a = fam.modality != 'text'\n    b = cfg.model_type in {'roberta', 'x'}\n"
           "    c = fam.quant_search\n    return model_type == other\n")
    assert found_in(family_tests, src, tmp_path) == ["fam.modality != 'text'", "cfg.model_type in {'roberta', 'x'}"]
