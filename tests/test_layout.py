"""The architecture rule: the shared core imports no role; roles import the core, not the CLI."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = {"actors", "reward", "learner", "protocol", "eval"}
TOP_LAYER = {"cli.py", "job.py", "warmup_stage.py", "score_stage.py"}  # on top: may import every role


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_no_role():
    for path in (ROOT / "prorank").rglob("*.py"):
        if path.name not in TOP_LAYER:
            assert not _imports(path) & ROLES, f"{path} imports a role: {_imports(path) & ROLES}"


def test_roles_do_not_import_the_cli():
    for role in ROLES:
        for path in (ROOT / role).rglob("*.py"):
            text = path.read_text()
            assert not any(f"prorank.{top[:-3]}" in text for top in TOP_LAYER), path


def test_user_named_folders_exist():
    for name in ["learner", "actors", "reward", "protocol", "eval", "deploy", "tests", "pyproject.toml", "README.md"]:
        assert (ROOT / name).exists(), name
