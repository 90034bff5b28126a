"""ProRank RL's shared core, in rooms by concern (lowest first; a room imports only those before it):
`settings` (configuration), `guard` (the services' guard), `run` (a run's files), `model` (the model and its
prompt), `corpus` (data and the first stage), `release` (what a user takes away).

`from prorank import Reranker` is the Python API to a trained model (loaded lazily, so that importing
the core stays light).

`prorank` is also the project's one import package: the role folders beside this one in the repository
(learner/, actors/, reward/, weights/, protocol/, eval/, driver/) are its subpackages through the relative
symlinks in this folder (prorank/learner -> ../learner), so an import path is a file path: a git worktree
of the A/B benches, run with PYTHONPATH at its root, imports its own roles through its own links."""


def __getattr__(name: str):
    if name in ("Reranker", "RankedDocument"):
        from prorank.release import reranker  # noqa: PLC0415 on first use: every `import prorank.x` runs this file

        return getattr(reranker, name)
    raise AttributeError(f"module 'prorank' has no attribute {name!r}")
