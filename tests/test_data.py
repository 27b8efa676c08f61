"""Data: records from files, tokenization with completion-only labels, chat rows, length limits,
padding, and the resumable batch order."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distill.lm.data import IGNORE_INDEX, BatchOrder, Example, collate, tokenize
from distill.lm.records import read_records
from distill.core.errors import DistillError
from distill.lm.tasks.vocab import word_level_tokenizer

torch.set_num_threads(1)

WORDS = ["the", "cat", "sat", "on", "a", "mat", "hi", "hello", "there", "what", "now",
         "user", "assistant", "system", "user:", "assistant:", "system:", "<start>", "<end>"]
# A minimal jinja chat template in the style of real ones: turns end with EOS, and the
# generation prompt opens the assistant's turn.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start> {{ m['role'] }} {{ m['content'] }} {{ eos_token }} "
                 "{% endfor %}{% if add_generation_prompt %}<start> assistant {% endif %}")


@pytest.fixture
def tokenizer():
    return word_level_tokenizer(WORDS)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def tok(records, tokenizer, **options):
    settings = dict(max_length=64, too_long="truncate", completion_only=True, append_eos=True, field="data.train")
    return tokenize(records, tokenizer, **{**settings, **options})


# ---- tokenization and labels ------------------------------------------------------------------

def test_prompt_completion_masks_exactly_the_prompt(tokenizer):
    [example] = tok([{"prompt": "the cat", "completion": "sat on a mat"}], tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt, completion = [bos, *ids(tokenizer, "the cat")], ids(tokenizer, "sat on a mat")
    assert example.input_ids == prompt + completion + [eos]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + completion + [eos]
    assert example.labels[0] == IGNORE_INDEX  # BOS is part of the prompt


def test_no_eos_without_append_eos(tokenizer):
    [example] = tok([{"prompt": "the cat", "completion": "sat"}], tokenizer, append_eos=False)
    assert example.input_ids == [tokenizer.bos_token_id, *ids(tokenizer, "the cat sat")]
    assert tokenizer.eos_token_id not in example.input_ids


def test_completion_only_false_keeps_prompt_labels(tokenizer):
    [example] = tok([{"prompt": "the cat", "completion": "sat"}], tokenizer, completion_only=False)
    assert example.labels == example.input_ids


def test_text_rows_keep_every_label(tokenizer):
    [example] = tok([{"text": "the cat sat"}], tokenizer, append_eos=False)
    assert example.input_ids == [tokenizer.bos_token_id, *ids(tokenizer, "the cat sat")]
    assert example.labels == example.input_ids


def test_chat_messages_with_template_mask_the_prompt(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    [example] = tok([{"messages": messages}], tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = [bos, *ids(tokenizer, "<start> user hi there"), eos, *ids(tokenizer, "<start> assistant")]
    completion = [*ids(tokenizer, "hello"), eos]  # the template's own EOS ends the turn; none added twice
    assert example.input_ids == prompt + completion
    assert example.labels == [IGNORE_INDEX] * len(prompt) + completion


def test_chat_template_without_eos_gets_one_appended(tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    [example] = tok([{"messages": messages}], tokenizer)
    assert example.input_ids == [*ids(tokenizer, "user: hi assistant: hello there"), tokenizer.eos_token_id]
    assert example.labels[-3:] == [*ids(tokenizer, "hello there"), tokenizer.eos_token_id]
    assert example.labels[:-3] == [IGNORE_INDEX] * (len(example.labels) - 3)


def test_chat_messages_without_template_use_role_transcript(tokenizer):
    assert not tokenizer.chat_template
    messages = [{"role": "system", "content": "a cat"}, {"role": "user", "content": "what now"},
                {"role": "assistant", "content": "sat on a mat"}]
    [example] = tok([{"messages": messages}], tokenizer)
    prompt = [tokenizer.bos_token_id, *ids(tokenizer, "system: a cat user: what now assistant:")]
    completion = [*ids(tokenizer, "sat on a mat"), tokenizer.eos_token_id]
    assert tokenizer.unk_token_id not in prompt
    assert example.input_ids == prompt + completion
    assert example.labels == [IGNORE_INDEX] * len(prompt) + completion


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "user"}], [{"content": "hi"}]])
def test_malformed_messages_are_refused(tokenizer, messages):
    with pytest.raises(DistillError, match="row 0: `messages`") as raised:
        tok([{"messages": messages}], tokenizer)
    assert raised.value.field == "data.train"


def test_rows_with_unknown_keys_name_the_row_and_the_expected_keys(tokenizer):
    records = [{"text": "the cat"}, {"text": "a mat"}, {"question": "what", "answer": "now"}]
    with pytest.raises(DistillError) as raised:
        tok(records, tokenizer, field="data.eval")
    message = str(raised.value)
    assert raised.value.field == "data.eval"
    assert "row 2" in message and "['answer', 'question']" in message
    for expected in ("`prompt`+`completion`", "`text`", "`messages`"):
        assert expected in message


def test_row_that_is_not_an_object(tokenizer):
    with pytest.raises(DistillError, match="row 0: the row is a list"):
        tok([["the", "cat"]], tokenizer)


def test_empty_dataset_is_refused(tokenizer):
    with pytest.raises(DistillError, match="empty") as raised:
        tok([], tokenizer)
    assert raised.value.field == "data.train"


def test_nothing_to_learn_is_refused(tokenizer):
    with pytest.raises(DistillError, match="no example has a token to learn"):
        tok([{"prompt": "the cat", "completion": ""}], tokenizer, append_eos=False)


def test_too_long_truncates_with_a_warning(tokenizer):
    records = [{"prompt": "the cat", "completion": "sat on a mat"}, {"text": "hi"}]
    with pytest.warns(UserWarning, match=r"1 of 2 examples cut to data.max_length=5"):
        first, second = tok(records, tokenizer, max_length=5)
    full = tok(records[:1], tokenizer, max_length=64)[0]
    assert first.input_ids == full.input_ids[:5] and first.labels == full.labels[:5]
    assert len(second.input_ids) == 3  # <bos> hi <eos>: untouched


def test_too_long_refuse_names_max_length(tokenizer):
    records = [{"text": "hi"}, {"prompt": "the cat", "completion": "sat on a mat"}]
    with pytest.raises(DistillError, match="row 1 has 8 tokens, over max_length=5") as raised:
        tok(records, tokenizer, max_length=5, too_long="refuse")
    assert raised.value.field == "data.max_length"
    assert "too_long" in raised.value.fix


def test_exactly_max_length_is_kept(tokenizer, recwarn):
    [example] = tok([{"text": "the cat sat"}], tokenizer, max_length=5, too_long="refuse")
    assert len(example.input_ids) == 5
    assert not [w for w in recwarn if "max_length" in str(w.message)]


# ---- files --------------------------------------------------------------------------------------

RECORDS = [{"prompt": "the cat", "completion": "sat"}, {"prompt": "a", "completion": "mat"},
           {"prompt": "hi", "completion": "there"}]


def test_jsonl_json_and_parquet_read_the_same_records(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n\n" + json.dumps(RECORDS[2]) + "\n")
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(RECORDS, indent=2))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), parquet)
    for path in (jsonl, as_json, parquet):
        assert read_records(str(path), "data.train") == RECORDS, path.suffix


def test_messages_survive_parquet(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert read_records(str(path), "data.train") == rows


def test_malformed_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "the cat"}\n\n{"text": "a mat"\n{"text": "hi"}\n')
    with pytest.raises(DistillError, match="line 3 is not JSON") as raised:
        read_records(str(path), "data.train")
    assert raised.value.field == "data.train"


def test_malformed_json_file_is_a_distill_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"text": "the cat"},\n {"text": }]')
    with pytest.raises(DistillError, match="line 2") as raised:
        read_records(str(path), "data.eval")
    assert raised.value.field == "data.eval"


def test_json_file_that_is_not_a_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"text": "the cat"}')
    with pytest.raises(DistillError, match="not a list of rows"):
        read_records(str(path), "data.train")


def test_corrupt_parquet_is_a_distill_error(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DistillError, match="parquet") as raised:
        read_records(str(path), "data.train")
    assert raised.value.field == "data.train"


def test_missing_file_names_the_field(tmp_path):
    with pytest.raises(DistillError, match="no data file") as raised:
        read_records(str(tmp_path / "nope.jsonl"), "data.eval")
    assert raised.value.field == "data.eval"
    assert str(raised.value).startswith("data.eval:")


# ---- batches ------------------------------------------------------------------------------------

def test_collate_pads_right_and_masks_padding():
    examples = [Example([1, 5, 6, 7], [IGNORE_INDEX, 5, 6, 7]), Example([1, 8], [IGNORE_INDEX, 8])]
    batch = collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 5, 6, 7], [IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_with_nonzero_pad_id():
    batch = collate([Example([4], [4]), Example([4, 4, 4], [4, 4, 4])], pad_token_id=9)
    assert batch["input_ids"][0].tolist() == [4, 9, 9]
    assert batch["labels"][0].tolist() == [4, IGNORE_INDEX, IGNORE_INDEX]


def test_batch_order_is_deterministic_and_seeded():
    assert BatchOrder(10, seed=3).take(0, 25) == BatchOrder(10, seed=3).take(0, 25)
    assert BatchOrder(10, seed=3).take(0, 10) != BatchOrder(10, seed=4).take(0, 10)


def test_batch_order_epochs_are_permutations():
    order = BatchOrder(7, seed=0)
    epochs = [order.take(epoch * 7, 7) for epoch in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(7))
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch


def test_batch_order_is_continuous_across_epoch_boundaries():
    order = BatchOrder(7, seed=1)
    assert order.take(0, 10) + order.take(10, 10) == order.take(0, 20)
    whole = order.take(0, 36)
    for start in range(34):  # resuming at any position continues the same stream
        assert order.take(start, 3) == whole[start:start + 3]
    assert order.take(5, 0) == []
