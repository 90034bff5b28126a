"""The architecture rule, by folder: core <- roles <- driver.

`prorank/` (the shared core) imports no role and not the driver; the roles import the core and no other
role's driver code; `driver/` (the job and the CLI) sits on top and may import everything.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = "prorank"
ROLES = {"actors", "reward", "learner", "protocol", "eval"}
DRIVER = "driver"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _files(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, folder
    return files


def test_core_imports_no_role_and_not_the_driver():
    for path in _files(CORE):
        assert not _imports(path) & (ROLES | {DRIVER}), f"{path} imports {_imports(path) & (ROLES | {DRIVER})}"


def test_roles_do_not_import_the_driver():
    for role in ROLES:
        for path in _files(role):
            assert DRIVER not in _imports(path), path


def test_the_core_and_the_command_still_work_from_their_old_names():
    code = "from prorank import Reranker; import driver.cli as c; print(Reranker.__name__, type(c.app).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("Reranker"), out.stderr
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'prorank = "driver.cli:app"' in scripts and '"driver*"' in scripts


def test_user_named_folders_exist():
    for name in ["learner", "actors", "reward", "protocol", "eval", "deploy", "tests", "pyproject.toml", "README.md",
                 DRIVER]:
        assert (ROOT / name).exists(), name
