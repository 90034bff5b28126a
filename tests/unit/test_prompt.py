import json

import pytest
import torch

from prorank.model.prompt import (
    CHAT_PREFIX,
    CHAT_SUFFIX,
    INVALID,
    TASK_PROMPT,
    PromptBuilder,
    PromptError,
    answer_token_ids,
    check_model_layout,
    parse_judgment,
    prompt_text,
    relevance_score,
)
from prorank.model.scoring import answer_logits

LONG_DOC = "The protein binds the receptor and the cells respond to the treatment. " * 60


@pytest.fixture(scope="module")
def builder(tiny_model):
    return PromptBuilder(tiny_model[1], max_length=120)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_layout_is_the_released_pieces_joined_as_ids(builder):
    """The pieces tokenized one by one and joined, as MxbaiRerankV2.prepare_inputs does (the real client is
    compared in tests/integration/test_clients.py); the text is the released prompt."""
    tok = builder.tokenizer
    query, doc = "does the protein bind?", "Title. The protein binds the receptor."
    ids = builder.encode(query, doc)
    expected = (
        _ids(tok, CHAT_PREFIX)
        + _ids(tok, f"query: {query}")
        + _ids(tok, "\n")
        + _ids(tok, f"document: {doc}")
        + _ids(tok, "\n")
        + _ids(tok, TASK_PROMPT)
        + _ids(tok, CHAT_SUFFIX)
    )
    assert ids == expected
    assert tok.decode(ids) == prompt_text(query, doc)
    assert prompt_text(query, doc) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nquery: does the protein bind?\ndocument: Title. The protein binds the receptor.\n"
        "You are a search relevance expert who evaluates how well documents match search queries. For each "
        "query-document pair, carefully analyze the semantic relationship between them, then provide your "
        "binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:<|im_end|>\n"
        "<|im_start|>assistant\n"
    )  # the answer position is the last prompt token
    assert builder.overhead == len(expected) - len(_ids(tok, f"query: {query}") + _ids(tok, f"\ndocument: {doc}"))


def test_truncation_cuts_query_at_three_quarters_and_document_at_its_end(builder):
    tok = builder.tokenizer
    query = "which cells respond to which treatment " * 30
    ids = builder.encode(query, LONG_DOC)
    assert len(ids) == builder.max_length + builder.overhead  # the document fills the budget exactly
    q = _ids(tok, f"query: {query}")[: builder.max_length * 3 // 4]
    body = (q + _ids(tok, "\n") + _ids(tok, f"document: {LONG_DOC}"))[: builder.max_length]
    assert ids == _ids(tok, CHAT_PREFIX) + body + _ids(tok, "\n") + _ids(tok, TASK_PROMPT) + _ids(tok, CHAT_SUFFIX)
    short = builder.encode("short query", LONG_DOC)  # a short query leaves the document more room
    assert len(short) == len(ids) and tok.decode(short).count("receptor") > tok.decode(ids).count("receptor")


def test_instruction_goes_before_the_query(tiny_model):
    tok = tiny_model[1]
    builder = PromptBuilder(tok, 120, instruction="find the study")
    text = tok.decode(builder.encode("q", "d"))
    assert "<|im_start|>user\ninstruction: find the study\nquery: q\ndocument: d\nYou are" in text
    assert builder.settings() == {
        "layout": "mxbai-v2",
        "max_length": 120,
        "instruction": "find the study",
        "overhead_tokens": builder.overhead,
    }


def test_budget_shrinks_to_the_model_context(tiny_model):
    """As MxbaiRerankV2 does with max_position_embeddings: max_length + overhead never exceeds the limit."""
    tok = tiny_model[1]
    overhead = PromptBuilder(tok, 100).overhead
    builder = PromptBuilder(tok, 100_000, limit=overhead + 64)
    assert builder.max_length == 64 and len(builder.encode("q " * 100, LONG_DOC)) == overhead + 64
    assert PromptBuilder(tok, 50, limit=overhead + 64).max_length == 50


def test_batch_rows_fit_and_keep_order(builder):
    pairs = [("q one", LONG_DOC), ("q two", "short"), ("q three " * 30, LONG_DOC[:500])]
    rows = builder.encode_batch(pairs)
    assert [builder.encode(*p) for p in pairs] == rows
    assert all(len(r) <= builder.max_length + builder.overhead for r in rows)


def test_model_layout_is_checked(tmp_path):
    assert check_model_layout(str(tmp_path)) == {}  # no prorank.json: a base or released model
    (tmp_path / "prorank.json").write_text(json.dumps({"layout": "mxbai-v2", "max_length": 192}))
    assert check_model_layout(str(tmp_path))["max_length"] == 192
    (tmp_path / "prorank.json").write_text(json.dumps({"system_prompt": "...", "max_length": 256}))  # older export
    with pytest.raises(PromptError, match=r"trained with prompt layout 'chat-template' .*prompt.layout is 'mxbai-v2'"):
        check_model_layout(str(tmp_path))
    (tmp_path / "prorank.json").write_bytes(b"\xff{")
    with pytest.raises(PromptError, match=r"prorank.json: not valid JSON"):
        check_model_layout(str(tmp_path))


@pytest.mark.parametrize("shared", [True, False])
def test_score_equals_manual_forward(tiny_model, builder, shared):
    """The one scorer, with and without the shared prefix, equals a plain forward of each prompt alone."""
    model, tok = tiny_model
    pairs = [("q one", LONG_DOC), ("q two", "short doc"), ("third query", LONG_DOC[:300])]
    rows = builder.encode_batch(pairs)
    with torch.no_grad():
        scores = relevance_score(answer_logits(model, rows, builder.answer_ids, tok.pad_token_id, shared))
        for row, score in zip(rows, scores):
            logits = model(torch.tensor([row])).logits[0, -1]
            manual = logits[builder.answer_ids[1]] - logits[builder.answer_ids[0]]
            assert score.item() == pytest.approx(manual.item(), abs=1e-5)


def test_score_has_gradients(tiny_model, builder):
    model, tok = tiny_model
    logits = answer_logits(model, builder.encode_batch([("q", "d")]), builder.answer_ids, tok.pad_token_id)
    relevance_score(logits).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_answer_tokens(tiny_model):
    tok = tiny_model[1]
    zero, one = answer_token_ids(tok)
    assert tok.decode([zero]) == "0" and tok.decode([one]) == "1"

    class TwoTokenAnswers:
        def encode(self, text, add_special_tokens=False):
            return [7, 8] if text == "1" else [5]

    with pytest.raises(PromptError, match=r"answer '1' is 2 tokens \[7, 8\]"):
        answer_token_ids(TwoTokenAnswers())


def test_bad_inputs(tiny_model, builder):
    with pytest.raises(PromptError, match="pair 1: empty query"):
        builder.encode_batch([("q", "d"), ("  ", "d")])
    with pytest.raises(PromptError, match="leaves no room for a query and a document"):
        PromptBuilder(tiny_model[1], max_length=512, limit=90)


@pytest.mark.parametrize(
    "text, strict, expected",
    [
        ("1", True, 1),
        ("0", True, 0),
        (" 1\n", True, 1),
        ("1.", True, INVALID),
        ("10", True, INVALID),
        ("01", True, INVALID),
        ("", True, INVALID),
        ("yes", True, INVALID),
        ("1 relevant", True, INVALID),
        ("1 relevant", False, 1),
        ("0.", False, 0),
        ("10", False, INVALID),
        ("1a", False, INVALID),
        ("", False, INVALID),
    ],
)
def test_parse_judgment(text, strict, expected):
    assert parse_judgment(text, strict=strict) == expected
