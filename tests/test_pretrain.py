import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.launch import launch_command
from pipeline.runs import Manifest, read_metrics
from pipeline.runtime import batch_indices
from pipeline.stage import DataError
from stages import pretrain

ROOT = Path(__file__).resolve().parent.parent
TINY = ["world.num_people=20", "world.corpus_docs=600", "model.seq_len=64", "batch.micro=8",
        "batch.size=16", "eval.every=0", "log_every=1", "save_every=0", "wandb.mode=disabled",
        "threads=1", "optim.warmup_steps=3"]


def _run(tmp_path, *extra):
    cfg = load_config(pretrain.PretrainConfig, [f"runs_dir={tmp_path}", *TINY, *extra])
    return pretrain.run(cfg)


def test_global_batch_indices_are_an_exact_epoch_walk():
    seen = [batch_indices(s, 10, 4, seed=0) for s in range(5)]
    flat = sum(seen, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_adamw_is_fused_on_cpu_and_makes_the_same_update_as_plain_adamw():
    import torch

    from pipeline.runtime import adamw

    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(3)]
    params = [[w.clone().requires_grad_() for w in weights] for _ in range(2)]
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-5)
    ours = adamw([{"params": params[0][:1], "weight_decay": 0.1}, {"params": params[0][1:], "weight_decay": 0.0}],
                 **kwargs)
    plain = torch.optim.AdamW([{"params": params[1][:1], "weight_decay": 0.1},
                               {"params": params[1][1:], "weight_decay": 0.0}], foreach=False, **kwargs)
    assert ours.defaults["fused"] is True and not plain.defaults["fused"]
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for group, opt in zip(params, (ours, plain)):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_batch_split_takes_the_largest_micro_batch_that_fits_any_process_count():
    from pipeline.runtime import batch_split

    assert batch_split(32, 8, 2) == (8, 2)
    assert batch_split(32, 32, 2) == (16, 1)     # the default config on 2 processes
    assert batch_split(32, 32, 8) == (4, 1)
    assert batch_split(30, 8, 2) == (5, 3)       # 15 per process: 5 divides it, 8..6 do not
    assert batch_split(16, 16, 3 * 1 + 1) == (4, 1)
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        batch_split(32, 8, 3)


def test_micro_batches_are_the_same_on_any_process_count_with_the_same_micro_size():
    from pipeline.runtime import batch_split, micro_batch

    batch = list(range(100, 132))
    def layout(world):  # {micro-batch index: items} over every process
        micro, accum = batch_split(32, 8, world)
        return {a * world + r: micro_batch(batch, a, micro, r, world) for r in range(world) for a in range(accum)}
    assert layout(1) == layout(2) == layout(4)
    assert layout(2)[1] == list(range(108, 116))            # micro-batch 0 of process 1
    assert sorted(sum(layout(4).values(), [])) == batch     # every item once


def test_tiny_pretrain_loss_falls_and_output_loads_with_plain_transformers(tmp_path):
    m = _run(tmp_path, "run_name=a", "steps=30")
    assert m.status == "complete" and m.wall_time_s > 0
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "a" / "pretrain" / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert m.metrics["eval/perplexity"] < m.metrics["eval/unigram_perplexity"]
    on_disk = Manifest.load(tmp_path / "a" / "pretrain" / "manifest.json")
    assert on_disk.complete and on_disk.tokenizer_fingerprint and on_disk.config["steps"] == 30
    assert (tmp_path / "a" / "pretrain" / "config.yaml").exists()
    code = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"p={str(tmp_path / 'a' / 'pretrain' / 'model')!r}; t=AutoTokenizer.from_pretrained(p); "
            "m=AutoModelForCausalLM.from_pretrained(p); x=t('The home of', return_tensors='pt'); "
            "o=m.generate(**x, max_new_tokens=5, do_sample=False); "
            "assert o.shape[1] > x['input_ids'].shape[1]; "
            "assert not any(k.startswith(('pipeline', 'stages')) for k in sys.modules); print(t.decode(o[0]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("<s>The home of")


def test_resume_from_mid_run_checkpoint_matches_unbroken_run(tmp_path):
    full = _run(tmp_path, "run_name=full", "steps=12")
    part = _run(tmp_path, "run_name=cut", "steps=12", "stop_after=5")
    assert part.status == "running"
    assert (tmp_path / "cut" / "pretrain" / "checkpoints" / "step-0000005" / "trainer_state.json").exists()
    resumed = _run(tmp_path, "run_name=cut", "steps=12")
    assert resumed.status == "complete"
    assert resumed.metrics["train/loss"] == pytest.approx(full.metrics["train/loss"], rel=1e-5)
    assert resumed.metrics["eval/loss"] == pytest.approx(full.metrics["eval/loss"], rel=1e-5)
    steps = [r["step"] for r in read_metrics(tmp_path / "cut" / "pretrain" / "metrics.jsonl") if "train/lr" in r]
    assert steps == sorted(set(steps))  # no step logged twice across the restart


@pytest.mark.parametrize("nproc", [2])
def test_two_process_launch_matches_one_process(tmp_path, nproc):
    """Same global batch and micro-batches: 8 micro x 2 processes == 8 micro x 1 process x 2
    accumulation, bitwise under DDP (the all-reduce's (g1 + g2) / 2 is 1 process's g1 / 2 + g2 / 2;
    another micro size rounds the matmuls otherwise and drifts apart over a run)."""
    one = _run(tmp_path, "run_name=one", "steps=8")
    cmd = launch_command("pretrain", [f"runs_dir={tmp_path}", "run_name=two", *TINY, "steps=8"], nproc=nproc, accel="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "pretrain" / "manifest.json").read_text())
    assert "2 procs" in proc.stderr  # really two processes, not a silent single one
    assert two["metrics"]["train/loss"] == one.metrics["train/loss"]
    assert two["metrics"]["eval/loss"] == one.metrics["eval/loss"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """Someone's existing causal LM: a tiny random Llama with its own BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.tokenizer import train_tokenizer

    tok = train_tokenizer([f"The {c} cat sat on mat {i}." for c in ("red", "old", "big") for i in range(50)], vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id))
    path = tmp_path_factory.mktemp("base") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["one_document.txt", "records.jsonl"])
def test_continued_pretraining_on_user_files(tmp_path, tiny_model_dir, name):
    """A .txt with no blank line is one document: nothing was held out, and the tokenizer
    called on the empty held-out list raised IndexError. Now the last blocks are held out."""
    sentences = [f"The {c} cat sat on mat {i}." for i in range(40) for c in ("red", "old")]
    if name.endswith(".txt"):
        (tmp_path / name).write_text("\n".join(sentences) + "\n")
    else:
        (tmp_path / name).write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    rc = pretrain.main([f"runs_dir={tmp_path}", "run_name=c", f"model.name_or_path={tiny_model_dir}", "data.source=files",
                        f"data.files=[{tmp_path / name}]", "model.seq_len=32", "steps=2", "batch.size=4",
                        "batch.micro=4", "eval.every=0", "save_every=0", "wandb.mode=disabled", "threads=1"])
    m = Manifest.load(tmp_path / "c" / "pretrain" / "manifest.json")
    assert rc == 0 and m.complete
    assert 1 < m.metrics["eval/perplexity"] < 1e4  # measured on held-out blocks, not on nothing


def test_held_out_blocks_when_documents_are_few():
    ids = [list(range(2, 12))] * 4  # 4 documents: [bos=0, 2..11, eos=1], 48 tokens, 6 blocks of 8
    train, valid = pretrain.split_blocks(ids, [], 0, 1, 8, 0.25, "f")
    assert (len(train), len(valid)) == (4, 2) and valid[-1].tolist() == [5, 6, 7, 8, 9, 10, 11, 1]  # the tail of the stream
    with pytest.raises(DataError, match=r"f: 12 tokens make 1 block\(s\) of model.seq_len=8; at least 2 are needed"):
        pretrain.split_blocks([list(range(2, 12))], [], 0, 1, 8, 0.02, "f")
