"""The architecture rule, by folder: core <- roles <- driver, all in the one import package `prorank`.

The core (the rooms of prorank/, and the wire definitions in protocol/) imports no role and not the driver,
and its rooms are layered in the order of ROOMS: a room imports only itself and the rooms before it (the
guard imports none of them; the model reads settings and a run's files; the corpus builds prompts; what a
user takes away is made of everything before it). No module sits loose in prorank/ beside them. A role
(actors/, reward/, learner/, weights/, eval/) imports the core and no other role: what two roles share goes
through the core (the learner and the actors are handed the weight transport's ends by the driver,
prorank/run/weight_transport.py); the driver (driver/) sits on top and may import everything. No module uses
another module's private (underscored) names (third-party internals, such as protobuf's varint coder in
weights/codec.py, are not ours to police here).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ["settings", "guard", "run", "model", "corpus", "release"]  # the core's rooms, lowest first
CORE = {"prorank", "protocol"}
ROLES = {"actors", "reward", "learner", "weights", "eval"}
DRIVER = "driver"
PACKAGE_FOLDERS = sorted(CORE | ROLES | {DRIVER})
TOP_LEVEL = {"actors", "reward", "learner", "protocol", "eval", "driver", "weights"}


def _module_of(name: str) -> str:
    """The folder an absolute import name lives in: prorank.learner.rank -> learner, prorank.corpus.data -> prorank."""
    parts = name.split(".")
    if parts[0] != "prorank":
        return parts[0]
    return parts[1] if len(parts) > 1 and parts[1] in ROLES | {DRIVER, "protocol"} else "prorank"


def _imports(path: Path) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _folders_imported(path: Path) -> set[str]:
    names = set()
    for node in _imports(path):
        if isinstance(node, ast.Import):
            names |= {_module_of(a.name) for a in node.names}
        elif node.module and node.level == 0:
            names.add(_module_of(node.module))
            if node.module == "prorank":  # `from prorank import weights` names a subpackage
                names |= {a.name for a in node.names if a.name in ROLES | {DRIVER, *ROOMS}}
    return names


def _files(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, folder
    return files


def test_core_imports_no_role_and_not_the_driver():
    for folder in [*(f"prorank/{room}" for room in ROOMS), "protocol"]:
        for path in _files(folder):
            bad = _folders_imported(path) & (ROLES | {DRIVER})
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("room", ROOMS)
def test_a_room_of_the_core_imports_only_the_rooms_before_it(room):
    later = set(ROOMS[ROOMS.index(room) + 1 :])
    for path in _files(f"prorank/{room}"):
        bad = _folders_imported(path) & later
        assert not bad, f"{path.relative_to(ROOT)} imports the later room(s) {bad} (order: {' < '.join(ROOMS)})"


def test_the_core_is_its_rooms_each_with_a_docstring():
    loose = sorted(p.name for p in (ROOT / "prorank").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules outside a room of prorank/: {loose}"
    folders = {p.name for p in (ROOT / "prorank").iterdir() if p.is_dir() and not p.is_symlink() and p.name[0] != "_"}
    assert folders == set(ROOMS), folders ^ set(ROOMS)
    for room in ROOMS:
        doc = ast.get_docstring(ast.parse((ROOT / "prorank" / room / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 1, f"prorank/{room}/__init__.py: a one-line docstring"


@pytest.mark.parametrize("role", sorted(ROLES))
def test_a_role_imports_no_other_role_and_not_the_driver(role):
    for path in _files(role):
        bad = _folders_imported(path) & (ROLES | {DRIVER}) - {role}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_no_top_level_import_of_a_role_folder():
    """Installed, the project adds one top-level package, `prorank`: `import learner` would not exist."""
    for folder in [*PACKAGE_FOLDERS, "tests", "bench", "deploy"]:
        for path in _files(folder):
            names = [a.name for n in _imports(path) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module for n in _imports(path) if isinstance(n, ast.ImportFrom) and n.level == 0]
            bad = {name.split(".")[0] for name in names} & TOP_LEVEL
            assert not bad, f"{path.relative_to(ROOT)} imports {bad} outside the prorank package"


def test_nothing_uses_another_modules_private_names():
    found = []
    for folder in [*PACKAGE_FOLDERS, "tests", "bench", "deploy"]:
        for path in _files(folder):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):  # generated by protoc
                continue
            tree = ast.parse(path.read_text())
            modules = set()
            for node in _imports(path):
                if isinstance(node, ast.ImportFrom):
                    ours = node.module and node.module.split(".")[0] in {"prorank", "tests", "bench", "deploy"}
                    private = [
                        a.name for a in node.names if ours and a.name.startswith("_") and not a.name.startswith("__")
                    ]
                    if private:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {private} from {node.module}")
                    modules |= {a.asname or a.name for a in node.names}
                else:
                    modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id in modules
                    and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def test_one_import_package_installs_with_the_command():
    toml = (ROOT / "pyproject.toml").read_text()
    assert 'prorank = "prorank.driver.cli:app"' in toml
    code = (
        "from prorank import Reranker; import prorank.driver.cli as c; print(Reranker.__name__, type(c.app).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0 and out.stdout.startswith("Reranker"), out.stderr


def test_user_named_folders_exist():
    for name in [
        "learner",
        "actors",
        "reward",
        "protocol",
        "eval",
        "deploy",
        "tests",
        "pyproject.toml",
        "README.md",
        DRIVER,
        "weights",
    ]:
        assert (ROOT / name).exists(), name


def test_no_file_over_400_lines():
    for path in ROOT.glob("**/*.py"):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts) or path.name.endswith(
            ("_pb2.py", "_pb2_grpc.py")
        ):
            continue
        if path.relative_to(ROOT).parts[0] in {"models", "runs", "build"}:
            continue
        assert len(path.read_text().splitlines()) <= 400, path.relative_to(ROOT)


def test_the_images_copy_every_folder_of_the_package():
    for dockerfile in sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*")):
        text = dockerfile.read_text()
        for folder in PACKAGE_FOLDERS:
            assert f"COPY {folder} ./{folder}" in text, f"{dockerfile.name} does not copy {folder}/"
