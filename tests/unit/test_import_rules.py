"""The import rules between the package's rooms, checked from the source (AST), so that a
forbidden import fails here rather than in review. Every import counts, also those inside
functions and under ``TYPE_CHECKING`` (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "megatron" / "early_exit"
PREFIX = "megatron.early_exit"

# (files, forbidden module prefixes, why)
RULES = [
    ("checkpoint", ("training", "inference", "server", "bench"),
     "the on-disk format is used by training and by inference; it depends on neither"),
    ("config.py", ("model", "pipeline", "training", "inference", "server"),
     "the config is the root every room imports"),
    ("placement.py", ("model", "pipeline", "training", "inference", "server"),
     "placement sits beside the config"),
    ("exit_flags.py", ("model", "pipeline", "training", "inference", "server", "checkpoint"),
     "every entry point parses the exit flags through it"),
    ("inference", ("training", "server", "bench", "data"),
     "the inference library serves the server and the benchmarks, not the other way"),
    ("model", ("pipeline", "training", "inference", "server", "checkpoint", "bench"),
     "the model is built by every room and depends on none of them"),
    ("pipeline", ("training", "inference", "server", "checkpoint", "bench"),
     "the schedule runs under the training loop"),
    ("server", ("training", "bench"),
     "serving loads through checkpoint/ and decodes through inference/"),
    ("data", ("model", "pipeline", "training", "inference", "server", "checkpoint", "bench"),
     "tokenizers and datasets stand alone"),
]  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def rule_files(target: str) -> list[Path]:
    path = PACKAGE / target
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def violations(target: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in rule_files(target):
        for name in sorted(imported_modules(path)):
            for room in forbidden:
                room_name = f"{PREFIX}.{room}"
                if name == room_name or name.startswith(room_name + "."):
                    bad.append(f"{path.relative_to(REPO)} imports {name}")
    return bad


@pytest.mark.parametrize("target, forbidden, why", RULES, ids=[r[0] for r in RULES])
def test_room_imports(target, forbidden, why):
    assert rule_files(target), f"{target}: no such file or folder under {PACKAGE}"
    bad = violations(target, forbidden)
    assert not bad, f"{target} must not import {', '.join(forbidden)} ({why}):\n" + "\n".join(bad)


def test_tools_do_not_edit_sys_path():
    offenders = []
    for path in sorted((REPO / "tools").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "path"
                and isinstance(node.value, ast.Name)
                and node.value.id == "sys"
            ):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, "tools import the installed package; sys.path edits at " + ", ".join(
        offenders
    )


def test_no_megatron_init_and_no_vendored_core():
    assert not (REPO / "megatron" / "__init__.py").exists(), "megatron is a namespace package"
    assert not (REPO / "megatron" / "core").exists(), "megatron.core is installed, not copied"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: an import inside a function and a relative import are found."""
    room = tmp_path / "megatron" / "early_exit" / "checkpoint"
    room.mkdir(parents=True)
    (room / "x.py").write_text(
        "def f():\n    from megatron.early_exit.training import loop\n"
        "from ..inference import engine\n"
    )
    monkeypatch.setattr(__import__(__name__, fromlist=["REPO"]), "REPO", tmp_path)
    monkeypatch.setattr(
        __import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", tmp_path / "megatron" / "early_exit"
    )
    found = violations("checkpoint", ("training", "inference"))
    assert any("megatron.early_exit.training" in v for v in found), found
    assert any("megatron.early_exit.inference" in v for v in found), found
