"""The training-job driver and the `prorank` command: the top layer, which may import every role.

Layers, by folder: `prorank/` is the shared core and imports no role; `actors/`, `reward/`, `learner/`,
`protocol/` and `eval/` are the roles and import the core; `driver/` starts the roles and runs a job.
"""
