"""Stage `pretrain`: a causal LM from scratch (size preset) or continued from a checkpoint.

Data flow: text documents (built-in world or user files) -> tokenizer (trained here from
scratch, or the given model's own) -> one token stream `<s> doc </s> <s> doc </s> ...` cut into
equal blocks -> fixed global batches in a seeded order -> AdamW with warm-up and cosine decay
-> periodic resumable checkpoints -> held-out perplexity (world: on text held out in content, no
sentence of it in training; files: on held-out documents), unigram baseline, fact-cloze accuracy
-> `model/` (plain `save_pretrained`) + manifest.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline import runs
from pipeline.config import F, BatchConfig, DataSource, OptimConfig, StageConfig
from pipeline.records import read_text_documents
from pipeline.distributed import backward, clip_grad_norm, configure_deepspeed, full_parameters, no_sync, save_model
from pipeline.evaluation import fact_cloze_accuracy
from pipeline.logprobs import token_nll_sum
from pipeline.memory import check_fits
from pipeline.models import (PRESETS, count_parameters, enable_gradient_checkpointing, llama_from_preset, load_causal_lm,
                             load_tokenizer)
from pipeline.runtime import adamw_warmup_cosine, batch_indices, batch_split, micro_batch
from pipeline.stage import DataError, StageRun, stage_main
from pipeline.tracking import Progress
from pipeline.world import World


@dataclass
class PretrainModelConfig:
    preset: str = F("tiny", f"size preset for a model from scratch: {', '.join(PRESETS)}")
    name_or_path: str | None = F(None, "continue pretraining this causal-LM checkpoint (local path or hub name) instead")
    vocab_size: int = F(2048, "BPE vocabulary size when training a tokenizer from scratch", gt=0)
    seq_len: int = F(128, "tokens per packed training sequence", ge=2)


@dataclass
class PretrainDataConfig(DataSource):
    source: Literal["world", "files"] = F("world", "'world' = the built-in corpus; 'files' = data.files")
    files: list[str] = F([], "plain text (.txt/.md: one document per blank-line-separated block), JSONL/JSON/Parquet/CSV "
                             "files, save_to_disk directories or hub dataset names")
    text_field: str = F("text", "field holding the text in record files and datasets")
    valid_fraction: float = F(0.02, "share of user documents held out for perplexity (with one document: of its blocks)", ge=0, lt=1)


@dataclass
class PretrainEvalConfig:
    every: int = F(100, "held-out perplexity (`eval/perplexity`) every N steps (0 = only at the end)", ge=0)
    blocks: int = F(256, "held-out sequences used for perplexity (world: validation documents, no sentence of which "
                         "occurs in training)", gt=0)


@dataclass
class PretrainConfig(StageConfig):
    model: PretrainModelConfig = F(PretrainModelConfig(), "model to train")
    data: PretrainDataConfig = F(PretrainDataConfig(), "training text")
    optim: OptimConfig = F(OptimConfig(), "optimizer and schedule")
    batch: BatchConfig = F(BatchConfig(size=32, micro=16), "sequences per step and per forward")
    eval: PretrainEvalConfig = F(PretrainEvalConfig(), "held-out perplexity")
    steps: int = F(500, "optimizer steps", gt=0)

    stage = "pretrain"


def memory_plan(cfg: PretrainConfig, launcher: str, nproc: int, device, prompt_len: int = 0, mesh=None):
    """What each of `nproc` processes holds while pretraining (`pipeline.memory.Plan`): the model
    in fp32 with gradients and AdamW state, and a micro-batch's activations."""
    from transformers import AutoConfig, LlamaConfig

    from pipeline.memory import (Phase, Plan, PlannedModel, activation_bytes, model_row, planned_precision,
                                 training_activation_bytes)

    if cfg.model.name_or_path:
        config = AutoConfig.from_pretrained(cfg.model.name_or_path)
    else:
        config = LlamaConfig(vocab_size=cfg.model.vocab_size, max_position_embeddings=cfg.model.seq_len,
                             tie_word_embeddings=True, **PRESETS[cfg.model.preset])
    act = activation_bytes(planned_precision(cfg, device))
    micro = batch_split(cfg.batch.size, cfg.batch.micro, nproc)[0]
    update = training_activation_bytes(config, micro * cfg.model.seq_len, cfg.gradient_checkpointing, act)
    return Plan("pretrain", launcher, nproc, [model_row(PlannedModel("model", config, trained=True), launcher, nproc, mesh)],
                [Phase("update", update, f"activations for a micro-batch of {micro} x {cfg.model.seq_len} tokens"
                       + (" (checkpointed)" if cfg.gradient_checkpointing else ""))])


# The keys `python -m pipeline plan` may change to make this stage fit, besides batch.micro (pipeline.memory.cheaper_settings)
MEMORY_KNOBS: dict = {}


def pack(docs: list[list[int]], bos: int | None, eos: int, seq_len: int) -> torch.Tensor:
    """Concatenate `<s> doc </s>` token lists and cut into `[N, seq_len]` blocks (tail dropped)."""
    stream: list[int] = []
    for ids in docs:
        stream.extend(([bos] if bos is not None else []) + ids + [eos])
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split_blocks(train_ids: list[list[int]], valid_ids: list[list[int]], bos: int | None, eos: int, seq_len: int,
                 valid_fraction: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train blocks, held-out blocks). When either part of the document split fills no block (a
    single document, short documents), the held-out part is the last `valid_fraction` of the
    blocks of all the text."""
    train, valid = pack(train_ids, bos, eos, seq_len), pack(valid_ids, bos, eos, seq_len)
    if len(train) == 0 or len(valid) == 0:
        blocks = pack(train_ids + valid_ids, bos, eos, seq_len)
        n_valid = max(1, round(len(blocks) * valid_fraction))
        train, valid = blocks[:-n_valid], blocks[-n_valid:]
    if len(train) == 0:
        tokens = sum(len(ids) + 1 + (bos is not None) for ids in train_ids + valid_ids)
        raise DataError(f"{what}: {tokens} tokens make {len(train) + len(valid)} block(s) of model.seq_len={seq_len}; "
                        "at least 2 are needed (one to train on, one held out): add text or lower model.seq_len")
    return train, valid


def unigram_perplexity(train: torch.Tensor, valid: torch.Tensor, vocab: int) -> float:
    """Perplexity of an add-one unigram model: the floor any LM must beat."""
    counts = torch.bincount(train.flatten(), minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[valid.flatten()].mean().item())


def next_token_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood of the blocks `x` [B, L] (no padding), without the
    [B, L, V] float32 tensor that `labels=` would make (`pipeline.logprobs`)."""
    logits = model(input_ids=x, use_cache=False).logits[:, :-1]
    return token_nll_sum(logits, x[:, 1:]) / (x.numel() - x.shape[0])


@torch.no_grad()
def evaluate_loss(model, blocks: torch.Tensor, accelerator, micro: int) -> float:
    """Mean next-token loss over `blocks`, split across ranks and reduced globally."""
    model.eval()
    shard = blocks[accelerator.process_index:: accelerator.num_processes]
    total = torch.zeros(2, device=accelerator.device)
    with full_parameters(accelerator, model) as full:  # ranks may hold different numbers of blocks
        for i in range(0, len(shard), micro):
            x = shard[i: i + micro].to(accelerator.device)
            loss = next_token_loss(full, x)
            n = x.numel() - x.shape[0]
            total += torch.stack([loss.float() * n, torch.tensor(float(n), device=accelerator.device)])
    total = accelerator.reduce(total, "sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def prepare_tokenizer(cfg: PretrainConfig, sr: StageRun, accelerator, texts: list[str]):
    """From scratch: rank 0 trains a BPE on `texts` and saves it; the others load it."""
    if cfg.model.name_or_path:
        return load_tokenizer(cfg.model.name_or_path)
    from transformers import AutoTokenizer

    from pipeline.tokenizer import train_tokenizer

    path = sr.ckpt_dir / "tokenizer"
    if accelerator.is_main_process and not (path / "tokenizer.json").exists():
        tok = train_tokenizer(texts, cfg.model.vocab_size)
        with runs.atomic_dir(path) as tmp:
            tok.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(str(path))


def run(cfg: PretrainConfig) -> runs.Manifest:
    with StageRun.open(cfg) as sr:
        return _run(cfg, sr, sr.accelerator, sr.threads)


def _run(cfg: PretrainConfig, sr: StageRun, accelerator, threads: int) -> runs.Manifest:
    log = sr.log
    check_fits(cfg, accelerator, memory_plan)  # on a GPU: a run that cannot fit stops here
    # 1. data and tokenizer
    world = World(cfg.world) if cfg.data.source == "world" else None
    if world is not None:
        train_docs, valid_docs = world.corpus("train"), world.corpus("valid")
    else:
        train_docs, valid_docs = read_text_documents(cfg.data.files, cfg.data.text_field, cfg.data.valid_fraction,
                                                     cfg.data.config, cfg.data.split)
    resume_from = sr.latest_checkpoint()
    sr.clear_stale_checkpoints(resuming=resume_from is not None)
    tokenizer = prepare_tokenizer(cfg, sr, accelerator, train_docs + (world.tokenizer_extra_texts() if world else []))
    # a tokenizer called on an empty batch fails with an IndexError (one document holds none out)
    encode = lambda docs: tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []  # noqa: E731
    train_blocks, valid_blocks = split_blocks(encode(train_docs), encode(valid_docs), tokenizer.bos_token_id,
                                              tokenizer.eos_token_id, cfg.model.seq_len, cfg.data.valid_fraction,
                                              "the built-in world" if world else ", ".join(cfg.data.files))
    valid_blocks = valid_blocks[: cfg.eval.blocks]
    # after the data checks: too little text fails without touching an earlier run's manifest
    sr.begin(data_fingerprint=runs.data_fingerprint([cfg.data.source, cfg.data.files, len(train_docs), train_docs[:3]]),
             resuming=resume_from is not None)

    # 2. model, optimizer, schedule
    if cfg.model.name_or_path:
        model = load_causal_lm(cfg.model.name_or_path, tokenizer, attn=cfg.attention())
    else:
        model = llama_from_preset(cfg.model.preset, tokenizer, cfg.model.seq_len, attn=cfg.attention())
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer, scheduler = adamw_warmup_cosine(model, cfg.optim, cfg.steps)
    n_params = count_parameters(model)  # before prepare: ZeRO-3 leaves empty placeholders behind
    micro, accum = batch_split(cfg.batch.size, cfg.batch.micro, accelerator.num_processes)
    configure_deepspeed(accelerator, micro, accum, cfg.optim.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    tokens_per_step = cfg.batch.size * cfg.model.seq_len
    log(f"{n_params / 1e6:.2f}M parameters | {len(train_blocks)} train blocks x {cfg.model.seq_len} tokens "
        f"| {tokens_per_step} tokens/step = {micro} micro x {accelerator.num_processes} procs x "
        f"{accum} accum | {cfg.steps} steps | {threads} threads/proc")

    step = 0
    if resume_from:
        step = sr.load_checkpoint(accelerator, resume_from)["step"]
        log(f"resumed from {resume_from} at step {step}")
    tracker = sr.tracker(resume_step=step if resume_from else None)

    # 3. train
    progress = Progress("pretrain", cfg.steps, start=step, every=cfg.log_every, enabled=accelerator.is_main_process)
    model.train()
    last_loss, rate = float("nan"), float("nan")
    while step < cfg.steps:
        idx = batch_indices(step, len(train_blocks), cfg.batch.size, cfg.seed)
        step_loss = torch.zeros((), device=accelerator.device)
        for a in range(accum):
            x = train_blocks[micro_batch(idx, a, micro, accelerator.process_index, accelerator.num_processes)]
            x = x.to(accelerator.device)
            sync = no_sync(accelerator, model, sync=a == accum - 1)
            with sync:
                loss = next_token_loss(model, x)
                backward(accelerator, model, loss / accum, boundary=a == accum - 1)
            step_loss += loss.detach().float() / accum
        grad_norm = clip_grad_norm(accelerator, model, cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = accelerator.reduce(step_loss, "mean").item()
        rate = progress.update(step, tokens_per_step, loss=last_loss)
        if step % cfg.log_every == 0 or step == cfg.steps:
            tracker.log({"train/loss": last_loss, "train/lr": scheduler.get_last_lr()[0],
                         "train/grad_norm": float(grad_norm), "perf/tokens_per_s": rate}, step)
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
            vloss = evaluate_loss(model, valid_blocks, accelerator, cfg.batch.forward)
            tracker.log({"eval/loss": vloss, "eval/perplexity": math.exp(vloss)}, step)
        if sr.checkpoint(accelerator, step, cfg.steps, {"step": step, "loss": last_loss}):
            tracker.finish()
            return sr.stopped(step)

    # 4. evaluate and hand off
    vloss = evaluate_loss(model, valid_blocks, accelerator, cfg.batch.forward)
    metrics = {"train/loss": last_loss, "eval/loss": vloss, "eval/perplexity": math.exp(vloss),
               "eval/unigram_perplexity": unigram_perplexity(train_blocks, valid_blocks, len(tokenizer)),
               "perf/tokens_per_s": rate}  # the training loop's, without the final evaluation
    if world is not None:
        with full_parameters(accelerator, model) as full:
            acc, samples = fact_cloze_accuracy(full, tokenizer, world.fact_cloze(), accelerator)
        metrics["eval/fact_cloze_accuracy"] = acc
        tracker.table("eval/fact_cloze_samples", ["prompt", "answer", "generated", "correct"], samples[:50], step)
    tracker.log(metrics, step)
    tracker.summary(metrics)
    model_dir = sr.dir / "model"
    save_model(accelerator, model, tokenizer, model_dir)
    headline = {"perplexity": metrics["eval/perplexity"], "unigram_ppl": metrics["eval/unigram_perplexity"]}
    if "eval/fact_cloze_accuracy" in metrics:
        headline["fact_cloze_acc"] = metrics["eval/fact_cloze_accuracy"]
    manifest = sr.finish(model_dir, metrics, headline)
    tracker.finish()
    if accelerator.is_main_process:
        print(f"\npretrain done in {manifest.wall_time_s:.0f}s")
        held_out = "held-out documents" if world is None else "text held out in content: no sentence seen in training"
        print(f"  held-out perplexity  {metrics['eval/perplexity']:.2f}  (unigram baseline "
              f"{metrics['eval/unigram_perplexity']:.2f}; {len(valid_blocks)} blocks of {held_out})")
        if world is not None:
            print(f"  fact-cloze accuracy  {metrics['eval/fact_cloze_accuracy']:.1%}  (greedy, {len(world.fact_cloze())} prompts)")
        print(f"  model: {model_dir}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    return stage_main(PretrainConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
