"""Bad dataset files give a DatasetError naming the file and line/record/row, never a raw
TypeError/KeyError/ValueError; strict booleans, letter answers, and `load_prompts`."""

import csv
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sst_jax.data.sources import load_beavertails, load_mmlu, load_prompts, parse_answer, parse_bool
from sst_jax.errors import DatasetError, SstJaxError

BT_ROW = {"prompt": "How can I hurt a cat?", "response": "Here is how...",
          "category": {"animal_abuse": True, "privacy_violation": False}, "is_safe": False}
MMLU_ROW = {"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}
PROMPT_ROW = {"prompt": "Tell me a joke", "response": "Why did the chicken..."}


def write(path, rows):
    """rows in the format of path's suffix; CSV carries lists/dicts as JSON text."""
    path = str(path)
    if path.endswith(".jsonl"):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(rows, f)
    elif path.endswith(".csv"):
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ------------------------------------------------------------------- item 7: the named fixes


def test_jsonl_line_that_is_not_an_object_names_file_and_line(tmp_path):
    path = tmp_path / "bt.jsonl"
    path.write_text(json.dumps(BT_ROW) + "\n" + json.dumps(["a", "list"]) + "\n")
    with pytest.raises(DatasetError, match=r"bt\.jsonl, line 2: expected a JSON object .*got list"):
        load_beavertails(str(path))


@pytest.mark.parametrize("letter, index", [("B", 1), ("b", 1), ("(C)", 2), (" d ", 3), ("A.", 0), ("2", 2), (3, 3)])
def test_mmlu_letter_answers_are_accepted(tmp_path, letter, index):
    path = write(tmp_path / "m.jsonl", [dict(MMLU_ROW, answer=letter)])
    assert load_mmlu(path)[0].answer == index


def test_mmlu_bad_answer_names_file_line_and_value(tmp_path):
    path = write(tmp_path / "m.jsonl", [MMLU_ROW, dict(MMLU_ROW, answer="E")])
    with pytest.raises(DatasetError, match=r"m\.jsonl, line 2: 'answer' must be 0-3 or a letter A-D, got str 'E'"):
        load_mmlu(path)


def test_is_safe_false_string_is_false_and_garbage_is_refused(tmp_path):
    rows = [dict(BT_ROW, is_safe="false"), dict(BT_ROW, prompt="How do plants grow?", is_safe="True",
                                                category={"animal_abuse": "no"})]
    path = write(tmp_path / "bt.jsonl", rows)
    prompts = load_beavertails(path, harmful_only=False)
    assert {p.text: p.kind for p in prompts} == {"How can I hurt a cat?": "harmful", "How do plants grow?": "benign"}
    path = write(tmp_path / "bad.jsonl", [BT_ROW, dict(BT_ROW, is_safe="maybe")])
    with pytest.raises(DatasetError, match=r"bad\.jsonl, line 2: 'is_safe' must be a boolean .*got str 'maybe'"):
        load_beavertails(path)


@pytest.mark.parametrize("value, expected", [(True, True), (0, False), (1, True), ("YES", True), (" no", False),
                                             ("1", True), ("0", False), ("false", False)])
def test_parse_bool_accepts_the_documented_spellings(value, expected):
    assert parse_bool(value, "f, line 1", "is_safe") is expected


@pytest.mark.parametrize("value", [2, "", "nope", None, [True], 0.5])
def test_parse_bool_refuses_everything_else(value):
    with pytest.raises(DatasetError, match="f, line 1: 'x' must be a boolean"):
        parse_bool(value, "f, line 1", "x")


def test_parse_answer_refuses_out_of_range_and_bools():
    for bad in (4, -1, True, "AB", "E", 1.5, None):
        with pytest.raises(DatasetError, match="must be 0-3 or a letter A-D"):
            parse_answer(bad, "f, row 3")


def test_missing_field_names_file_line_and_present_fields(tmp_path):
    path = write(tmp_path / "p.jsonl", [PROMPT_ROW, {"text": "hi", "response": "x"}])
    with pytest.raises(DatasetError,
                       match=r"p\.jsonl, line 2: missing field 'prompt' \(fields present: text, response\)"):
        load_prompts(path)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_load_prompts_reads_every_format(tmp_path, suffix):
    rows = [PROMPT_ROW, {"prompt": "Summarize this", "response": None}, {"prompt": "No response field"}]
    if suffix == ".parquet":
        rows = [dict(r, response=r.get("response")) for r in rows]
    path = write(tmp_path / f"p{suffix}", rows)
    got = load_prompts(path)
    want_none = "" if suffix == ".csv" else None  # CSV has no null: an empty cell is ""
    assert got == [("Tell me a joke", "Why did the chicken..."), ("Summarize this", want_none),
                   ("No response field", want_none)]


def test_load_prompts_accepts_data_key_and_other_field(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"instruction": "a"}, {"instruction": "b"}]}))
    assert load_prompts(path, field="instruction") == [("a", None), ("b", None)]


def test_load_prompts_refuses_empty_and_too_short_files(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match=r"e\.jsonl is empty"):
        load_prompts(empty)
    blank = tmp_path / "b.json"
    blank.write_text("[]")
    with pytest.raises(DatasetError, match=r"b\.json: 0 prompts .*at least 1 needed"):
        load_prompts(blank)
    two = write(tmp_path / "two.jsonl", [PROMPT_ROW, PROMPT_ROW])
    with pytest.raises(DatasetError, match=r"two\.jsonl: 2 prompts .*at least 8 needed"):
        load_prompts(two, min_rows=8)


def test_unreadable_data_file_says_permission_denied(tmp_path, monkeypatch):
    import builtins

    path = write(tmp_path / "p.jsonl", [PROMPT_ROW])
    real_open = builtins.open

    def deny(file, *args, **kwargs):
        if os.fspath(file) == path:
            raise PermissionError(13, "Permission denied", path)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(DatasetError, match=r"cannot read .*p\.jsonl: permission denied"):
        load_prompts(path)


# ------------------------------------------------------------------- table: every format, every fault

FORMATS = [".json", ".jsonl", ".csv", ".parquet"]
LOADERS = {
    "beavertails": (load_beavertails, BT_ROW, "is_safe", "prompt"),
    "mmlu": (load_mmlu, MMLU_ROW, "answer", "question"),
    "prompts": (load_prompts, PROMPT_ROW, "prompt", "prompt"),
}


def _make(tmp_path, suffix, fault, row, wrong_field, required):
    path = tmp_path / f"data{suffix}"
    good = write(tmp_path / f"good{suffix}", [row, row])
    data = open(good, "rb").read()
    if fault == "truncated":
        # cut inside the last record (Parquet: inside the footer; CSV: inside the last row's first cell)
        if suffix == ".csv":
            last = data.splitlines(keepends=True)[-1]
            data = data[: len(data) - len(last) + max(1, len(last.split(b",")[0]) // 2)]
        else:
            data = data[:-30]
        path.write_bytes(data)
    elif fault == "empty":
        path.write_bytes(b"")
    elif fault == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif fault == "wrong-schema":
        write(path, [{k: v for k, v in row.items() if k != required}, {k: v for k, v in row.items() if k != required}])
    elif fault == "wrong-type":
        bad = {"is_safe": "sometimes", "answer": "Z", "prompt": 12345}[wrong_field]
        first = dict(row, **{wrong_field: bad}) if suffix == ".parquet" else row  # a column has one type
        write(path, [first, dict(row, **{wrong_field: bad})])
    return str(path)


@pytest.mark.parametrize("fault", ["truncated", "empty", "garbage", "wrong-schema", "wrong-type"])
@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_every_bad_dataset_file_gives_a_named_error(tmp_path, loader, suffix, fault):
    fn, row, wrong_field, required = LOADERS[loader]
    path = _make(tmp_path, suffix, fault, row, wrong_field, required)
    if loader == "prompts" and suffix == ".csv" and fault == "wrong-type":
        pytest.skip("CSV has no types: a number in the prompt column is the text '12345'")
    with pytest.raises(SstJaxError) as info:
        fn(path)
    assert isinstance(info.value, DatasetError)
    msg = str(info.value)
    assert os.path.basename(path) in msg, msg
    assert "\n" not in msg.strip(), msg
    if fault in ("wrong-schema", "wrong-type"):
        assert any(w in msg for w in ("line 2", "record 2", "row 2", "line 1", "record 1", "row 1")), msg
        assert (required if fault == "wrong-schema" else wrong_field) in msg, msg
