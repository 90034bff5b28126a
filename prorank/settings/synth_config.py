"""The `synthesis:` section: queries written by the rollout actors for a corpus without labels, the filters
that keep those leading back to their document, and the BEIR folder they become (driver/synthesis.py).
"""

from __future__ import annotations

from pydantic import Field, ValidationError, field_validator, model_validator

from prorank.settings.section import Section

# SciFact-style: the main finding of an abstract as a claim. Measured on SmolLM2-135M-Instruct: a few-shot
# prompt made it copy the examples; an instruction alone gives claim-like sentences after a stock prefix.
DEFAULT_INSTRUCTION = (
    "{title}\n{text}\n\nState the main finding of this abstract as one short sentence. Answer with the sentence only."
)
DEFAULT_STRIP = (
    r"^[^\"“:]{0,160}\b(is|are|was|sentence)\s*:\s*",  # 'One short sentence ... is: "..."'
    r"^(the )?(main|key|primary) (finding|result|conclusion)s?( of (this|the) (study|abstract|paper|article|research))?"
    r"( is| was| are)?( that)?[:,]?\s+",
    r"^((this|the|a|one) )?(study|abstract|paper|article|research)( \w+)? (shows|showed|found|finds|states|suggests|"
    r"demonstrates|reports|indicates|reveals|identifies|concludes)( that)?\s+",
    r"^(sentence|claim|answer|query|question|counter-?argument)\s*:\s*",
)


class SynthesisPrompt(Section):
    """What the query writer is asked. `instruction` is the user turn of the model's chat template, with
    `{title}` and `{text}` of the document (cut to `max_document_tokens`); `strip_prefixes` are regular
    expressions (case-insensitive) removed from the start of each answer, in order."""

    system: str | None = None
    instruction: str = DEFAULT_INSTRUCTION
    strip_prefixes: list[str] = list(DEFAULT_STRIP)
    max_document_tokens: int = Field(256, ge=16)
    sentences: int = Field(1, ge=1)  # of each answer's first line kept as the query

    @model_validator(mode="after")
    def _placeholders(self) -> SynthesisPrompt:
        if "{text}" not in self.instruction:
            raise ValueError("synthesis.prompt.instruction must contain {text} (the document)")
        try:
            self.instruction.format(title="", text="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"synthesis.prompt.instruction: only {{title}} and {{text}} may be filled in ({err!r})"
            ) from None
        return self


class SynthesisFilters(Section):
    """Each filter can be switched off; the report gives every filter's pass rate."""

    min_words: int = Field(3, ge=1)  # well-formed: length bounds, in words
    max_words: int = Field(40, ge=1)
    max_copied_words: int = Field(20, ge=0)  # the longest run of words copied from the document; 0: no check
    max_repeated_share: float = Field(0.5, gt=0, le=1)  # share of words that repeat an earlier word
    dedupe: bool = True  # the same query (case and punctuation folded) written twice: the first is kept
    round_trip_k: int = Field(20, ge=0)  # the source document in the first stage's top k; 0: off
    # The query writer's own relevance score of (query, source): keep this top share (InPars-v2); None: off.
    # Promptagator: filtering by the model being trained overfits small corpora.
    model_score_keep: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _bounds(self) -> SynthesisFilters:
        if self.min_words > self.max_words:
            raise ValueError(f"synthesis.filters: min_words {self.min_words} > max_words {self.max_words}")
        return self


class SynthesisConfig(Section):
    """A bare corpus to a BEIR folder of synthetic training queries: `queries_per_document` queries for each
    of `documents` documents drawn by `seed` (or the `doc_ids` listed), written by the rollout actors."""

    corpus: str  # a folder with corpus.jsonl (its queries.jsonl, if any, only reserves ids)
    output: str  # the BEIR folder written: queries.jsonl, qrels/train.tsv, corpus.jsonl -> corpus, synthesis.json
    model: str | None = None  # the query writer's model folder; None: the job's start model (`model`)
    documents: int | None = Field(1000, ge=1)  # None: every document
    doc_ids: list[str] = []  # these documents instead of a sample
    seed: int = 0  # of the document sample and the sampling
    queries_per_document: int = Field(2, ge=1)
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(48, ge=4)
    prompt: SynthesisPrompt = SynthesisPrompt()
    filters: SynthesisFilters = SynthesisFilters()
    id_prefix: str = Field("syn", pattern=r"^[\w.]+$")  # query ids: <prefix>-<doc id>-<sample>
    # Also the real queries and qrels of this split of `corpus` (labels where they exist, plus synthesis).
    include_split: str | None = None
    chunk_documents: int = Field(8, ge=1)  # documents per actor call
    examples: int = Field(12, ge=0)  # kept queries beside their documents in synthesis.json

    @field_validator("doc_ids", mode="before")
    @classmethod
    def _ids_as_text(cls, value):
        # YAML reads SciFact's ids (4983) as numbers; a document id is text.
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value or []]

    def generation_settings(self) -> dict:
        """What a resumed synthesis must share with the one it continues (the filters may change)."""
        return self.model_dump(
            include={"corpus", "model", "documents", "doc_ids", "seed", "queries_per_document", "temperature"}
            | {"top_p", "max_tokens", "prompt"}
        )

    @classmethod
    def filled_settings(cls, stored: dict) -> dict:
        """`generation_settings` as a log written by an older version would give them now: keys added since
        at their defaults. Settings that no longer validate come back as they are (and will differ)."""
        try:
            filled = cls.model_validate({"output": "", **stored}).generation_settings()
        except ValidationError:
            return stored
        return {**filled, "model": stored.get("model")}  # the writer's resolved folder, as the log holds it
