"""Query synthesis, read top to bottom: a bare corpus in, a BEIR folder of synthetic training queries out.

`prorank synthesize` runs it alone; `prorank train` runs it first when the config has a `synthesis:`
section whose output is not complete yet, so one command takes a corpus to a trained model.

1. Check everything before any work: the corpus, the documents named or drawn (seeded), the query
   writer's model and chat template, the settings of a log being resumed.
2. The rollout actors (actors/pool.py, without weight sync) write `queries_per_document` queries for each
   document not yet in the log, in chunks over the pool; `prorank scale actors N --job <train.job_name>`
   resizes the pool meanwhile, `prorank stop` or SIGTERM/SIGINT end it cleanly (what was written stays).
3. The filters (prorank/corpus/query_filters.py) run over the whole log, the folder and its report are written
   (prorank/corpus/synthetic_dataset.py).
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import ExitStack
from pathlib import Path

import ray

from prorank.actors.pool import ActorPool
from prorank.corpus.data import DataError, Document, load_corpus, load_local
from prorank.corpus.query_filters import run_filters
from prorank.corpus.query_writing import QueryPromptBuilder, judge
from prorank.corpus.synthetic_dataset import REPORT, GenerationLog, read_report, write_beir_folder
from prorank.driver.control import start_control, wanted_actors
from prorank.driver.ray_session import ray_kill, start_ray
from prorank.driver.stop import StopSignals
from prorank.model.models import check_model_folder, load_tokenizer, resolve_model
from prorank.run.progress import progress
from prorank.settings.config import ProRankConfig
from prorank.settings.config_file import ConfigError
from prorank.settings.synth_config import SynthesisConfig

log = logging.getLogger(__name__)

CONTROL_EVERY_SECONDS = 5.0


def synthesis_complete(sc: SynthesisConfig) -> bool:
    """Whether `sc.output` holds a finished synthesis made with exactly these settings."""
    done = read_report(sc.output)
    return bool(done.get("complete")) and done.get("config") == sc.model_dump()


def pick_documents(corpus: dict[str, Document], sc: SynthesisConfig) -> list[str]:
    """The documents to write queries for: `doc_ids` (each must be in the corpus), else a seeded sample of
    `documents` (all when None), in corpus order."""
    if sc.doc_ids:
        missing = [d for d in sc.doc_ids if d not in corpus]
        if missing:
            raise DataError(
                f"synthesis.doc_ids: {len(missing)} not in {Path(sc.corpus) / 'corpus.jsonl'}: {missing[:5]}"
            )
        return list(dict.fromkeys(sc.doc_ids))
    ids = [d for d, doc in corpus.items() if doc.title.strip() or doc.text.strip()]
    if sc.documents is None or sc.documents >= len(ids):
        return ids
    chosen = set(random.Random(sc.seed).sample(ids, sc.documents))
    return [d for d in ids if d in chosen]


def synthesize(cfg: ProRankConfig, show_progress: bool = True, signals: StopSignals | None = None) -> dict:
    """Run (or finish) `cfg.synthesis`; returns its report, also written to <output>/synthesis.json."""
    sc = cfg.synthesis
    if sc is None:
        raise ConfigError("no synthesis: section in the config")
    started = time.monotonic()
    corpus = load_corpus(sc.corpus, cfg.data.strict)
    doc_ids = pick_documents(corpus, sc)
    if sc.include_split:
        load_local(sc.corpus, sc.include_split)  # its queries and qrels must load, before any work
    writer = check_model_folder(sc.model) if sc.model else resolve_model(cfg.model)
    try:
        builder = QueryPromptBuilder(load_tokenizer(writer), sc, cfg.actors.max_model_len)
    except ValueError as err:
        raise ConfigError(f"synthesis: {err}") from None
    generations = GenerationLog(
        sc.output, {**sc.generation_settings(), "model": writer}, fill=SynthesisConfig.filled_settings
    )
    done = generations.done()
    todo = [d for d in doc_ids if d not in done]
    earlier = read_report(sc.output) if done else {}  # a resume adds to the writing time, not replaces it
    stopped = ""

    with ExitStack() as stack:
        pool, actors, clock = None, 0, time.monotonic()
        # A finished log without the model-score filter needs no engine: the filters and the folder only.
        if todo or sc.filters.model_score_keep is not None:
            start_ray(cfg, stack)
            halt: list[str] = []
            if signals:
                signals.install(on_stop=lambda: halt.append(f"{signals.name} received"))
            control = start_control(cfg.train.job_name)
            stack.callback(ray_kill, control)
            # The writer's engine: no weight sync; judgments' sampling and prompt are not used here.
            sampling = cfg.sampling.model_copy(update={"seed": sc.seed})  # the engines' generators
            pool = ActorPool(writer, cfg.actors, sampling, cfg.prompt).start(wait=False)
            stack.callback(pool.shutdown)
            clock = time.monotonic()
            if todo:
                stopped = _write(pool, control, cfg, builder, corpus, todo, generations, halt, len(done), show_progress)
            if signals:
                signals.disarm()
            actors = pool.size
        gen_seconds = time.monotonic() - clock

        clock = time.monotonic()
        by_doc = {r["doc_id"]: r for r in generations.records()}
        order = [by_doc[d] for d in doc_ids if d in by_doc]  # document order: the same kept set every run
        rules = sc
        if stopped:  # a stop is quick: the partial folder skips the model-score filter (a pass over every pair)
            rules = sc.model_copy(update={"filters": sc.filters.model_copy(update={"model_score_keep": None})})
        score = _pair_scorer(pool) if pool and rules.filters.model_score_keep is not None else None
        filtered = run_filters(order, corpus, rules, cfg.bm25, score)
        filter_seconds = time.monotonic() - clock

    complete = not stopped and len(order) == len(doc_ids) and bool(filtered.kept)
    new = len(order) - len(done)
    report = _report(
        cfg, writer, doc_ids, order, filtered, corpus, (gen_seconds, new, filter_seconds), actors, complete, earlier
    )
    report["stopped"] = stopped
    report["seconds"]["total"] = round(time.monotonic() - started, 1)
    queries = {c.query_id: c.text for c in filtered.kept}
    write_beir_folder(
        sc.output, sc.corpus, queries, {c.query_id: c.doc_id for c in filtered.kept}, report, sc.include_split
    )
    if not filtered.kept and not stopped:
        dropped = ", ".join(f"{n} {why}" for why, n in report["queries"]["dropped"].items())
        raise DataError(
            f"no synthetic query passed the filters ({dropped or 'none written'}): see {Path(sc.output) / REPORT}"
        )
    return report


def _write(pool, control, cfg, builder, corpus, todo, generations, halt, already, show_progress) -> str:
    """Stream the documents through the pool into the log; returns why it stopped early ("" if it did not)."""
    sc = cfg.synthesis
    pool.submit([builder.request(corpus[d]) for d in todo], "write_queries", sc.chunk_documents)
    bar = progress(len(todo) + already, "writing queries", unit="doc", enabled=show_progress)
    bar.update(already)
    written = well_formed = 0
    remaining, next_control = len(todo), 0.0
    try:
        while remaining:
            if halt:
                return halt[0]
            if time.monotonic() >= next_control:
                next_control = time.monotonic() + CONTROL_EVERY_SECONDS
                if ray.get(control.stop_requested.remote(), timeout=10):
                    return "prorank stop"
                want = wanted_actors(control, cfg.actors.per_node, cfg.actors.resources, pool.size)
                if want != pool.size:
                    log.info("synthesis: %d -> %d actors", pool.size, want)
                    pool.scale(want)
                control.report.remote({"stage": "synthesis", "actors": pool.size, "documents_left": remaining})
            results = pool.poll(timeout=1.0)
            generations.append([_record(r) for r in results])
            for r in results:
                judged = [judge(t, f, corpus[r.doc_id], sc)[1] for t, f in zip(r.texts, r.finish_reasons)]
                written += len(judged)
                well_formed += judged.count(None)
            remaining -= len(results)
            bar.update(len(results))
            if written:
                bar.set_postfix(well_formed=f"{well_formed / written:.0%}", actors=pool.size, refresh=False)
    finally:
        bar.close()
    return ""


def _record(result) -> dict:
    return {
        "doc_id": result.doc_id,
        "texts": result.texts,
        "finish_reasons": result.finish_reasons,
        "actor": result.actor,
        "version": result.version,
    }


def _pair_scorer(pool):
    def score(pairs: list[tuple[str, str]]) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(pairs), 256):
            ref, _ = pool.score(pairs[i : i + 256])
            scores += pool.scored(ray.get(ref))["scores"]
        return scores

    return score


def _report(cfg, writer, doc_ids, order, filtered, corpus, timing, actors, complete, earlier) -> dict:
    sc = cfg.synthesis
    gen_seconds, new, filter_seconds = timing
    before = (earlier.get("seconds") or {}).get("generation") or 0.0
    speed = round(new / gen_seconds, 3) if gen_seconds and new else earlier.get("documents_per_second")
    rng = random.Random(sc.seed)
    examples = rng.sample(filtered.kept, min(sc.examples, len(filtered.kept)))
    return {
        "dataset": Path(sc.output).name,
        "corpus": str(sc.corpus),
        "writer_model": writer,
        "complete": complete,
        "documents": {"drawn": len(doc_ids), "written": len(order), "written_this_run": new, "in_corpus": len(corpus)},
        "queries": filtered.as_dict(),
        # How easy the kept queries are for the first stage: their source's rank in the round trip.
        "round_trip_ranks": _rank_bins([c.rank for c in filtered.kept if c.rank is not None]),
        "include_split": sc.include_split,
        # generation: every run's writing so far; documents/s: the last run that wrote any
        "seconds": {"generation": round(before + gen_seconds, 1), "filters": round(filter_seconds, 1)},
        "documents_per_second": speed,
        "actors": actors,
        "examples": [
            {
                "query_id": c.query_id,
                "query": c.text,
                "written": c.raw,
                "doc_id": c.doc_id,
                "round_trip_rank": c.rank,
                "title": corpus[c.doc_id].title,
                "text": corpus[c.doc_id].text[:400],
            }
            for c in examples
        ],
        "config": sc.model_dump(),
    }


def _rank_bins(ranks: list[int]) -> dict[str, int]:
    bins = {"1": 0, "2-5": 0, "6-10": 0, "11+": 0}
    for r in ranks:
        bins["1" if r == 1 else "2-5" if r <= 5 else "6-10" if r <= 10 else "11+"] += 1
    return bins
