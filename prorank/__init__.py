"""ProRank RL shared core: config, data, first-stage retrieval, prompt and score, models.

`from prorank import Reranker` is the Python API to a trained model (loaded lazily, so that importing
the core stays light).

`prorank` is also the project's one import package: the role folders beside this one in the repository
(learner/, actors/, reward/, weights/, protocol/, eval/, driver/) are its subpackages, prorank.learner and so on.
Installed, setuptools puts them inside it (pyproject's package-dir). Run from a checkout (PYTHONPATH, the
git worktrees of the A/B benches, an editable install) they are found through the repository root added
to this package's path below, so a worktree always runs its own roles, never another checkout's."""

from pathlib import Path as _Path

_REPO = _Path(__file__).resolve().parent.parent
if (_REPO / "pyproject.toml").is_file() and (_REPO / "driver").is_dir():
    __path__.append(str(_REPO))


def __getattr__(name: str):
    if name in ("Reranker", "RankedDocument"):
        from prorank import reranker

        return getattr(reranker, name)
    raise AttributeError(f"module 'prorank' has no attribute {name!r}")
