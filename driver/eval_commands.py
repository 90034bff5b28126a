"""The `prorank` commands that evaluate and ship a model: eval, compare, plot and export (driver/cli.py
registers them). Role imports stay inside the commands so that `prorank --help` is fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from prorank.corpus.data import DataError
from prorank.driver.cli_options import (
    ConfigOpt,
    Overrides,
    SplitOpt,
    StrictOpt,
    fail,
    fail_on_full_disk,
    given,
    several_values,
    source_values,
)
from prorank.eval.compare import compare_runs, p_value_records, p_values
from prorank.model.models import ModelError, checkpoint_model_dir, load_causal_lm
from prorank.model.prompt import PromptError
from prorank.release.export import adapter_of, export_adapter, export_model
from prorank.release.fusion import FusionSettings, Method
from prorank.run.plots import PlotError, plot_dev_curve
from prorank.settings.config import ModelConfig
from prorank.settings.config_file import ConfigError, load_config


def eval_command(
    config: ConfigOpt = None,
    data: Annotated[
        Optional[list[str]],
        typer.Option(
            help="BEIR folder or hub id (BeIR/scifact, scifact); again for another dataset in the same report "
            "(eval.datasets; NAME=FOLDER names it)."
        ),
    ] = None,
    split: SplitOpt = None,
    model: Annotated[
        Optional[list[str]],
        typer.Option(
            help="Model folder or hub id; none: the first stage only. Again for another model in the same "
            "report (eval.models; NAME=FOLDER names it, else the folder's name)."
        ),
    ] = None,
    top_k: Annotated[Optional[int], typer.Option(help="BM25 candidates per query.")] = None,
    rerank_depth: Annotated[Optional[int], typer.Option(help="How many of them the model reranks.")] = None,
    max_queries: Annotated[
        Optional[int], typer.Option(help="Evaluate a seeded sample of N queries of each dataset (eval.seed).")
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(
            help="float32 (exact), bfloat16, or auto: bfloat16 where the CPU/GPU has native bf16 (model.dtype)."
        ),
    ] = None,
    max_length: Annotated[
        Optional[int],
        typer.Option(
            help="Query + document tokens per prompt (prompt.max_length); above the model's context it "
            "shrinks to fit, as in mxbai-rerank: 100000 scores whole documents."
        ),
    ] = None,
    instruction: Annotated[Optional[str], typer.Option(help="prompt.instruction, before the query.")] = None,
    output: Annotated[
        Optional[Path], typer.Option(help="Write the report (metrics, per-query nDCG@10) as JSON here.")
    ] = None,
    candidates: Annotated[
        Optional[Path],
        typer.Option(help="A TREC run (qid Q0 docid rank score tag) whose candidates are reranked instead of BM25's."),
    ] = None,
    run_out: Annotated[Optional[Path], typer.Option(help="Write the final ranking as a TREC run here.")] = None,
    all_runs: Annotated[
        Optional[bool],
        typer.Option(
            "--all-runs", help="With --run-out: every system's run beside it (<stem>.bm25<suffix>, .model, ...)."
        ),
    ] = None,
    fusion: Annotated[
        Optional[str],
        typer.Option(
            help="auto (the model's own), none, wsum or rrf: fuse with the first stage, tuned on held-out "
            "training queries (eval.fusion)."
        ),
    ] = None,
    runs_dir: Annotated[
        Optional[Path],
        typer.Option(help="With several datasets or models: every system's run as RUNS_DIR/<dataset>/<system>.trec."),
    ] = None,
    strict: StrictOpt = None,
    overrides: Overrides = None,
) -> None:
    """Rerank first-stage candidates (BM25, or --candidates) with a model's relevance score, alone and fused
    with the first stage; report nDCG@10, RR@10, R@100, per-query nDCG@10 and TREC runs. Several datasets
    or models (repeated --data/--model, or eval.datasets/eval.models): one report with a table over them."""

    from prorank.eval.run import run_eval  # noqa: PLC0415 pulls torch, which importing this module does not

    try:
        several = {
            **several_values("eval.datasets", "data", data, "BeIR", split=split, strict=strict),
            **several_values("eval.models", "model", model, dtype=dtype),
        }
        values = {
            **(source_values("data", data[0], "BeIR") if data and "eval.datasets" not in several else {}),
            **(source_values("model", model[0]) if model and "eval.models" not in several else {}),
            **several,
            "data.split": split,
            "bm25.top_k": top_k,
            "eval.rerank_depth": rerank_depth,
            "eval.max_queries": max_queries,
            "eval.batch_size": batch_size,
            "model.dtype": dtype,
            "eval.output": str(output) if output else None,
            "data.strict": strict,
            "eval.candidates": str(candidates) if candidates else None,
            "eval.run_out": str(run_out) if run_out else None,
            "eval.all_runs": all_runs,
            "eval.fusion": fusion,
            "prompt.max_length": max_length,
            "prompt.instruction": instruction,
            "eval.runs_dir": str(runs_dir) if runs_dir else None,
        }
        cfg = load_config(config, overrides or [], given(values))
        if cfg.eval.datasets or cfg.eval.models:
            from prorank.eval.benchmark import run_benchmark  # noqa: PLC0415 as run_eval

            print_benchmark(run_benchmark(cfg), cfg.eval.output)
            return
        report = run_eval(cfg)
    except (ConfigError, DataError, ModelError, PromptError) as err:
        fail(err)
    except OSError as err:
        fail_on_full_disk(err, str(output or run_out or runs_dir or "the output"))

    s = report.settings
    from rich.console import Console  # noqa: PLC0415 rich's tables: only a finished evaluation prints one
    from rich.table import Table  # noqa: PLC0415 as above

    table = Table(title=f"{s['dataset']} / {s['split']}: {s['queries']} of {s['queries_in_split']} queries")
    table.add_column("system")
    for name in next(iter(report.metrics.values())):
        table.add_column(name, justify="right")
    for system, values_ in report.metrics.items():
        table.add_row(system, *(f"{v:.4f}" for v in values_.values()))
    console = Console()
    console.print(table)
    if "fusion" in s:
        tuned = s["fusion"]["tuned_on"]
        console.print(
            f"fused: {FusionSettings(**s['fusion']).describe()} (tuned on {tuned.get('queries', '?')} "
            f"held-out {tuned.get('split', '')} queries)"
        )
    if "model" in report.metrics:
        bounded = s["queries"] < s["queries_in_split"] or s["rerank_depth"] < s["bm25_top_k"]
        console.print(
            f"model {s['model'] if 'model' in s else ''}: reranked the top {s['rerank_depth']} of "
            f"{s['bm25_top_k']} BM25 candidates, query + document cut to {s['max_length']} tokens, {s['dtype']}; "
            f"{s['pairs']} pairs in {report.seconds['model']:.0f}s"
        )
        if bounded:  # its own line: rich wraps long lines, and this is the part a reader must not miss
            console.print("bounded run: not comparable to full-split figures")
    console.print(f"TensorBoard: tensorboard --logdir {s['tensorboard_dir']}")
    for system, path in s.get("run_files", {}).items():
        console.print(f"run of {system} written to {path}")
    if cfg.eval.output:
        console.print(f"report written to {cfg.eval.output}")


def print_benchmark(bench, output: str | None) -> None:
    """The multi-dataset report's table on the console, and where its files went."""
    from rich.console import Console  # noqa: PLC0415 rich's tables: only a finished evaluation prints one
    from rich.table import Table  # noqa: PLC0415 as above

    from prorank.eval.benchmark import MEASURES, markdown_path  # noqa: PLC0415 pulls torch, as run_eval

    table = Table(title=f"{len(bench.reports)} datasets, BM25 top {bench.settings['bm25_top_k']}")
    for column in ("dataset", "system", *MEASURES, "p vs first stage", "queries"):
        table.add_column(column, justify="left" if column in ("dataset", "system") else "right")
    for name, report in bench.reports.items():
        s = report.settings
        for system, values in report.metrics.items():
            p = bench.p_against_first_stage(name, system)
            table.add_row(
                name,
                system,
                *(f"{values[m]:.4f}" for m in MEASURES),
                "" if p is None else f"{p:.3g}",
                f"{s['queries']} of {s['queries_in_split']}",
            )
    for system, values in bench.average.items():
        table.add_row("average", system, *(f"{values[m]:.4f}" for m in MEASURES), "", "")
    console = Console()
    console.print(table)
    for name, report in bench.reports.items():
        for system, path in report.settings.get("run_files", {}).items():
            console.print(f"run of {system} on {name} written to {path}")
    if output:
        console.print(f"report written to {output}, its table to {markdown_path(output)}")


def report_fusion(report: dict, output: Path) -> dict | None:
    """The fusion an `--eval` report applied to the model exported: a single-model report's, or, in a
    report of several models, that of the model evaluated from the export's own folder (re-exported with
    its evaluation, as the recipe does)."""
    settings = report.get("settings", {})
    if "fusion" in settings:
        return settings["fusion"]
    return next(
        (
            about["fusion"]
            for about in settings.get("models", {}).values()
            if about.get("fusion") and about.get("source") and Path(about["source"]).resolve() == output.resolve()
        ),
        None,
    )


def compare_command(
    runs: Annotated[list[Path], typer.Argument(help="Two or more TREC run files.")],
    qrels: Annotated[Path, typer.Option(help="The qrels: TREC (qid 0 docid grade) or BEIR (qrels/<split>.tsv).")],
    test: Annotated[str, typer.Option(help="Paired test: student (t-test) or fisher (randomisation).")] = "student",
    max_p: Annotated[float, typer.Option(help="Significance level.")] = 0.05,
    name: Annotated[Optional[list[str]], typer.Option(help="A name per run, in order; default: file names.")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Write the comparison as JSON here.")] = None,
) -> None:
    """Compare TREC runs with ranx: nDCG@10, RR@10, R@100 and paired significance tests between runs."""

    if test not in ("student", "fisher"):
        fail(ConfigError(f"--test {test!r}: student or fisher"))
    if name and len(name) != len(runs):
        fail(ConfigError(f"{len(name)} --name for {len(runs)} runs"))
    try:
        report = compare_runs(qrels, runs, test, max_p, name)  # type: ignore[arg-type]
    except DataError as err:
        fail(err)
    typer.echo(report.to_table())
    typer.echo(f"\n{'run':<24} {'against':<24} {'measure':<8} {'p-value':>9}")
    rows = p_values(report)
    for a, b, measure, p, significant in rows:
        shown = f"{p:>9.4g}" if p == p else "        -"  # ranx gives no p-value where both runs score alike
        typer.echo(f"{a:<24} {b:<24} {measure:<8} {shown}{'  significant' if significant else ''}")
    if output:
        result = {
            "qrels": str(qrels),
            "runs": [str(r) for r in runs],
            "test": test,
            "max_p": max_p,
            "means": report.results,
            "p_values": p_value_records(report),
        }
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"comparison written to {output}")


def plot_command(
    runs: Annotated[
        list[str],
        typer.Argument(
            help="Run folders (train.output_dir) or their metrics.jsonl, each optionally LABEL=PATH: one curve each."
        ),
    ],
    output: Annotated[Path, typer.Option(help="The PNG to write.")],
    title: Annotated[str, typer.Option(help="Figure title; default: the run folders.")] = "",
    rewards: Annotated[bool, typer.Option(help="Also the warmup's reward curves, and dev nDCG@10 by step.")] = False,
) -> None:
    """Plot dev nDCG@10 against wall-clock hours (BM25 on the same queries as a line) from metrics.jsonl,
    several runs on one axis (an A/B at equal clock); with --rewards, by step beside the warmup's reward and
    format-reward curves."""

    named = []
    for run in runs:
        label, _, path = run.partition("=") if "=" in run and not Path(run).exists() else ("", "", run)
        folder = Path(path)
        named.append(
            (label or (folder.name if len(runs) > 1 else ""), folder / "metrics.jsonl" if folder.is_dir() else folder)
        )
    try:
        typer.echo(f"wrote {plot_dev_curve(named, output, title, rewards)}")
    except PlotError as err:
        fail(err)


def export_command(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint step, a checkpoints folder (its LATEST), or a run's output dir (its final model)."
        ),
    ],
    output: Annotated[Path, typer.Option(help="Folder for the Hugging Face model.")],
    eval_report: Annotated[
        Optional[list[Path]], typer.Option("--eval", help="`prorank eval` JSON report(s) for the model card's table.")
    ] = None,
    config: ConfigOpt = None,
    name: Annotated[Optional[str], typer.Option(help="Model name in the card; default: the folder name.")] = None,
    adapter: Annotated[
        Optional[Path], typer.Option(help="Also write the LoRA adapter (runs with learner.lora) as a peft folder here.")
    ] = None,
    fusion: Annotated[
        Optional[str],
        typer.Option(
            help="wsum or rrf: tune the fusion with the first stage on the held-out training queries of --config "
            "(its train section) and store it; default: the fusion of an --eval report of this model."
        ),
    ] = None,
) -> None:
    """Write a trained model as a Hugging Face model folder: safetensors, tokenizer, model card (with
    learner.lora: the merged model; `--adapter` adds the adapter alone; `--fusion` the fusion with BM25)."""

    try:
        cfg = load_config(config, [])
        reports = []
        for path in eval_report or []:
            try:
                reports.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigError(f"--eval {path}: {err}") from err
        summary = checkpoint / "summary.json"
        if summary.is_file():  # a run dir: its final model
            checkpoint = Path(json.loads(summary.read_text())["model"])
        prompt = None
        if config:  # else the prompt settings the run recorded in its summary
            prompt = cfg.prompt.model_dump()
        if adapter:  # a run without an adapter fails before anything is written
            adapter_of(checkpoint)
        fused = next((FusionSettings(**f) for r in reports if (f := report_fusion(r, output))), None)
        if fusion not in (None, "none", "wsum", "rrf"):
            raise ConfigError(f"--fusion {fusion!r}: wsum, rrf or none")
        if fusion in ("wsum", "rrf"):
            if not config:
                raise ConfigError(
                    "--fusion is tuned on the held-out training queries of a training config: give --config"
                )
            from prorank.eval.fusion import tune_on_held_out  # noqa: PLC0415 pulls torch, which importing this module does not

            model, tokenizer = load_causal_lm(
                ModelConfig(path=checkpoint_model_dir(str(checkpoint)), dtype=cfg.model.dtype)
            )
            method: Method = "rrf" if fusion == "rrf" else "wsum"  # checked to be one of the two above
            fused = tune_on_held_out(cfg, model, tokenizer, method)
            typer.echo(f"fusion tuned on {fused.tuned_on['queries']} held-out queries: {fused.describe()}")
        out = export_model(checkpoint, output, reports, prompt, name, None if fusion == "none" else fused)
        if adapter:
            export_adapter(checkpoint, adapter)
    except (ConfigError, DataError, ModelError, PromptError) as err:
        fail(err)
    except OSError as err:
        fail_on_full_disk(err, str(output))
    typer.echo(f"exported to {out}" + (f"; adapter in {adapter}" if adapter else ""))
