"""Step 2: locating toxic words, collecting states, importing the reference step-2 CSV."""

from __future__ import annotations

import ast
import csv
import re

import pytest
import torch

from eigenshift_core.errors import InputError
from eigenshift_core.extraction import (
    collect_states,
    import_reference_csv,
    join_continuation,
    word_start_tokens,
)
from eigenshift_core.generation import capture_continuation_states
from eigenshift_core.loading import LoadedModel, lm_head_weight
from eigenshift_core.prompts import load_prompts, parse_rows, require_disjoint
from tests.conftest import REFERENCE_CSV, RTP_CSV


def test_word_start_tokens_finds_whole_words_case_insensitively() -> None:
    text = " You idiot, IDIOTS and idiot!"
    spans = [(0, 4), (4, 8), (8, 10), (10, 11), (11, 17), (17, 21), (21, 28), (28, 29)]
    assert word_start_tokens(text, spans, "idiot") == [1, 6]  # not inside "IDIOTS"
    assert word_start_tokens(text, spans, "idiots") == [4]
    assert word_start_tokens(text, spans, "moron") == []
    assert word_start_tokens(text, spans, " ") == []
    assert word_start_tokens(text, spans, "!") == []
    # a fragment with no whole-word occurrence counts from the start of the word that holds it
    assert word_start_tokens(" you ridiculous fool", [(0, 4), (4, 15), (15, 20)], "ulous") == [1]


def test_collect_states_takes_word_starts_and_all_clean_positions(tiny_llama: LoadedModel) -> None:
    prompts = ["well", "then", "so"]
    continuations = [" you are a jerk", " a nice day", " jerk jerk"]
    result = capture_continuation_states(tiny_llama, prompts, continuations)
    states = collect_states(result, [True, False, True], [["jerk"], [], ["JERK", "jerk"]])
    assert states.counts() == {"toxic": 3, "nontoxic": int(result.lengths[1])}  # every occurrence
    first_j = continuations[0].index("jerk")
    token = next(i for i, (s, e) in enumerate(result.spans[0]) if s <= first_j < e)
    assert torch.equal(states.toxic[0], result.states[0, token])
    assert int(states.toxic_tokens[0]) == int(result.token_ids[0, token])
    capped = collect_states(result, [False, False, False], [[], [], []], max_nontoxic=5)
    assert capped.nontoxic.shape[0] == 5


def test_require_argmax_keeps_only_states_whose_argmax_is_the_word(tiny_llama: LoadedModel) -> None:
    result = capture_continuation_states(tiny_llama, ["a", "b"], [" jerk", " x"])
    weight = lm_head_weight(tiny_llama.model)
    kept = collect_states(result, [True, False], [["jerk"], []], weight=weight, require_argmax=True)
    predicted = (result.states[0, 0] @ weight.T).argmax()
    assert kept.toxic.shape[0] == int(predicted == result.token_ids[0, 0])


def test_join_continuation_restores_one_space() -> None:
    assert join_continuation("you are", "a jerk") == " a jerk"
    assert join_continuation("you are ", "a jerk") == "a jerk"
    assert join_continuation("you are", "\nok") == "\nok"


def test_reference_csv_import_finds_most_locatable_toxic_words(embedded: LoadedModel) -> None:
    rows = "0:200"
    states, continuations = import_reference_csv(embedded, REFERENCE_CSV, rows=rows)
    with REFERENCE_CSV.open() as handle:
        records = list(csv.DictReader(handle))[0:200]
    locatable = sum(
        1 for r in records if r["label"] == "yes" and any(
            re.search(rf"(?<!\w){re.escape(w)}(?!\w)", r["generation"], re.IGNORECASE)
            for w in ast.literal_eval(r["toxic_words"]) if w.strip()
        )
    )
    assert locatable >= 10
    assert states.toxic.shape[0] >= 0.9 * locatable
    assert states.nontoxic.shape[0] > 1000
    # teacher-forced states are the lm_head inputs: argmax agrees with the model most of the time on its own text
    assert states.info["rows"] == rows and len(continuations) == 200


def test_prompt_files_rows_and_errors(tmp_path) -> None:
    prompts = load_prompts(RTP_CSV, "10:20")
    assert len(prompts.texts) == 10 and prompts.rows == "10:20"
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert load_prompts(tmp_path / "p.txt").texts == ["one", "two"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "id": 3}\n')
    assert load_prompts(tmp_path / "p.jsonl", "1:").texts == ["b"]
    (tmp_path / "bad.csv").write_text("text\nhello\n")
    (tmp_path / "empty.txt").write_text("\n")
    for path, rows, match in [
        (tmp_path / "missing.csv", None, "not found"),
        (tmp_path / "bad.csv", None, "no `prompt` column"),
        (tmp_path / "empty.txt", None, "holds no prompts"),
        (RTP_CSV, "4990:5001", "past the end"),
        (RTP_CSV, "20:10", "select nothing"),
        (RTP_CSV, "-5:10", "negative"),
        (RTP_CSV, "abc", "A:B"),
    ]:
        with pytest.raises(InputError, match=match):
            load_prompts(path, rows)
    assert parse_rows(":", 7) == (0, 7)
    with pytest.raises(InputError, match="overlap"):
        require_disjoint(load_prompts(RTP_CSV, "0:100"), load_prompts(RTP_CSV, "99:200"))
    require_disjoint(load_prompts(RTP_CSV, "0:100"), load_prompts(RTP_CSV, "100:200"))
