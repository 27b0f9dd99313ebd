"""Record formats and file reading, `pipeline/records.py` and `pipeline/data.py`: every source and record layout parses;
every malformed input stops each stage with one line naming the file, the line or row and the
field, and leaves the outputs of the stages before it byte-identical."""
import csv
import gzip
import hashlib
import json

import pytest

from pipeline import runs
from pipeline.config import load_config
from pipeline.data import read_records
from pipeline.records import (load_comparisons, load_prompt_records, load_sft_records, parse_comparison, parse_sft,
                              read_text_documents)
from pipeline.stage import DataError


def U(x):
    return {"role": "user", "content": x}


def A(x):
    return {"role": "assistant", "content": x}


def S(x):
    return {"role": "system", "content": x}


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), str(path))
    return path


def _csv(path, records):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    return path


def _starts(text: str, marker: str = "  {") -> list[int]:
    """1-based numbers of the lines that equal `marker` (where each record of indented JSON starts)."""
    return [i for i, line in enumerate(text.split("\n"), 1) if line == marker]


# ------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------
RECS = [{"prompt": "two\nlines", "completion": "x"}] + [{"prompt": f"What is {i} + 1?", "completion": f"{i + 1}"}
                                                        for i in range(3)]


def test_every_file_type_reads_with_line_or_row_locations(tmp_path):
    from datasets import Dataset

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 1 else "") for i, r in enumerate(RECS)))
    indented = json.dumps(RECS, indent=2)
    (tmp_path / "d.json").write_text(indented)
    wrapped = json.dumps({"version": 1, "data": RECS}, indent=2)
    (tmp_path / "wrapped.json").write_text(wrapped)
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in RECS))
    _csv(tmp_path / "d.csv", RECS)
    _parquet(tmp_path / "d.parquet", RECS)
    Dataset.from_list(RECS).save_to_disk(str(tmp_path / "saved"))
    expected = {"d.jsonl": ["line 1", "line 2", "line 4", "line 5"],
                "d.json": [f"line {n}" for n in _starts(indented)],
                "wrapped.json": [f"line {n}" for n in _starts(wrapped, "    {")],
                "lines.json": ["line 1", "line 2", "line 3", "line 4"],
                "d.csv": ["line 2", "line 4", "line 5", "line 6"],  # the first row's prompt spans two lines
                "d.parquet": ["row 0", "row 1", "row 2", "row 3"],
                "saved": ["row 0", "row 1", "row 2", "row 3"]}
    assert expected["d.json"] == ["line 2", "line 6", "line 10", "line 14"]
    for name, where in expected.items():
        got = read_records(tmp_path / name)
        assert [r for _, r in got] == RECS, name
        assert [loc for loc, _ in got] == [f"{tmp_path / name}:{w}" for w in where], name


def test_dataset_splits_and_configurations(tmp_path, monkeypatch):
    import datasets
    from datasets import Dataset, DatasetDict

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # load_dataset caches here
    prefs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    saved = tmp_path / "saved"
    DatasetDict({"train_prefs": Dataset.from_list(prefs), "test_prefs": Dataset.from_list(prefs[:1])}).save_to_disk(str(saved))
    assert [r for _, r in read_records(saved, split="train_prefs")] == prefs
    assert read_records(saved, split="test_prefs")[0][0] == f"{saved}[test_prefs]:row 0"
    with pytest.raises(DataError, match=r"saved: holds the splits train_prefs, test_prefs and none is 'train'; choose one with data.split"):
        read_records(saved)
    with pytest.raises(DataError, match=r"saved: no split 'dev'; it has train_prefs, test_prefs"):
        read_records(saved, split="dev")
    # a dataset directory with named configurations goes through datasets.load_dataset: the hub's code path
    hub = tmp_path / "hub"
    (hub / "prefs").mkdir(parents=True)
    _jsonl(hub / "prefs" / "train.jsonl", prefs[:2] + [{**prefs[2], "rejected": None}])
    _jsonl(hub / "prefs" / "test.jsonl", prefs[:1])
    (hub / "README.md").write_text("---\nconfigs:\n- config_name: prefs\n  data_files:\n  - split: train_prefs\n"
                                   "    path: prefs/train.jsonl\n  - split: test_prefs\n    path: prefs/test.jsonl\n---\n")
    assert [r for _, r in read_records(hub, "prefs", "test_prefs")] == prefs[:1]
    with pytest.raises(DataError, match=rf"{hub}\[prefs/train_prefs\]:row 2: field 'rejected' must be a string or a messages list, got null"):
        load_comparisons([str(hub)], config="prefs", split="train_prefs")
    with pytest.raises(DataError, match=r"hub: datasets.load_dataset failed \(data.config=nope, data.split=train\): BuilderConfig 'nope'"):
        read_records(hub, "nope")
    with pytest.raises(DataError, match=r"no-such-org/no-such-data: not a local path, and datasets.load_dataset failed"):
        read_records("no-such-org/no-such-data")  # conftest sets HF_HUB_OFFLINE


def test_text_that_is_not_utf8_is_named_by_line_and_column(tmp_path):
    lines = {".jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ".json": b'[\n{"text": "caf\xe9"}]',
             ".csv": b'text\ncaf\xe9\n', ".txt": b'first document\n\ncaf\xe9\n'}
    column = {".jsonl": 14, ".json": 14, ".csv": 4, ".txt": 4}
    for suffix, content in lines.items():
        path = tmp_path / f"latin{suffix}"
        path.write_bytes(content)
        with pytest.raises(DataError, match=rf"latin{suffix}: not UTF-8 text: byte 0xe9 at line {2 if suffix != '.txt' else 3}, "
                                            rf"column {column[suffix]}; re-save it as UTF-8"):
            read_text_documents([str(path)])
    packed = tmp_path / "packed.jsonl"
    packed.write_bytes(gzip.compress(b'{"text": "x"}\n'))
    with pytest.raises(DataError, match=r"packed.jsonl: not UTF-8 text: byte 0x8b at line 1, column 2; the file looks binary"):
        read_records(packed)
    fake = tmp_path / "fake.parquet"
    fake.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"fake.parquet: not a readable Parquet file \("):
        read_records(fake)


def test_text_documents_and_the_held_out_split(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfone\r\nstill one\r\n\r\ntwo\n \ntwo and a half\n\n\nthree\n")
    _jsonl(tmp_path / "b.jsonl", [{"body": "four"}, {"body": ""}])
    train, valid = read_text_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], "body", valid_fraction=0.2)
    assert sorted(train + valid) == sorted(["one\r\nstill one", "two", "two and a half", "three", "four", ""])
    assert len(valid) == 1
    (tmp_path / "one.txt").write_text("a single document\nof two lines\n")
    assert read_text_documents([str(tmp_path / "one.txt")]) == (["a single document\nof two lines"], [])
    with pytest.raises(DataError, match=r"b.jsonl:line 1: field 'text' is missing \(found fields: body\); set data.text_field"):
        read_text_documents([str(tmp_path / "b.jsonl")])


# ------------------------------------------------------------------------------------------
# record layouts
# ------------------------------------------------------------------------------------------
HH = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: What is 2 + 2?\n\nAssistant: "
LAYOUTS = {  # record -> (prompt, [chosen, rejected])
    "explicit_text": ({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}, "What is 2 + 2?", ["4", "5"]),
    "explicit_messages": ({"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("b")]}, [U("q")], ["a", "b"]),
    "explicit_prompt_text_response_message": ({"prompt": "q", "chosen": [A("a")], "rejected": "b"}, "q", ["a", "b"]),
    "ultrafeedback": ({"prompt": "q", "chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")]}, "q", ["a", "b"]),
    "ultrafeedback_system": ({"prompt": "q", "chosen": [S("brief"), U("q"), A("a")], "rejected": [S("brief"), U("q"), A("b")]},
                             [S("brief"), U("q")], ["a", "b"]),
    "implicit_text": ({"chosen": "Q: 2 + 2? A: four", "rejected": "Q: 2 + 2? A: five"}, "Q: 2 + 2? A:", ["four", "five"]),
    "implicit_messages_multiturn": ({"chosen": [U("hi"), A("hello"), U("q"), A("a")], "rejected": [U("hi"), A("hello"), U("q"), A("b")]},
                                    [U("hi"), A("hello"), U("q")], ["a", "b"]),
    "hh_text_multiturn": ({"chosen": HH + "4", "rejected": HH + "5"}, [U("hi"), A("hello"), U("What is 2 + 2?")], ["4", "5"]),
    "kwise": ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [1, 0, 1]}, "q", ["a", "b", "c"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_preference_layouts_parse(layout):
    rec, prompt, responses = LAYOUTS[layout]
    c = parse_comparison("f:line 1", rec)
    assert (c.prompt, c.responses) == (prompt, responses)
    assert c.pairs() == ([(1, 0), (1, 2)] if layout == "kwise" else [(0, 1)])


MALFORMED = {  # record -> the error after "f:line 1: "
    "ultrafeedback_other_prompt": ({"prompt": "q", "chosen": [U("other"), A("a")], "rejected": [U("q"), A("b")]},
                                   "field 'chosen' holds turns before the response (roles ['user', 'assistant']) that do not end with 'prompt'"),
    "response_ends_with_user": ({"prompt": "q", "chosen": [A("a"), U("more")], "rejected": "b"},
                                "field 'chosen' must end with the assistant's response, got roles ['assistant', 'user']"),
    "repeats_differ": ({"prompt": "q", "chosen": [S("x"), U("q"), A("a")], "rejected": [S("y"), U("q"), A("b")]},
                       "fields 'chosen' and 'rejected' repeat different conversations (they differ at turn 0)"),
    "implicit_history_differs": ({"chosen": [U("hi"), A("hello"), U("q"), A("a")], "rejected": [U("hi"), A("hey"), U("q"), A("b")]},
                                 "fields 'chosen' and 'rejected' must share every turn but the last assistant one (the implicit "
                                 "prompt); they differ at turn 1"),
    "hh_ends_with_human": ({"chosen": HH + "4\n\nHuman: thanks", "rejected": HH + "5"},
                           "field 'chosen' must end with the assistant's response, got roles ['user', 'assistant', 'user', 'assistant', 'user']"),
    "implicit_single_turn": ({"chosen": [A("a")], "rejected": [A("b")]}, "field 'prompt' is missing and 'chosen' holds no turn before the response"),
    "implicit_mixed": ({"chosen": "a", "rejected": [A("b")]}, "fields 'chosen' and 'rejected' must both be strings or both messages lists, got str and list"),
    "no_shared_prefix": ({"chosen": "abc", "rejected": "xyz"}, "field 'prompt' is missing and 'chosen'/'rejected' share no prefix"),
    "bad_role": ({"prompt": [U("q")], "chosen": [{"role": "bot", "content": "x"}], "rejected": [A("y")]},
                 "field 'chosen[0].role' is 'bot'; valid roles: system, user, assistant"),
    "prompt_without_user": ({"prompt": [S("x")], "chosen": "a", "rejected": "b"}, "field 'prompt' has no user message"),
    "missing_rejected": ({"prompt": "q", "chosen": "a"}, "field 'rejected' is missing"),
    "unlabeled": ({"prompt": "q", "responses": ["a", "b"], "ranking": None}, "field 'ranking' is null: this record is not labeled yet"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_preference_records_name_the_field(case):
    rec, message = MALFORMED[case]
    with pytest.raises(DataError) as e:
        parse_comparison("f:line 1", rec)
    assert str(e.value).startswith(f"f:line 1: {message}") and "\n" not in str(e.value)


def test_identical_pairs_are_dropped_with_a_warning_and_a_file_of_them_fails(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                         {"prompt": "q", "chosen": "same", "rejected": "same "},
                                         {"chosen": HH + "4", "rejected": HH + "5"},
                                         {"chosen": HH + "4", "rejected": HH + "4"}])
    logged = []
    kept = load_comparisons([str(path)], log=logged.append)
    assert [c.loc for c in kept] == [f"{path}:line 1", f"{path}:line 3"]
    assert logged == [f"warning: {path}: dropped 2 of 4 pairs whose 'chosen' and 'rejected' responses are identical (lines 2, 4)"]
    only = _jsonl(tmp_path / "only.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 2)
    with pytest.raises(DataError, match=r"only.jsonl: every pair has identical 'chosen' and 'rejected' responses \(lines 1, 2\)"):
        load_comparisons([str(only)])


def test_sft_kinds_and_text_records(tmp_path):
    from stages.sft import SFTConfig

    path = _jsonl(tmp_path / "t.jsonl", [{"text": f"document {i}"} for i in range(3)])
    train, valid, kind = load_sft_records(load_config(SFTConfig, ["data.source=files", f"data.files=[{path}]"]).data, None)
    assert kind == "text" and sorted(r["text"] for r in train + valid) == ["document 0", "document 1", "document 2"]
    assert parse_sft("x", {"messages": [U("q"), A("a")], "id": 3}) == ("messages", {"messages": [U("q"), A("a")]})
    assert parse_sft("x", {"prompt": "q", "completion": "a"})[0] == "prompt_completion"
    mixed = _jsonl(tmp_path / "m.jsonl", [{"text": "a"}, {"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"m.jsonl:line 2: record is 'prompt_completion' but earlier records are 'text'"):
        load_sft_records(load_config(SFTConfig, ["data.source=files", f"data.files=[{mixed}]"]).data, None)
    with pytest.raises(DataError, match=r"x: field 'messages', 'prompt' \+ 'completion' or 'text' is missing \(present: question"):
        parse_sft("x", {"question": "q"})


def test_prompts_from_every_layout(tmp_path):
    from stages.ppo.config import PPOConfig
    from stages.ppo.data import load_prompts

    path = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q1"}, {"prompt": [S("s"), U("q2")]}, {"messages": [U("q3"), A("a"), U("q4"), A("b")]},
        {"chosen": HH + "4", "rejected": HH + "5"}, LAYOUTS["ultrafeedback"][0], LAYOUTS["kwise"][0]])
    got = [r["prompt"] for r in load_prompt_records([str(path)])]
    assert got == ["q1", [S("s"), U("q2")], [U("q3"), A("a"), U("q4")], [U("hi"), A("hello"), U("What is 2 + 2?")], "q", "q"]
    cfg = load_config(PPOConfig, ["data.source=files", f"data.files=[{path}]"])
    # PPO rollouts take one user turn: a conversation's last
    assert load_prompts(cfg, None) == ["q1", "q2", "q4", "What is 2 + 2?", "q", "q"]
    with pytest.raises(DataError, match=r"p.jsonl:line 1: field 'question' is missing \(prompt records need"):
        load_prompt_records([str(path)], name="question")


# ------------------------------------------------------------------------------------------
# every stage stops on malformed data and leaves the earlier stages as they were
# ------------------------------------------------------------------------------------------
TINY_WORLD = ["world.num_people=20", "world.corpus_docs=200", "world.sft_examples=50", "world.eval_examples=3"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Run `p` of complete pretrain -> sft -> rm stages, each holding one tiny random Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.stage import StageRun
    from pipeline.tokenizer import train_tokenizer
    from stages.ppo.config import PPOConfig
    from stages.pretrain import PretrainConfig
    from stages.rm import RMConfig
    from stages.sft import SFTConfig

    root = tmp_path_factory.mktemp("chain")
    tok = train_tokenizer([f"What is {i} + {j}? Answer: {i + j}. The cat sat on the mat." for i in range(9) for j in range(9)],
                          vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True))
    for name, cls in (("pretrain", PretrainConfig), ("sft", SFTConfig), ("rm", RMConfig)):
        sr = StageRun(load_config(cls, [f"runs_dir={root}", "run_name=p", *TINY_WORLD]))
        sr.begin(None if name == "pretrain" else runs.resolve_parent(name, root, "p"))
        model.save_pretrained(sr.dir / "model")
        tok.save_pretrained(sr.dir / "model")
        sr.finish(sr.dir / "model", {}, {})
    assert runs.Manifest.load(root / "p" / "rm" / "manifest.json").complete
    return root, {"pretrain": PretrainConfig, "sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig}


def _tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


GOOD = {"pretrain": {"text": "The cat sat on the mat."}, "sft": {"prompt": "What is 1 + 1?", "completion": "Answer: 2."},
        "rm": {"prompt": "What is 1 + 1?", "chosen": "Answer: 2.", "rejected": "Answer: 3."}, "ppo": {"prompt": "What is 1 + 1?"}}
FIELD = {"pretrain": "text", "sft": "completion", "rm": "rejected", "ppo": "prompt"}


def _malformed(case: str, stage: str, d) -> tuple:
    """(file, its expected location in the message, the expected words after it)."""
    good, name = GOOD[stage], FIELD[stage]
    wrong_type = {**good, name: 3}
    missing = {k: v for k, v in good.items() if k != name} or {"question": "q"}
    if case == "jsonl_wrong_type":
        return _jsonl(d / "x.jsonl", [good, wrong_type]), "x.jsonl:line 2", f"field '{name}' must be a string"
    if case == "jsonl_missing_field":
        return _jsonl(d / "x.jsonl", [good, good, missing]), "x.jsonl:line 3", f"field '{name}' is missing"
    if case == "jsonl_syntax":
        (d / "x.jsonl").write_text(json.dumps(good) + '\n{"text": \n')
        return d / "x.jsonl", "x.jsonl:line 2", "malformed JSON (Expecting value at column 10)"
    if case == "json_wrong_type":
        text = json.dumps([good, good, wrong_type], indent=2)
        (d / "x.json").write_text(text)
        return d / "x.json", f"x.json:line {_starts(text)[2]}", f"field '{name}' must be a string"
    if case == "csv_missing_column":
        return _csv(d / "x.csv", [missing, missing]), "x.csv:line 2", f"field '{name}' is missing"
    if case == "parquet_null":
        return _parquet(d / "x.parquet", [good, {**good, name: None}]), "x.parquet:row 1", f"field '{name}' must be a string"
    if case == "not_utf8":
        (d / "x.jsonl").write_bytes((json.dumps(good) + "\n" + json.dumps({**good, name: "caf\u00e9"}, ensure_ascii=False)
                                     + "\n").encode("latin-1"))
        return d / "x.jsonl", "x.jsonl: not UTF-8 text", "byte 0xe9 at line 2, column"
    if case == "binary":
        (d / "x.jsonl").write_bytes(gzip.compress(json.dumps(good).encode()))
        return d / "x.jsonl", "x.jsonl: not UTF-8 text", "byte 0x8b at line 1, column 2; the file looks binary"
    if case == "not_parquet":
        (d / "x.parquet").write_text("text\nhello\n")
        return d / "x.parquet", "x.parquet: not a readable Parquet file", ""
    if case == "identical_pairs_only":
        return (_jsonl(d / "x.jsonl", [{**good, "rejected": good["chosen"]}] * 2), "x.jsonl: every pair has identical",
                "'chosen' and 'rejected' responses (lines 1, 2)")
    if case == "ultrafeedback_other_prompt":
        rec = {"prompt": "q", "chosen": [U("q"), A("a")], "rejected": [U("not q"), A("b")]}
        return _jsonl(d / "x.jsonl", [good, rec]), "x.jsonl:line 2", "field 'rejected' holds turns before the response"
    if case == "too_little_text":
        return _jsonl(d / "x.jsonl", [good]), "x.jsonl:", "tokens make 0 block(s) of model.seq_len=32; at least 2 are needed"
    if case == "txt_not_utf8":
        (d / "x.txt").write_bytes(b"one document\n\nanother caf\xe9\n")
        return d / "x.txt", "x.txt: not UTF-8 text", "byte 0xe9 at line 3, column 12"
    raise KeyError(case)


COMMON = ["jsonl_wrong_type", "jsonl_missing_field", "jsonl_syntax", "json_wrong_type", "csv_missing_column",
          "parquet_null", "not_utf8", "binary", "not_parquet"]
CASES = [(s, c) for s in ("pretrain", "sft", "rm", "ppo") for c in COMMON] + [
    ("rm", "identical_pairs_only"), ("rm", "ultrafeedback_other_prompt"), ("pretrain", "txt_not_utf8"),
    ("pretrain", "too_little_text")]


@pytest.mark.parametrize("stage,case", CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_malformed_data_fails_the_stage_and_leaves_earlier_outputs(chain, tmp_path, capsys, stage, case):
    import importlib

    from pipeline.stage import stage_main

    root, classes = chain
    path, where, what = _malformed(case, stage, tmp_path)
    run = importlib.import_module(f"stages.{stage}").run
    before = _tree_hashes(root)
    # pretrain continues the run's own model: its tokenizer is loaded, not trained (and written) here
    extra = [f"model.name_or_path={root / 'p' / 'pretrain' / 'model'}", "model.seq_len=32"] if stage == "pretrain" else []
    rc = stage_main(classes[stage], run, [f"runs_dir={root}", "run_name=p", "data.source=files", f"data.files=[{path}]",
                                          "wandb.mode=disabled", "threads=1", *TINY_WORLD, *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error in stage '{stage}': {tmp_path / where}") and what in errors[0], errors[0]
    assert _tree_hashes(root) == before  # nothing written, nothing changed, in any stage of the run
