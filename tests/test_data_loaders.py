"""Data loaders: every layout, the errors that point at the bad record, and dataset lookup/download."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaedit.cli import build_parser
from deltaedit.data import (
    DATA_ENV,
    DOWNLOADS,
    DataError,
    EditRecord,
    download,
    find_data,
    load_counterfact,
    load_records,
    load_user_file,
    load_zsre,
)
from deltaedit.requests import EditRequest, visible

FIXTURES = Path(__file__).parent / "fixtures" / "data"


# --- CounterFact ---------------------------------------------------------------------------------


def test_memit_counterfact_layout_keeps_all_prompts():
    path = FIXTURES / "counterfact_memit.json"
    data = load_records(str(path))
    assert data.layout == "counterfact-memit" and len(data) == 3 and data.rejected == []
    first = data.records[0]
    request = first.request
    assert request.prompt == "The mother tongue of {} is"
    assert (request.subject, request.target_new) == ("Danielle Darrieux", "English")
    assert request.target_true == "French"
    assert len(request.paraphrase_prompts) == 2
    assert len(request.neighborhood_prompts) == 10
    assert first.neighborhood_answers == ("French",) * 10  # neighbours share the true object
    assert request.case_id == "0"
    assert (first.source, first.line) == (str(path), 2)
    assert [r.line for r in data] == [2, 43, 79]
    assert len(data.records[1].request.paraphrase_prompts) == 3


def test_simplified_counterfact_layout_recovers_template():
    data = load_records(FIXTURES / "counterfact_simple.json")
    assert data.layout == "counterfact"
    first, twice, _ = data.records
    assert first.request.prompt == "The mother tongue of {} is"
    assert first.request.paraphrase_prompts[0].startswith("Where Danielle Darrieux is from")
    assert first.request.neighborhood_prompts == ("Michel Rocard is a native speaker of",)
    assert first.neighborhood_answers == ("French",)
    assert first.request.target_true == "French"
    # the subject occurs twice: only the first mention becomes the placeholder
    assert twice.request.prompt == "{}, known to fans as Michael Jordan, professionally plays"
    assert twice.request.case_id == "5"


def test_both_counterfact_layouts_give_the_same_edit():
    memit = load_counterfact(FIXTURES / "counterfact_memit.json").records[0].request
    simple = load_counterfact(FIXTURES / "counterfact_simple.json").records[0].request
    fields = ("prompt", "subject", "target_new", "target_true", "case_id")
    assert [getattr(memit, f) for f in fields] == [getattr(simple, f) for f in fields]


def test_memit_missing_target_names_nested_field(tmp_path):
    records = json.loads((FIXTURES / "counterfact_memit.json").read_text(encoding="utf-8"))
    del records[1]["requested_rewrite"]["target_new"]
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert info.value.field == "requested_rewrite.target_new"
    assert info.value.record == 2
    assert "record 2" in str(info.value)


def test_subject_not_in_prompt_names_record_and_field():
    path = FIXTURES / "bad_subject.json"
    with pytest.raises(DataError) as info:
        load_records(path)
    err = info.value
    assert (err.record, err.line, err.field) == (2, 12, "prompt")
    message = str(err)
    assert str(path) in message and "record 2 (line 12)" in message and "'prompt'" in message
    assert "Apple A6" in message and "on_error='skip'" in message


# --- zsRE ----------------------------------------------------------------------------------------


def test_zsre_fields():
    data = load_records(FIXTURES / "zsre.json")
    assert data.layout == "zsre" and len(data) == 3
    first, no_answer, two_answers = data.records
    request = first.request
    assert request.prompt == "When was the inception of {}?"
    assert (request.target_new, request.target_true) == ("2006", "1998")
    assert request.paraphrase_prompts == ("When was the IAAF Combined Events Challenge launched?",)
    assert request.neighborhood_prompts == ("nq question: what is the name of the last episode of spongebob",)
    assert first.neighborhood_answers == ("The String",)
    assert no_answer.request.target_true is None
    assert two_answers.request.target_true == "Kuwait City"
    assert [r.request.case_id for r in data] == ["0", "1", "2"]  # MEMIT numbers zsRE by position
    assert load_zsre(FIXTURES / "zsre.json").records == data.records


def test_zsre_subject_not_in_src():
    with pytest.raises(DataError) as info:
        load_records(FIXTURES / "bad_zsre_subject.json")
    assert (info.value.record, info.value.line, info.value.field) == (2, 20, "src")
    assert "Kuwaiti" in str(info.value) and "0 times" in str(info.value)


# --- user files ----------------------------------------------------------------------------------


def test_jsonl_user_file():
    data = load_records(FIXTURES / "edits.jsonl")
    assert data.layout == "edits"
    assert [r.line for r in data] == [1, 2, 4]  # the blank line 3 is skipped
    france, darrieux, acme = (r.request for r in data)
    assert france == EditRequest(
        prompt="The capital of {} is",
        subject="France",
        target_new="Rome",
        target_true="Paris",
        paraphrase_prompts=("France's capital city is", "The seat of government of France is"),
        neighborhood_prompts=("The capital of Germany is",),
        case_id="fr-capital",
    )
    assert darrieux.prompt == "{} speaks" and darrieux.target_true is None and darrieux.case_id == "1"
    assert acme.case_id == "42" and acme.neighborhood_prompts == ()


def test_csv_user_file_matches_jsonl():
    csv_data = load_records(FIXTURES / "edits.csv")
    assert [r.line for r in csv_data] == [2, 3, 4]
    assert [r.request for r in csv_data] == [r.request for r in load_user_file(FIXTURES / "edits.jsonl")]


def test_csv_unknown_column_is_an_error_even_when_skipping():
    with pytest.raises(DataError) as info:
        load_records(FIXTURES / "bad_unknown_column.csv", on_error="skip")
    assert info.value.field == "target" and info.value.line == 1
    assert "'target'" in str(info.value) and "target_new" in str(info.value)


def test_csv_empty_required_cell(tmp_path):
    path = tmp_path / "edits.csv"
    path.write_text("prompt,subject,target_new\nCapital of {}:,France,Rome\nCapital of {}:,Spain,\n")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert (info.value.record, info.value.line, info.value.field) == (2, 3, "target_new")


def test_jsonl_unknown_key(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps({"prompt": "Capital of {}:", "subject": "France", "target": "Rome"}) + "\n")
    with pytest.raises(DataError) as info:
        load_user_file(path)
    assert info.value.field == "target" and info.value.line == 1


def test_missing_field_names_line_and_field():
    path = FIXTURES / "bad_missing_field.jsonl"
    with pytest.raises(DataError) as info:
        load_records(path)
    assert (info.value.line, info.value.field) == (2, "target_new")
    message = str(info.value)
    assert str(path) in message and "line 2" in message
    assert "'target_new'" in message and "is missing" in message


def test_bad_json_line_stops_or_is_skipped():
    path = FIXTURES / "bad_json_line.jsonl"
    with pytest.raises(DataError) as info:
        load_records(path)
    assert info.value.line == 2 and "not valid JSON" in str(info.value)

    data = load_records(path, on_error="skip")
    assert [r.line for r in data] == [1, 3]
    assert [(err.line, err.reason) for err in data.rejected] == [(2, data.rejected[0].reason)]
    assert "not valid JSON" in data.rejected[0].reason and "on_error" not in data.rejected[0].reason


def test_limit_keeps_first_valid_records():
    data = load_records(FIXTURES / "bad_json_line.jsonl", on_error="skip", limit=2)
    assert [r.line for r in data] == [1, 3] and len(data.rejected) == 1
    assert len(load_records(FIXTURES / "counterfact_memit.json", limit=1)) == 1
    assert len(load_records(FIXTURES / "counterfact_memit.json", limit=0)) == 0


def test_broken_json_list_names_the_line():
    with pytest.raises(DataError) as info:
        load_records(FIXTURES / "bad_syntax.json", on_error="skip")
    assert info.value.line == 3 and "not valid JSON" in str(info.value)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        load_records(FIXTURES / "edits.jsonl", on_error="ignore")
    with pytest.raises(ValueError, match="limit"):
        load_records(FIXTURES / "edits.jsonl", limit=-1)
    text_file = tmp_path / "edits.txt"
    text_file.write_text("prompt,subject,target_new\n")
    with pytest.raises(DataError, match="unknown extension"):
        load_records(text_file)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]\n")
    with pytest.raises(DataError, match="holds no records"):
        load_records(path)


def test_edit_record_checks_answers_align():
    request = EditRequest("The capital of {} is", "France", "Rome", neighborhood_prompts=("A", "B"))
    with pytest.raises(ValueError, match="one answer per prompt"):
        EditRecord(request, neighborhood_answers=("x",))


@settings(max_examples=40, deadline=None)
@given(
    subjects=st.lists(st.text().filter(lambda s: visible(s) and "{}" not in s), min_size=1, max_size=5),
    indent=st.sampled_from([None, 1, 2, 4]),
)
def test_line_numbers_follow_the_file(tmp_path_factory, subjects, indent):
    """Whatever the strings hold (U+2028 included), each record knows the line it starts on."""
    edits = [{"prompt": "About {}:", "subject": s, "target_new": "yes"} for s in subjects]
    folder = tmp_path_factory.mktemp("lines")
    listed = folder / "edits.json"
    listed.write_text(json.dumps(edits, indent=indent, ensure_ascii=False), encoding="utf-8")
    lines = folder / "edits.jsonl"
    lines.write_text("\n".join(json.dumps(e, ensure_ascii=False) for e in edits) + "\n", encoding="utf-8")

    expected, line = [], 2
    for edit in edits:
        expected.append(1 if indent is None else line)
        line += json.dumps(edit, indent=indent).count("\n") + 1
    data = load_records(listed)
    assert [r.line for r in data] == expected
    assert [r.request.subject for r in data] == subjects
    assert [r.line for r in load_records(lines)] == list(range(1, len(edits) + 1))


# --- dataset names and download ------------------------------------------------------------------


def test_dataset_name_resolves_in_data_dir_and_env(tmp_path, monkeypatch):
    (tmp_path / "counterfact").mkdir()
    shutil.copy(FIXTURES / "counterfact_simple.json", tmp_path / "counterfact" / "counterfact-edit.json")
    data = load_records("counterfact", data_dir=tmp_path)
    assert data.path == tmp_path / "counterfact" / "counterfact-edit.json" and len(data) == 3

    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert load_records("counterfact").path == data.path


def test_dataset_name_falls_back_to_memit_download(tmp_path):
    shutil.copy(FIXTURES / "counterfact_memit.json", tmp_path / "counterfact.json")
    shutil.copy(FIXTURES / "zsre.json", tmp_path / "zsre_mem_eval.json")
    assert load_records("counterfact", data_dir=tmp_path).layout == "counterfact-memit"
    assert find_data("zsre", tmp_path) == tmp_path / "zsre_mem_eval.json"


def test_no_data_dir_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DataError) as info:
        load_records("counterfact")
    message = str(info.value)
    assert "--data DIR" in message and DATA_ENV in message
    assert "counterfact/counterfact-edit.json" in message and "`deltaedit download counterfact --data DIR`" in message


def test_dataset_missing_from_data_dir(tmp_path):
    with pytest.raises(DataError) as info:
        load_records("zsre", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "zsre" / "zsre_mend_eval_portability_gpt4.json") in message
    assert str(tmp_path / "zsre_mem_eval.json") in message and "`deltaedit download zsre --data DIR`" in message


@pytest.mark.parametrize("name", ["counterfact", "zsre", "counterfact-train"])
def test_download_hint_is_a_command_the_cli_accepts(tmp_path, name):
    """The command quoted in a missing-dataset error parses as ``deltaedit download`` (not a made-up subcommand)."""
    with pytest.raises(DataError) as info:
        load_records(name, data_dir=tmp_path)
    quoted = re.findall(r"`deltaedit ([^`]*)`", str(info.value))
    assert len(quoted) == 1, str(info.value)
    argv = shlex.split(quoted[0].replace("NAME", "counterfact").replace("DIR", str(tmp_path)))
    args = build_parser().parse_args(argv)  # SystemExit on an unknown subcommand
    assert args.command == "download" and args.data == str(tmp_path)
    assert args.name == (name if name in DOWNLOADS else "counterfact")


def test_unknown_path_lists_dataset_names(tmp_path):
    with pytest.raises(DataError, match="known names: counterfact"):
        load_records(str(tmp_path / "nope.json"))


def test_download_without_network(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(DataError) as info:
        download("counterfact", tmp_path)
    message = str(info.value)
    assert "network is unreachable" in message
    assert "https://rome.baulab.info/data/dsets/counterfact.json" in message
    assert str(tmp_path / "counterfact.json") in message
    assert os.listdir(tmp_path) == []  # no partial file left behind


def test_download_writes_the_file_atomically(tmp_path, monkeypatch):
    body = (FIXTURES / "zsre.json").read_bytes()
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return io.BytesIO(body)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    path = download("zsre", tmp_path / "data")
    assert urls == ["https://rome.baulab.info/data/dsets/zsre_mem_eval.json"]
    assert path == tmp_path / "data" / "zsre_mem_eval.json" and path.read_bytes() == body
    assert os.listdir(tmp_path / "data") == ["zsre_mem_eval.json"]
    assert len(load_records("zsre", data_dir=tmp_path / "data")) == 3


def test_download_refuses_a_page_that_is_not_json(tmp_path, monkeypatch):
    login_page = io.BytesIO(b"<html>login</html>")
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: login_page)
    with pytest.raises(DataError, match="not JSON"):
        download("counterfact", tmp_path)
    assert os.listdir(tmp_path) == []


def test_download_unknown_name(tmp_path):
    with pytest.raises(DataError, match="downloadable datasets: counterfact, zsre"):
        download("counterfact-train", tmp_path)


# --- the real data -------------------------------------------------------------------------------


def _shared_data() -> Path | None:
    for candidate in (os.environ.get(DATA_ENV), Path(__file__).resolve().parents[2] / "shared" / "data"):
        if candidate and Path(candidate, "counterfact").is_dir():
            return Path(candidate)
    return None


def test_real_data_first_records():
    data_dir = _shared_data()
    if data_dir is None:
        pytest.skip(f"no shared data folder (set {DATA_ENV})")
    for name in ("counterfact", "zsre"):
        data = load_records(name, data_dir=data_dir, limit=5)
        assert len(data) == 5 and data.rejected == []
        assert len({r.request.case_id for r in data}) == 5
        for record in data:
            assert "{}" in record.request.prompt
            assert len(record.neighborhood_answers) == len(record.request.neighborhood_prompts) == 1
