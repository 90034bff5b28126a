import pytest
import torch

from prorank.prompt import (
    INVALID, SYSTEM_PROMPT, PromptBuilder, PromptError, answer_token_ids, messages,
    parse_judgment, relevance_score,
)
from prorank.scoring import answer_logits

LONG_DOC = "The protein binds the receptor and the cells respond to the treatment. " * 60


@pytest.fixture(scope="module")
def builder(tiny_model):
    return PromptBuilder(tiny_model[1], max_length=256, max_query_tokens=16)


def test_layout_matches_plain_chat_template(builder):
    tok = builder.tokenizer
    ids = builder.encode("does the protein bind?", "Title. The protein binds the receptor.")
    plain = tok.apply_chat_template(
        messages("does the protein bind?", "Title. The protein binds the receptor."),
        add_generation_prompt=True, return_dict=False,
    )
    assert ids == list(plain)
    text = tok.decode(ids)
    assert SYSTEM_PROMPT in text
    assert "query: does the protein bind?\ndocument: Title. The protein binds the receptor.\nRelevance:" in text
    assert text.endswith("<|im_start|>assistant\n")  # the answer position is the last prompt token


def test_truncation_is_by_tokens(builder):
    tok = builder.tokenizer
    query = "which cells respond to which treatment " * 10
    ids = builder.encode(query, LONG_DOC)
    assert builder.max_length - 4 <= len(ids) <= builder.max_length  # the document fills the budget
    text = tok.decode(ids)
    kept_query = text.split("query: ")[1].split("\ndocument:")[0]
    assert len(tok.encode(kept_query, add_special_tokens=False)) <= builder.max_query_tokens + 1
    assert query.startswith(kept_query)
    kept_doc = text.split("document: ")[1].split("\nRelevance:")[0]
    assert LONG_DOC.startswith(kept_doc) and len(kept_doc) < len(LONG_DOC)
    assert text.endswith("\nRelevance:<|im_end|>\n<|im_start|>assistant\n")


def test_batch_rows_fit_and_keep_order(builder):
    pairs = [("q one", LONG_DOC), ("q two", "short"), ("q three " * 30, LONG_DOC[:500])]
    rows = builder.encode_batch(pairs)
    assert [builder.encode(*p) for p in pairs] == rows
    assert all(len(r) <= builder.max_length for r in rows)


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
    with pytest.raises(PromptError, match="leaves no room for a document"):
        PromptBuilder(tiny_model[1], max_length=160, max_query_tokens=16)


@pytest.mark.parametrize(
    "text, strict, expected",
    [("1", True, 1), ("0", True, 0), (" 1\n", True, 1), ("1.", True, INVALID), ("10", True, INVALID),
     ("01", True, INVALID), ("", True, INVALID), ("yes", True, INVALID), ("1 relevant", True, INVALID),
     ("1 relevant", False, 1), ("0.", False, 0), ("10", False, INVALID), ("1a", False, INVALID),
     ("", False, INVALID)],
)
def test_parse_judgment(text, strict, expected):
    assert parse_judgment(text, strict=strict) == expected
