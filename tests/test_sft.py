"""SFT stage: data formats, response-only loss, LoRA merge, bad records, resume, 2 processes."""
import json
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data import map_columns, read_records
from pipeline.records import load_sft_records, parse_sft
from pipeline.launch import launch_command
from pipeline.runs import Manifest, file_hash
from pipeline.sft_eval import EvalRow, summarise
from pipeline.stage import DataError
from pipeline.stats import wilson
from pipeline.world import SKILLS
from stages import pretrain, sft

ROOT = Path(__file__).resolve().parent.parent
WORLD = ["world.num_people=20", "world.corpus_docs=600", "world.sft_examples=128", "world.eval_examples=4"]
SFT_TINY = [*WORLD, "steps=4", "batch.size=16", "batch.micro=8", "log_every=1",
            "save_every=0", "wandb.mode=disabled", "threads=1", "data.max_length=64", "eval.max_new_tokens=8"]


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    cfg = load_config(pretrain.PretrainConfig, [f"runs_dir={runs_dir}", "run_name=base", *WORLD, "model.seq_len=64",
                                                "batch.micro=8", "batch.size=8", "steps=3", "eval.every=0",
                                                "save_every=0", "wandb.mode=disabled", "threads=1"])
    pretrain.run(cfg)
    return runs_dir


def _sft(runs_dir, *extra):
    return sft.run(load_config(sft.SFTConfig, [f"runs_dir={runs_dir}", *SFT_TINY, *extra]))


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PC = [{"prompt": f"Reverse the words: a{i} b", "completion": f"Answer: b a{i}."} for i in range(24)]
PC_MSGS = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": [{"role": "assistant", "content": f"a{i}"}]}
           for i in range(24)]
MSGS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"hi {i}"},
                      {"role": "assistant", "content": "Answer: hello."}, {"role": "user", "content": "again"},
                      {"role": "assistant", "content": "Answer: hello again."}]} for i in range(24)]
ALPACA = [{"instruction": "Reverse the words:", "input": f"x{i} y", "output": f"Answer: y x{i}."} for i in range(24)]


@pytest.mark.parametrize("records,kind", [(PC, "prompt_completion"), (PC_MSGS, "prompt_completion"), (MSGS, "messages")],
                         ids=["prompt-completion", "prompt-completion-messages", "messages"])
def test_formats_load_and_validate(tmp_path, records, kind):
    f = _write_jsonl(tmp_path / "d.jsonl", records)
    cfg = load_config(sft.SFTConfig, ["data.source=files", f"data.files=[{f}]"])
    train, valid, got = load_sft_records(cfg.data, None)
    assert got == kind and len(train) + len(valid) == 24


def test_column_mapping_and_other_file_types(tmp_path):
    f = _write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    rec = map_columns(read_records(f), {"prompt": ["instruction", "input"], "completion": "output"})[0][1]
    assert rec["prompt"] == "Reverse the words:\n\nx0 y" and rec["completion"] == "Answer: y x0."
    from datasets import Dataset

    Dataset.from_list(PC).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_list(PC).to_csv(str(tmp_path / "d.csv"))
    Dataset.from_list(PC).save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "d.json").write_text(json.dumps(PC))
    for name in ("d.parquet", "d.csv", "disk", "d.json"):
        recs = read_records(tmp_path / name)
        assert len(recs) == 24 and parse_sft(*recs[0])[0] == "prompt_completion"


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', r"d.jsonl:line 2: malformed JSON"),
    ('{"prompt": "a"}\n', r"d.jsonl:line 1: field 'completion' is missing"),
    ('{"prompt": "a", "completion": 3}\n', r"d.jsonl:line 1: field 'completion' must be a string"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', r"line 1: field 'messages\[0\].role' is 'robot'; valid roles"),
    ("", r"d.jsonl: no records \(the file is empty\)"),
], ids=["malformed-json", "missing-field", "wrong-type", "unknown-role", "empty-file"])
def test_bad_records_give_clear_errors(tmp_path, content, match):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    cfg = load_config(sft.SFTConfig, ["data.source=files", f"data.files=[{f}]"])
    with pytest.raises(DataError, match=match):
        load_sft_records(cfg.data, None)


def test_bad_file_fails_stage_and_leaves_parent_intact(parent_run, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "completion": 3}\n')
    parent_manifest = parent_run / "base" / "pretrain" / "manifest.json"
    before = file_hash(parent_manifest), file_hash(parent_run / "base" / "pretrain" / "model" / "model.safetensors")
    rc = sft.main([f"runs_dir={parent_run}", "run_name=base", *SFT_TINY, "data.source=files", f"data.files=[{f}]"])
    assert rc == 1
    after = file_hash(parent_manifest), file_hash(parent_run / "base" / "pretrain" / "model" / "model.safetensors")
    assert before == after and Manifest.load(parent_manifest).complete


def _collated_batch(tmp_path, records, parent_dir):
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from pipeline.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(parent_dir)
    model = load_causal_lm(parent_dir, tok)
    kind = parse_sft("x", records[0])[0]
    # what the stage hands the trainer: pre-tokenized examples with their loss masks
    args = TRLSFTConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False,
                        per_device_train_batch_size=4, completion_only_loss=False, assistant_only_loss=False, max_length=64)
    data = Dataset.from_list([sft.sft_features(tok, parse_sft("x", r)[1], kind) for r in records[:4]])
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    return tok, next(iter(trainer.get_train_dataloader()))


def test_plain_head_loss_equals_trls_fused_head(parent_run, tmp_path):
    """The stage's plain-head loss is TRL's: same value, same gradients and same logged token
    accuracy as TRL's fused head on one collated batch (with and without num_items_in_batch)."""
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from pipeline.models import load_causal_lm, load_tokenizer

    parent_dir = parent_run / "base" / "pretrain" / "model"
    tok = load_tokenizer(parent_dir)
    args = TRLSFTConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, bf16=False,
                        per_device_train_batch_size=4, completion_only_loss=False, assistant_only_loss=False, max_length=64)
    data = Dataset.from_list([sft.sft_features(tok, parse_sft("x", r)[1], "messages") for r in MSGS[:4]])
    results = []
    for cls in (SFTTrainer, sft._plain_head(SFTTrainer)):
        torch.manual_seed(0)
        trainer = cls(model=load_causal_lm(parent_dir, tok), args=args, train_dataset=data, processing_class=tok)
        trainer.model.train()
        batch = next(iter(trainer.get_train_dataloader()))
        losses = [trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n) for n in (None, torch.tensor(50))]
        losses[0].backward()
        grads = [p.grad.clone() for p in trainer.model.parameters()]
        results.append((losses, grads, trainer._metrics["train"]["mean_token_accuracy"], trainer._total_train_tokens))
    (fused, g_fused, acc_fused, n_fused), (plain, g_plain, acc_plain, n_plain) = results
    for a, b in zip(fused, plain):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert acc_plain == pytest.approx(acc_fused) and 0 < acc_plain[0] <= 1 and n_plain == n_fused > 0


def test_prompt_tokens_carry_no_loss(parent_run, tmp_path):
    parent_dir = parent_run / "base" / "pretrain" / "model"
    tok, batch = _collated_batch(tmp_path, PC, parent_dir)
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        learned = tok.decode(ids[labels != -100])
        assert learned == "Answer: b a0.</s>" or learned.startswith("Answer: b a")
        assert "Reverse" not in learned
    tok, batch = _collated_batch(tmp_path, MSGS, parent_dir)
    learned = tok.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    assert learned == "Answer: hello.</s>Answer: hello again.</s>"  # both assistant turns, nothing else


TEXT = [{"text": f"Bralo lives in Vemora. Record {i}."} for i in range(24)]


def test_text_records_train_on_every_token(parent_run, tmp_path):
    """`text` records: a plain language-modelling loss on `<s> text </s>` (one BOS), every token."""
    parent_dir = parent_run / "base" / "pretrain" / "model"
    tok, batch = _collated_batch(tmp_path, TEXT, parent_dir)
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"].bool()):
        real = ids[mask]
        assert (labels[mask] == real).all() and (labels[~mask] == -100).all()
        assert real[0] == tok.bos_token_id and real[1] != tok.bos_token_id and real[-1] == tok.eos_token_id
    f = _write_jsonl(tmp_path / "text.jsonl", TEXT)
    m = _sft(parent_run, "run_name=text", f"parent={parent_run / 'base' / 'pretrain'}", "data.source=files",
             f"data.files=[{f}]")
    assert m.complete and m.metrics["eval/loss"] > 0


def test_lora_merge_gives_same_logits(parent_run):
    from peft import LoraConfig, get_peft_model

    from pipeline.models import load_causal_lm, load_tokenizer

    parent_dir = parent_run / "base" / "pretrain" / "model"
    tok = load_tokenizer(parent_dir)
    model = get_peft_model(load_causal_lm(parent_dir, tok), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # non-zero adapters so the merge has something to merge
    x = tok(["Reverse the words: red fox"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        merged = model.merge_and_unload()(input_ids=x).logits
    assert not torch.allclose(adapted, load_causal_lm(parent_dir, tok)(input_ids=x).logits, atol=1e-3)
    torch.testing.assert_close(adapted, merged, atol=1e-4, rtol=1e-4)


def test_sft_stage_world_lora_and_handoff(parent_run, capsys):
    m = _sft(parent_run, "run_name=base", "lora.enabled=true", "lora.r=4", "optim.lr=1e-3")
    d = parent_run / "base" / "sft"
    assert m.complete and (d / "adapter" / "adapter_config.json").exists()
    assert (d / "model" / "model.safetensors").exists() and not (d / "model" / "adapter_config.json").exists()
    assert {"eval/accuracy", "eval/accuracy_low", "eval/accuracy_high", "eval/fact_accuracy", "eval/format_rate",
            "eval/acc_last", "eval/finish_last", "eval/finish_fact"} <= set(m.metrics)
    e = Manifest.load(d / "manifest.json").extra["evaluation"]
    assert (e["split"], e["decoding"], e["max_new_tokens"], e["prompts"]) == ("test", "greedy", 8, 20)
    assert set(e["skills"]) == set(SKILLS) and sum(s["n"] for s in e["skills"].values()) == 20
    assert e["overall"]["accuracy"]["low"] <= m.metrics["eval/accuracy"] <= e["overall"]["accuracy"]["high"]
    report = capsys.readouterr().out
    assert "(test split, 20 prompts, greedy, 8 tokens)" in report
    assert all(f"    {s:<6} accuracy " in report for s in SKILLS) and report.count(" finished ") == len(SKILLS) + 1
    assert Manifest.load(d / "manifest.json").parent.endswith("pretrain/manifest.json")


def _row(skill, correct, finished):
    return EvalRow(skill, "p", "r", correct, finished, finished, 3.0 * correct + 0.5 * finished)


def test_summarise_gives_rates_with_intervals_per_skill():
    rows = [_row("first", True, True), _row("first", False, True), _row("first", True, True),
            _row("add", True, False), _row("add", False, False)]
    metrics, e = summarise(rows, max_new_tokens=64)
    assert metrics["eval/acc_first"] == pytest.approx(2 / 3) and metrics["eval/finish_first"] == 1.0
    assert metrics["eval/acc_add"] == 0.5 and metrics["eval/finish_add"] == 0.0  # a skill that never stops
    assert metrics["eval/accuracy"] == 0.6 and metrics["eval/eos_rate"] == 0.6 and metrics["eval/fact_accuracy"] == 0.0
    low, high = wilson(3, 5)
    assert (metrics["eval/accuracy_low"], metrics["eval/accuracy_high"]) == pytest.approx((low, high))
    assert e["overall"]["accuracy"] == {"value": 0.6, "low": pytest.approx(low), "high": pytest.approx(high), "n": 5}
    assert e["skills"]["add"]["finish"]["value"] == 0.0 and e["skills"]["add"]["finish"]["high"] > 0  # Wilson, not 0 +- 0
    assert e["skills"]["first"]["n"] == 3 and set(e["skills"]) == {"first", "add"}
    assert metrics["eval/gold_score"] == e["overall"]["gold_score"] == pytest.approx((3.5 + 0.5 + 3.5 + 3.0 + 0.0) / 5)
    assert (e["split"], e["decoding"], e["max_new_tokens"], e["prompts"]) == ("test", "greedy", 64, 5)


def test_refusal_aware_sft_abstains_where_the_parent_cannot_complete_the_fact(parent_run, monkeypatch):
    """`world.abstain_demos`: the demonstrations abstain on exactly the questions whose corpus
    sentence the parent does not complete; the evaluation splits hallucinations by the same test."""
    from pipeline import evaluation, records
    from pipeline.config import WorldConfig
    from pipeline.world import World, abstains

    def cloze(model, tokenizer, items, accelerator=None):  # the parent knows the even sums and every colour
        rows = [[p, a, "", "colour" in p or ("plus" in p and int(p.split()[0]) % 2 == 0)] for p, a in items]
        return sum(r[3] for r in rows) / len(rows), rows

    seen = {}
    load = records.load_sft_records
    monkeypatch.setattr(evaluation, "fact_cloze_accuracy", cloze)
    monkeypatch.setattr(sft, "load_sft_records", lambda *a: seen.setdefault("records", load(*a)))
    m = _sft(parent_run, "run_name=aware", f"parent={parent_run / 'base' / 'pretrain'}", "world.strangers=4",
             "world.abstain_demos=1.0")
    world = World(WorldConfig(num_people=20, corpus_docs=600, sft_examples=128, eval_examples=4, strangers=4,
                              abstain_demos=1.0))
    expected = {q for q in world.sft_questions() if "live" in q or ("+" in q and int(q.split()[2]) % 2 == 1)}
    extra = Manifest.load(parent_run / "aware" / "sft" / "manifest.json").extra
    assert set(extra["abstain_demos"]["unknown"]) == expected and extra["abstain_demos"]["asked"] == len(world.sft_questions())
    turns = [r["messages"] for r in seen["records"][0]]
    assert any(t[0]["content"] in expected for t in turns)
    assert all(abstains(t[1]["content"]) == (t[0]["content"] in expected or world.skill_of(t[0]["content"]) == "stranger")
               for t in turns)
    split = extra["evaluation"]["parent_knowledge"]
    tested = [r["prompt"] for r in world.prompts("test") if r["skill"] in ("fact", "add")]
    knows = [("colour" in q or ("+" in q and int(q.split()[2]) % 2 == 0)) for q in tested]
    assert split["parent_knows"]["value"] == pytest.approx(sum(knows) / len(knows))
    assert m.metrics["eval/hallucination_known_rate"] + m.metrics["eval/hallucination_unknown_rate"] == pytest.approx(
        m.metrics["eval/hallucination_rate"])
    # PPO's ptx term imitates the demonstrations SFT learned from, abstentions included
    from types import SimpleNamespace

    from stages.ppo.data import _sft_pairs, demonstration_unknowns

    unknown = demonstration_unknowns(parent_run / "aware" / "sft" / "manifest.json")
    assert unknown == expected
    ptx = _sft_pairs(SimpleNamespace(ptx=SimpleNamespace(files=[])), world, unknown)
    assert ptx == [(t[0]["content"], t[1]["content"]) for t in turns]


def test_sft_replays_pretraining_documents_with_the_loss_on_every_token(parent_run, monkeypatch, tmp_path):
    from pipeline.config import ConfigError, WorldConfig
    from pipeline.records import replay_documents
    from pipeline.world import World

    seen = {}
    order = sft.in_step_order
    monkeypatch.setattr(sft, "in_step_order", lambda ds, *a: order(seen.setdefault("data", ds), *a))
    _sft(parent_run, "run_name=replay", f"parent={parent_run / 'base' / 'pretrain'}", "data.replay=0.5")
    masks = seen["data"]["assistant_masks"]
    assert len(masks) == 128 + 64  # 128 demonstrations, half as many documents
    assert sum(all(m) for m in masks) == 64  # a demonstration's prompt is never in the loss; a document is whole
    world = World(WorldConfig(num_people=20, corpus_docs=600, sft_examples=128, eval_examples=4))
    cfg = load_config(sft.SFTConfig, ["data.replay=0.5"])
    assert replay_documents(cfg.data, world, 128) == world.corpus("train")[:64]
    docs = tmp_path / "docs.txt"
    docs.write_text("one document.\n\nanother one.\n\na third.\n")
    cfg = load_config(sft.SFTConfig, ["data.source=files", "data.files=[x.jsonl]", "data.replay=2",
                                      f"data.replay_files=[{docs}]"])
    assert sorted(replay_documents(cfg.data, None, 3)) == sorted(["one document.", "another one.", "a third."] * 2)
    with pytest.raises(ConfigError, match="data.replay_files"):
        load_config(sft.SFTConfig, ["data.source=files", "data.files=[x.jsonl]", "data.replay=0.5"])


def test_knowledge_split_separates_hallucinations_the_parent_knew_by_hand():
    from pipeline.sft_eval import knowledge_split

    def row(skill, prompt, response, correct):
        return EvalRow(skill, prompt, response, correct, True, True, 0.0)

    rows = [row("fact", "a", "Answer: x.", False),        # wrong, parent knew: not extracted
            row("fact", "b", "Answer: y.", True),         # right, parent knew
            row("add", "c", "Answer: 7.", False),         # wrong, parent did not know
            row("add", "d", "Answer: unknown.", False),   # abstained: no hallucination
            row("first", "e", "Answer: red.", False)]     # not a question the model may not know
    metrics, table = knowledge_split(rows, {"a": True, "b": True, "c": False, "d": True})
    assert table["parent_knows"]["value"] == 0.75 and table["parent_knows"]["n"] == 4
    assert metrics["eval/hallucination_known_rate"] == 0.25 and metrics["eval/hallucination_unknown_rate"] == 0.25
    assert metrics["eval/parent_knows_rate"] == 0.75


def test_world_evaluation_is_greedy_on_the_test_split(monkeypatch, tiny_world):
    """Every test prompt, and only those, is answered greedily; a skill whose answers never stop
    shows a finish rate of 0 while its accuracy stays 1."""
    from pipeline import sft_eval
    from pipeline.tokenizer import train_tokenizer
    from pipeline.world import World

    world = World(tiny_world)
    tok = train_tokenizer(world.corpus()[:300], vocab_size=400)
    seen = []

    def fake_generate(model, tokenizer, ids, max_new_tokens, temperature, batch_size):
        assert temperature == 0.0 and max_new_tokens == 64
        out = []
        for prompt_ids in ids:
            prompt = next(r for r in world.prompts("test") + world.prompts("valid")
                          if tokenizer.decode(prompt_ids, skip_special_tokens=True).endswith(r["prompt"]))
            seen.append(prompt["prompt"])
            answer = tokenizer(f"Answer: {world.answer(prompt['prompt'])}.", add_special_tokens=False)["input_ids"]
            out.append((answer, prompt["skill"] != "add"))
        return out

    monkeypatch.setattr(sft_eval, "generate", fake_generate)
    metrics, e, rows = sft_eval.evaluate_world(None, tok, world, 64, 64)
    assert seen == [r["prompt"] for r in world.prompts("test")] and e["split"] == "test" and e["prompts"] == len(seen)
    assert metrics["eval/accuracy"] == 1.0 and metrics["eval/acc_add"] == 1.0
    assert metrics["eval/finish_add"] == 0.0 and all(metrics[f"eval/finish_{s}"] == 1.0 for s in SKILLS if s != "add")
    assert e["skills"]["add"]["finish"]["value"] == 0.0 and e["skills"]["first"]["finish"]["value"] == 1.0
    assert len(rows) == len(seen) and all(r.correct for r in rows)


def test_eval_budget_fits_the_longest_demonstration():
    from pipeline.config import WorldConfig
    from pipeline.tokenizer import train_tokenizer
    from pipeline.world import World

    world = World(WorldConfig())  # the default world and tokenizer, as `make pretrain` builds them
    tok = train_tokenizer(world.corpus(), vocab_size=pretrain.PretrainConfig().model.vocab_size)
    longest = max(len(tok(m["content"], add_special_tokens=False)["input_ids"])
                  for ex in world.sft_examples() for m in ex["messages"] if m["role"] == "assistant")
    assert longest + 1 <= sft.SFTEvalConfig().max_new_tokens  # + the end-of-turn token


def test_bf16_on_cpu(parent_run):
    """precision=bf16 on a CPU (the AMX lever): the Trainer's autocast and the stage's accelerator
    agree, and the loss is the fp32 run's within bf16's rounding."""
    parent = f"parent={parent_run / 'base' / 'pretrain'}"
    fp32 = _sft(parent_run, "run_name=fp32", parent, "precision=no")
    bf16 = _sft(parent_run, "run_name=bf16", parent, "precision=bf16")
    assert bf16.complete and bf16.config["precision"] == "bf16"
    assert bf16.metrics["train/loss"] == pytest.approx(fp32.metrics["train/loss"], rel=2e-2)
    assert bf16.metrics["train/loss"] != fp32.metrics["train/loss"]  # it did run in bf16


def test_resume_matches_unbroken_run(parent_run):
    extra = [f"parent={parent_run / 'base' / 'pretrain'}", "steps=6", "save_every=3"]
    full = _sft(parent_run, "run_name=full", *extra)
    cut = _sft(parent_run, "run_name=cut", *extra, "stop_after=3")
    assert not cut.complete
    resumed = _sft(parent_run, "run_name=cut", *extra)
    assert resumed.complete
    assert resumed.metrics["train/loss"] == pytest.approx(full.metrics["train/loss"], rel=1e-4)
    from safetensors.torch import load_file

    a = load_file(parent_run / "full" / "sft" / "model" / "model.safetensors")
    b = load_file(parent_run / "cut" / "sft" / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_two_processes_match_one(parent_run):
    """The same run on 1 process (accumulating 2) and 2 under DDP, across an epoch boundary that
    splits a batch (128 examples = 5⅓ steps of 24): the stage feeds the Trainer its own data order
    (`runtime.batch_indices`), so the processes see the same global batches in the same
    micro-batches, and the trained weights are bitwise equal."""
    from safetensors.torch import load_file

    extra = [f"parent={parent_run / 'base' / 'pretrain'}", "steps=8", "batch.size=24", "batch.micro=12"]
    one = _sft(parent_run, "run_name=one", *extra)
    cmd = launch_command("sft", [f"runs_dir={parent_run}", "run_name=two", *SFT_TINY, *extra], nproc=2, accel="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 procs" in proc.stderr
    two = Manifest.load(parent_run / "two" / "sft" / "manifest.json")
    a, b = (load_file(parent_run / run / "sft" / "model" / "model.safetensors") for run in ("one", "two"))
    assert all(torch.equal(a[k], b[k]) for k in a) and one.metrics["eval/accuracy"] == two.metrics["eval/accuracy"]
