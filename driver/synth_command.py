"""`prorank synthesize`: a bare corpus to a BEIR folder of synthetic training queries (driver/synthesis.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prorank.corpus.data import DataError
from prorank.driver.cli_options import ConfigOpt, Overrides, fail, fail_on_full_disk, given
from prorank.driver.processes import ending_descendants
from prorank.driver.stop import StopSignals
from prorank.model.models import ModelError
from prorank.settings.config_file import ConfigError, load_config


def synthesize_command(
    config: ConfigOpt = None,
    corpus: Annotated[Optional[Path], typer.Option(help="Folder with corpus.jsonl (synthesis.corpus).")] = None,
    output: Annotated[Optional[Path], typer.Option(help="The BEIR folder written (synthesis.output).")] = None,
    documents: Annotated[
        Optional[int], typer.Option(help="Documents drawn by synthesis.seed (synthesis.documents).")
    ] = None,
    all_documents: Annotated[bool, typer.Option("--all-documents", help="Every document of the corpus.")] = False,
    model: Annotated[Optional[Path], typer.Option(help="The query writer's model folder (synthesis.model).")] = None,
    overrides: Overrides = None,
) -> None:
    """Write queries for a corpus's documents on the rollout actors, filter them, and write a BEIR folder
    (queries.jsonl, qrels/train.tsv, the corpus linked, synthesis.json) that `prorank train` and `prorank
    eval` read as a dataset. Resumable: run it again to go on; SIGTERM/SIGINT stop it, keeping what was written."""
    from prorank.driver.synthesis import synthesize  # noqa: PLC0415 pulls ray, vllm's pool, which importing this module does not

    values = {
        "synthesis.corpus": str(corpus) if corpus else None,
        "synthesis.output": str(output) if output else None,
        "synthesis.documents": documents,
        "synthesis.model": str(model) if model else None,
    }
    try:
        cfg = load_config(config, overrides or [], given(values))
        if all_documents and cfg.synthesis is not None:
            cfg.synthesis.documents = None
        if cfg.synthesis is None:
            raise ConfigError("give a config with a synthesis: section, or --corpus and --output")
    except ConfigError as err:
        fail(err)
    signals = StopSignals(cfg.train.stop_grace_seconds)
    signals.install()
    with ending_descendants():  # the actors' engines and Ray: all ended before we go on
        try:
            report = synthesize(cfg, show_progress=True, signals=signals)
        except (ConfigError, DataError, ModelError, FileNotFoundError) as err:
            fail(err)
        except KeyboardInterrupt:
            typer.echo("stopped at once: what was written is in the log; run the same command to go on", err=True)
            raise typer.Exit(signals.exit_code) from None
        except OSError as err:
            fail_on_full_disk(err, cfg.synthesis.output)
    q = report["queries"]
    rates = ", ".join(f"{name} {s['pass_rate']:.0%}" for name, s in q["filters"].items())
    where = Path(cfg.synthesis.output)
    if report["stopped"]:
        typer.echo(
            f"stopped ({report['stopped']}) after {report['documents']['written']} of "
            f"{report['documents']['drawn']} documents; run the same command to go on",
            err=True,
        )
        raise typer.Exit(signals.exit_code if signals.received else 143)
    typer.echo(
        f"done: {q['kept']} of {q['written']} queries kept ({q['kept_share']:.0%}; {rates}) for "
        f"{report['documents']['written']} documents; dataset {where}, report {where / 'synthesis.json'}"
    )
