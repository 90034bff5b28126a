"""What the `prorank` commands share: their common options, and how a flag becomes a config value or an error."""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from prorank.settings.config_file import ConfigError

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. bm25.k1=1.2")]
DataOpt = Annotated[Optional[str], typer.Option(help="BEIR folder, or hub id (BeIR/scifact, scifact).")]
SplitOpt = Annotated[Optional[str], typer.Option(help="qrels split, e.g. test or train")]
StrictOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--strict",
        help="Refuse empty documents and qrels naming "
        "unknown documents or queries (data.strict); default: "
        "keep them as the IR tools do, with one warning.",
    ),
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def source_values(section: str, spec: str | None, hub_default_owner: str | None = None) -> dict[str, Any]:
    """`--data`/`--model` value -> config values: an existing folder is `path`, anything shaped like a
    hub id is `hub_id`, and a path-like value that does not exist is an error (not a hub request)."""
    if spec is None:
        return {}
    if Path(spec).is_dir():
        return {f"{section}.path": spec}
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise ConfigError(f"--{section} {spec!r}: no such folder, and not a hub id")
    if hub_default_owner and "/" not in spec:
        spec = f"{hub_default_owner}/{spec}"
    return {f"{section}.path": None, f"{section}.hub_id": spec}


def split_name(spec: str) -> tuple[str, str]:
    """`NAME=SOURCE` -> (NAME, SOURCE); a plain SOURCE (even one holding "=" that exists) -> ("", SOURCE)."""
    name, sep, source = spec.partition("=")
    return (name, source) if sep and not Path(spec).exists() else ("", spec)


def several_values(
    key: str, flag: str, specs: list[str] | None, hub_default_owner: str | None = None, **common
) -> dict[str, Any]:
    """Repeated `--data`/`--model` values -> `{key: [entry, ...]}` (eval.datasets, eval.models), each
    `NAME=SOURCE` or `SOURCE` (named after the folder), with the `common` keys the flags gave; {} for one
    unnamed value (it is `data`/`model` itself)."""
    named = [split_name(spec) for spec in specs or []]
    if len(named) < 2 and not any(name for name, _ in named):
        return {}
    entries = []
    for name, source in named:
        entry = {k.split(".")[-1]: v for k, v in source_values(flag, source, hub_default_owner).items()}
        entry = {k: v for k, v in entry.items() if v is not None}
        if name or flag == "model":  # a model's rows need a name; a dataset's defaults to its folder's
            entry["name"] = name or Path(source.rstrip("/")).name
        entries.append({**entry, **{k: v for k, v in common.items() if v is not None}})
    return {key: entries}


def given(values: dict[str, Any]) -> dict[str, Any]:
    """Flag values the user gave; a source's `path` stays even when None, to clear the config's."""
    return {k: v for k, v in values.items() if v is not None or k.endswith(".path")}


def fail(err: Exception | str) -> NoReturn:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def fail_on_full_disk(err: OSError, where: str) -> None:
    """A full disk (or quota) is a clear error naming the file, never a traceback; other OSErrors go on."""

    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fail(f"no space left on the device holding {err.filename or where} ({err.strerror})")
    raise err
