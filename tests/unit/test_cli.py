import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prorank.driver.cli import app, source_values
from prorank.run import checkpoints
from prorank.settings.config_file import ConfigError

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_bm25_only_eval_writes_json_and_tensorboard(scifact_dir, tmp_path):
    out = tmp_path / "r.json"
    res = _run(
        "eval", "--data", scifact_dir, "--max-queries", 30, "--output", out, f"eval.tensorboard_dir={tmp_path}/tb"
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert set(report["bm25"]) == {"nDCG@10", "RR@10", "R@100"} and "model" not in report
    assert report["settings"]["queries"] == 30
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert "nDCG@10" in res.output and "bm25" in res.output


def test_model_eval_from_config_file(scifact_dir, tiny_model_dir, tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        f"data: {{path: {scifact_dir}, split: test}}\nmodel: {{path: {tiny_model_dir}}}\n"
        f"prompt: {{max_length: 256}}\nbm25: {{top_k: 20}}\n"
        f"eval: {{rerank_depth: 5, max_queries: 4, output: {tmp_path}/m.json, tensorboard_dir: {tmp_path}/tb}}\n"
    )
    res = _run("eval", "--config", cfg)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert set(report) >= {"bm25", "model"} and report["settings"]["pairs"] == 20
    assert report["settings"]["rerank_depth"] == 5
    # Only the top 5 were reordered: recall at 20 cannot change.
    assert report["model"]["R@100"] == report["bm25"]["R@100"]
    assert "bounded run" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "bm25.topk=3"], "bm25.topk: Extra inputs are not permitted"),
        (["eval", "--top-k", "0"], "bm25.top_k: Input should be greater than or equal to 1"),
        (["eval", "--data", "./no/such/folder"], "no such folder, and not a hub id"),
        (["eval", "--data", "{scifact}", "--split", "dev"], "split 'dev' not found"),
        (["eval", "--data", "{scifact}", "--model", "/no/model"], "no such folder"),
    ],
)
def test_errors_are_clear_and_exit_2(scifact_dir, args, message):
    res = _run(*[a.format(scifact=scifact_dir) for a in args])
    assert res.exit_code == 2
    assert message in res.output


def test_source_values(tmp_path):
    assert source_values("data", str(tmp_path)) == {"data.path": str(tmp_path)}
    assert source_values("data", "scifact", "BeIR") == {"data.path": None, "data.hub_id": "BeIR/scifact"}
    assert source_values("model", "Qwen/Qwen2.5-0.5B-Instruct")["model.hub_id"] == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ConfigError):
        source_values("model", "a/b/c")


def test_tiny_model_command(tmp_path):
    res = _run("tiny-model", "--output", tmp_path / "m")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_console_entry_point_is_installed():
    exe = Path(sys.executable).with_name("prorank")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "eval" in out and "convert-gguf" in out


def test_export_and_scale_refuse_bad_input(tmp_path, tiny_model_dir):
    bad = tmp_path / "report.json"
    bad.write_text("{not json")
    result = runner.invoke(app, ["export", str(tiny_model_dir), "--output", str(tmp_path / "out"), "--eval", str(bad)])
    assert result.exit_code == 2 and "report.json" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["export", str(tmp_path / "empty"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "holds no model" in result.output
    result = runner.invoke(
        app,
        ["export", str(tiny_model_dir), "--output", str(tmp_path / "plain"), "--adapter", str(tmp_path / "adapter")],
    )  # not trained with learner.lora
    assert result.exit_code == 2 and "no LoRA adapter" in result.output
    assert not (tmp_path / "plain").exists() and not (tmp_path / "adapter").exists()  # nothing written
    result = runner.invoke(app, ["export", str(tiny_model_dir), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0 and (tmp_path / "out" / "README.md").is_file()
    result = runner.invoke(app, ["scale", "actors", "--", "-1"])
    assert result.exit_code == 2 and "cannot scale to -1" in result.output


def test_eval_on_data_as_published_and_strict(scifact_dir, tmp_path):
    """SciFact test as some published collections are: one document empty, one relevant document missing
    from the corpus, one qrel for a query that is not there. It evaluates (the missing document counts as
    relevant and never retrieved); --strict refuses it, naming file and line."""
    root = tmp_path / "published"
    (root / "qrels").mkdir(parents=True)
    qrels_lines = (Path(scifact_dir) / "qrels" / "test.tsv").read_text().splitlines()
    missing = qrels_lines[1].split("\t")[1]
    corpus = []
    for line in (Path(scifact_dir) / "corpus.jsonl").read_text().splitlines():
        doc = json.loads(line)
        if doc["_id"] == missing:
            continue
        if len(corpus) == 3:
            doc["title"], doc["text"] = "", ""
        corpus.append(json.dumps(doc))
    (root / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
    (root / "queries.jsonl").write_text((Path(scifact_dir) / "queries.jsonl").read_text())
    (root / "qrels" / "test.tsv").write_text("\n".join(qrels_lines + ["no-such-query\t4983\t1"]) + "\n")

    out = tmp_path / "r.json"
    res = _run("eval", "--data", root, "--max-queries", 5, "--output", out)
    assert res.exit_code == 0, res.output
    first = qrels_lines[1].split("\t")[0]
    assert json.loads(out.read_text())["settings"]["queries"] == 5
    full = _run("eval", "--data", scifact_dir, "--max-queries", 5, "--output", tmp_path / "full.json")
    assert full.exit_code == 0
    # The query whose only relevant document is missing stays in the evaluation with that document
    # relevant and never retrieved (BM25 misses it in the full corpus too): the figures are the full
    # corpus's, where dropping the qrel would have dropped the query and raised the mean.
    got, want = (json.loads(p.read_text())["bm25"] for p in (out, tmp_path / "full.json"))
    assert got == pytest.approx(want, abs=1e-9), (got, want)
    assert first == "1" and (Path(scifact_dir) / "qrels" / "test.tsv").read_text().count("\n1\t") == 1

    res = _run("eval", "--data", root, "--max-queries", 5, "--strict")
    assert res.exit_code == 2 and "corpus.jsonl:4: document" in res.output and "data.strict" in res.output


def test_models_of_another_prompt_layout_are_refused_before_any_work(scifact_dir, tiny_model_dir, tmp_path):
    """A model exported before the released layout (its prorank.json has no layout) is refused by eval,
    train and export, naming both layouts; a legacy config key is an unknown key."""

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_model_dir, legacy)
    (legacy / "prorank.json").write_text(
        json.dumps({"system_prompt": "...", "max_length": 256, "max_query_tokens": 64})
    )
    res = _run("eval", "--data", scifact_dir, "--model", legacy, "--output", tmp_path / "r.json")
    assert res.exit_code == 2 and "'chat-template'" in res.output and "'mxbai-v2'" in res.output
    assert not (tmp_path / "r.json").exists()
    res = _run("train", "--output-dir", tmp_path / "run", f"data.path={scifact_dir}", f"model.path={legacy}")
    assert res.exit_code == 2 and "'chat-template'" in res.output and not (tmp_path / "run").exists()
    run = tmp_path / "old-run"  # a run whose summary recorded the old prompt settings
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, run / "checkpoints" / "step-1" / "model")
    (run / "summary.json").write_text(
        json.dumps(
            {
                "model": str(run / "checkpoints" / "step-1" / "model"),
                "prompt": {"max_length": 256, "max_query_tokens": 64},
            }
        )
    )
    res = _run("export", run, "--output", tmp_path / "out")
    assert res.exit_code == 2 and "'chat-template'" in res.output and not (tmp_path / "out").exists()
    res = _run("eval", "--data", scifact_dir, "prompt.max_query_tokens=64")
    assert res.exit_code == 2 and "prompt.max_query_tokens" in res.output
    res = _run("eval", "--data", scifact_dir, "prompt.layout=chat-template")
    assert res.exit_code == 2 and "prompt.layout" in res.output


def test_bad_inputs_and_outputs_are_refused_before_any_work(scifact_dir, tmp_path):
    """Non-UTF-8 data names file and line; a folder that is not a model, or an --output that is a
    directory, is refused before BM25 runs or TensorBoard is written; all exit 2."""

    data = tmp_path / "data"
    shutil.copytree(scifact_dir, data)
    corpus = data / "corpus.jsonl"
    lines = corpus.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"title": "', b'"title": "\xff\xfe', 1)
    corpus.write_bytes(b"\n".join(lines))
    tb = tmp_path / "tb"
    res = _run("eval", "--data", data, f"eval.tensorboard_dir={tb}")
    assert res.exit_code == 2 and f"{corpus}:3: not UTF-8 (byte 0xff at column" in res.output
    assert "Traceback" not in res.output

    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hello")
    res = _run("eval", "--data", scifact_dir, "--model", tmp_path / "not-a-model", f"eval.tensorboard_dir={tb}")
    assert res.exit_code == 2 and "not a model folder (no config.json)" in res.output

    res = _run("eval", "--data", scifact_dir, "--output", tmp_path, f"eval.tensorboard_dir={tb}")
    assert res.exit_code == 2 and f"eval.output {tmp_path} is a directory" in res.output
    assert not tb.exists()  # nothing was written


def test_train_names_a_data_error_before_its_tensorboard_line(scifact_dir, tiny_model_dir, tmp_path):

    data = tmp_path / "data"
    shutil.copytree(scifact_dir, data)
    (data / "queries.jsonl").write_bytes(b'{"_id": "1", "text": "ok"}\n{"_id": "2", "text": "\xc3("}\n')
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "prorank.driver.cli",
            "train",
            f"data.path={data}",
            f"model.path={tiny_model_dir}",
            f"train.output_dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert res.returncode == 2, res.stderr
    assert f"{data / 'queries.jsonl'}:2: not UTF-8" in res.stderr and "TensorBoard" not in res.stderr
    assert not (tmp_path / "run").exists()


def test_damaged_weights_are_refused_by_export_and_eval_naming_the_file(scifact_dir, tiny_model_dir, tmp_path):

    root = tmp_path / "checkpoints"  # a checkpoint step as the learner commits it, then damaged
    tmp = checkpoints.start(root, 3)
    shutil.copytree(tiny_model_dir, tmp / checkpoints.MODEL)
    step = checkpoints.commit(root, tmp, 3, {})
    weights = step / checkpoints.MODEL / "model.safetensors"
    assert _run("export", root, "--output", tmp_path / "ok").exit_code == 0
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    res = _run("export", root, "--output", tmp_path / "out")
    assert res.exit_code == 2 and f"{step} is damaged, not exported: {weights}: " in res.output, res.output
    assert "written as" in res.output and not (tmp_path / "out").exists()

    bare = tmp_path / "bare"  # a model folder without a checkpoint's file list: its own header tells
    shutil.copytree(step / checkpoints.MODEL, bare)
    res = _run("export", bare, "--output", tmp_path / "out")
    assert res.exit_code == 2 and f"{bare / 'model.safetensors'}: damaged safetensors file" in res.output, res.output
    res = _run("eval", "--data", scifact_dir, "--model", bare, "--max-queries", 2, "--output", tmp_path / "r.json")
    assert res.exit_code == 2 and "damaged safetensors file" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r.json").exists()
    (bare / "model.safetensors").write_bytes(b"\x00" * 7)
    assert "damaged safetensors file" in _run("export", bare, "--output", tmp_path / "out").output


def test_eval_output_on_a_full_disk_is_refused_before_scoring(scifact_dir, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        res = _run("eval", "--data", scifact_dir, "--max-queries", 2, "--output", disk / "r.json")
        assert res.exit_code == 2 and f"eval.output {disk / 'r.json'}: no room on the device" in res.output, res.output
        assert "Traceback" not in res.output and list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize(
    ("args", "folder"),
    [
        ([], "runs/quickstart/train"),
        (["score.steps=100"], "runs/quickstart/train"),
        (["train.output_dir=/tmp/q a", "score.steps=1"], "/tmp/q a"),
        (["--output-dir", "out/b"], "out/b"),
        (["--output-dir=out/c", "train.output_dir=out/d"], "out/d"),
    ],
)
def test_the_quickstart_plots_the_folder_its_arguments_chose(args, folder):
    """scripts/quickstart.sh trains into, and plots, the folder its extra arguments name (issue 47: it
    plotted runs/quickstart/train whatever the job had written to)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "quickstart.sh"
    out = subprocess.run(
        ["bash", "-c", 'source "$0" && output_dir_of "$@"', str(script), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and out.stdout == f"{folder}\n", (out.stdout, out.stderr)
