"""Stage `dpo`: Direct Preference Optimization (Rafailov et al. 2023) of the SFT policy with TRL's
`DPOTrainer`, a sibling of `rm` and the cheaper alternative to rm + ppo a skeptic tries first.

Data flow: parent manifest (sft) -> the comparisons the rm stage learns from at the same seed
(`reward_model.comparisons.build_comparisons`: world prompts sampled from the SFT policy and ranked
by the gold labeler, or user preference files in any format the rm stage reads) -> every ranked
pair of each K-wise comparison, rendered in the chat template as the rm stage renders them (an
unfinished response keeps no end-of-turn token) -> `DPOTrainer` on those token ids, the reference
log-probabilities computed once before training (no reference model held while training) ->
`model/` (plain, LoRA merged) + manifest; on the world, the policy evaluated against SFT on the
test prompts exactly as PPO is (`stages.policy_eval`: same prompts, decoding, budget, gold judge),
its valid curve every `eval.every` steps.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline import runs
from pipeline.config import F, BatchConfig, InputError, OptimConfig, PolicyEvalConfig, StageConfig
from pipeline.distributed import configure_reduction, launcher_kind, trainer_launch_args
from pipeline.memory import check_fits
from pipeline.models import disable_dropout, fp32_attention, load_causal_lm, load_tokenizer
from pipeline.runtime import batch_split, in_step_order, resolve_precision, total_steps
from pipeline.stage import DataError, StageRun, check_parent_world, stage_main
from pipeline.tracking import trainer_bridge
from pipeline.world import World
from reward_model import comparisons as cmp
from reward_model.comparisons import ComparisonDataConfig
from reward_model.scoring import render_span
from stages.judge import Judge, hand_off
from stages.sft import LoraConfig


@dataclass
class DPOConfig(StageConfig):
    data: ComparisonDataConfig = F(ComparisonDataConfig(), "comparisons: the rm stage's data section, the same keys")
    lora: LoraConfig = F(LoraConfig(), "LoRA (peft) instead of all weights; the reference is the adapter disabled")
    optim: OptimConfig = F(OptimConfig(lr=1.5e-5, weight_decay=0.0, warmup_steps=5),
                           "optimizer and schedule (lr chosen on the world's valid prompts for the tiny model's full "
                           "fine-tune, docs/dpo.md; ~5e-7 for real models, ~5e-6 for LoRA)")
    eval: PolicyEvalConfig = F(PolicyEvalConfig(every=20, best_of=[]),
                               "gold evaluation against the SFT policy, as ppo's (every: optimizer steps; best-of-n "
                               "needs a reward model, which dpo has not)")
    beta: float = F(0.1, "β: the strength of the implicit KL constraint to the SFT policy (DPO's temperature)", gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = F("sigmoid", "DPO's loss (sigmoid = the paper's), IPO or hinge")
    batch: BatchConfig = F(BatchConfig(size=32, micro=16), "pairs per step and per forward; forward = sequences per "
                                                           "sampling or scoring batch (comparisons and evaluation)")
    epochs: float = F(3.0, "passes over the ranked pairs (when steps is -1)", gt=0)
    steps: int = F(-1, "optimizer steps (-1 = as many as the epochs make)", ge=-1)

    stage = "dpo"


def run(cfg: DPOConfig) -> runs.Manifest:
    with StageRun.open(cfg) as sr:
        return _run(cfg, sr, sr.accelerator, sr.threads)


def _run(cfg: DPOConfig, sr: StageRun, accelerator, threads: int) -> runs.Manifest:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig as TRLDPOConfig

    log = sr.log
    check_fits(cfg, accelerator, memory_plan)
    # 1. parent and comparisons (validated before anything is written)
    parent = runs.resolve_parent("dpo", cfg.runs_dir, cfg.run_name, cfg.parent)
    check_parent_world(cfg, parent)
    tokenizer = load_tokenizer(parent.model_dir)
    resume, resume_step = sr.latest_trainer_checkpoint()
    d = cfg.data
    sample = cmp.parent_sampler(accelerator, parent.model_dir, tokenizer, d, cfg.precision, cfg.attention(),
                                cfg.batch.forward)
    train, held_out = cmp.build_comparisons(d, cfg.seed, cfg.world, sample, log, sr.dir if resume else None)
    del sample  # and with it the sampling copy of the parent
    pairs = _pairs(tokenizer, train, d.max_length)
    if not pairs:
        raise DataError("no ranked pair to learn from (all ties, or longer than data.max_length)")
    sr.begin(parent, runs.data_fingerprint([c.record() for c in train]), resuming=resume is not None)
    sr.clear_stale_checkpoints(resuming=resume is not None)
    if accelerator.is_main_process and d.source == "world":
        for name, comps in zip(cmp.SAVED, (train, held_out)):  # reused by an interrupted run
            cmp.write_jsonl(sr.dir / name, comps)

    # 2. model and trainer
    model = disable_dropout(load_causal_lm(parent.model_dir, tokenizer, attn=cfg.attention()))
    if cfg.lora.enabled and launcher_kind(accelerator) in ("fsdp2", "zero3"):
        raise InputError("lora.enabled with a sharded launcher (fsdp, zero3) is not supported: the adapter is merged "
                         "into full weights at the end; use ACCEL=ddp or zero2 for LoRA")
    micro, accum = batch_split(cfg.batch.size, cfg.batch.micro, accelerator.num_processes)
    total = total_steps(cfg.steps, cfg.epochs, len(pairs), cfg.batch.size)
    precision = resolve_precision(cfg.precision)
    args = TRLDPOConfig(
        **trainer_launch_args(accelerator, cfg.dist_timeout_min, accum, cfg.optim.max_grad_norm),
        output_dir=str(sr.ckpt_dir), per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum, max_steps=total, learning_rate=cfg.optim.lr,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": cfg.optim.min_lr_ratio},
        warmup_steps=cfg.optim.warmup_steps, weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1], max_grad_norm=cfg.optim.max_grad_norm, logging_steps=cfg.log_every,
        save_strategy="steps" if cfg.save_every else "no", save_steps=max(1, cfg.save_every),
        save_total_limit=cfg.keep_checkpoints, seed=cfg.seed, data_seed=cfg.seed, report_to="none", disable_tqdm=True,
        bf16=precision == "bf16", fp16=precision == "fp16", activation_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        dataloader_num_workers=0, train_sampling_strategy="sequential", beta=cfg.beta, loss_type=[cfg.loss_type], max_length=d.max_length,
        precompute_ref_log_probs=True, disable_dropout=True)
    peft_config = None
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig

        peft_config = PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                     target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    tracker = sr.tracker(resume_step=resume_step)
    world = World(cfg.world) if d.source == "world" else None
    judge = Judge(cfg, accelerator, parent.model_dir, tokenizer, world, tracker, log) if world is not None else None
    bridge = trainer_bridge(cfg, tracker, "pairs", cfg.batch.size, accelerator.is_main_process,
                            shown=("loss", "rewards/accuracies"), every=cfg.eval.every if judge is not None else 0,
                            at_every=lambda at: judge.curve(trainer.accelerator, trainer.model_wrapped, at))
    pairs_data = _shared_on_disk(Dataset.from_list(pairs), sr.dir / "pairs", accelerator)
    trainer = _pretokenized()(model=model, args=args, train_dataset=in_step_order(pairs_data, total, cfg.batch.size, cfg.seed),
                              processing_class=tokenizer,
                              peft_config=peft_config, callbacks=[bridge])
    trainer.remove_callback(PrinterCallback)  # progress goes through our own line format
    log(f"{len(train)} comparisons -> {len(pairs)} ranked pairs | {total} steps x {cfg.batch.size} pairs = "
        f"{micro} micro x {accelerator.num_processes} procs x {accum} accum | beta {cfg.beta:g} | lr {cfg.optim.lr:g}"
        f" | {'LoRA r=%d' % cfg.lora.r if cfg.lora.enabled else 'full fine-tune'} | {threads} threads/proc"
        + (f" | resuming from {resume}" if resume else ""))

    # 3. train
    configure_reduction(trainer.accelerator, cfg.reduce_fp32)  # its own state under DeepSpeed
    trainer.train(resume_from_checkpoint=resume)
    if trainer.state.global_step < total:
        tracker.finish()
        return sr.stopped(trainer.state.global_step)

    # 4. evaluate against SFT and hand off
    final, trained = trainer.model_wrapped, trainer.accelerator
    extra = {"lora": cfg.lora.enabled, "pairs": len(pairs), "comparisons": len(train)}
    if cfg.lora.enabled:
        final = fp32_attention(trained.unwrap_model(final).merge_and_unload())
    metrics = dict(bridge.last)
    if judge is not None:
        test_metrics, extra["evaluation"] = judge.final(trained, final, total)
        metrics.update(test_metrics)
    return hand_off(sr, tracker, trained, final, tokenizer, metrics, extra, total,
                    f"{len(pairs)} ranked pairs of {len(train)} comparisons")


def _pairs(tokenizer, comparisons: list, max_length: int) -> list[dict]:
    """Every ranked pair of each comparison (better first), as DPOTrainer's token ids: the prompt
    in the chat template, then each response as the rm stage renders it."""
    out = []
    for c in comparisons:
        spans = [render_span(tokenizer, c.prompt, r, f) for r, f in zip(c.responses, c.finished)]
        for i, j in c.pairs():
            (better, start), (worse, other) = spans[i], spans[j]
            if max(len(better), len(worse)) > max_length or better[:start] != worse[:other]:
                continue
            out.append({"prompt_ids": better[:start], "chosen_ids": better[start:], "rejected_ids": worse[other:]})
    return out


def _shared_on_disk(dataset, where: Path, accelerator):
    """`dataset` written by rank 0 to `where` and read back by every process. TRL's DPOTrainer
    writes the reference log-probabilities into a cache file beside the dataset's own files, and
    the other processes read it from there; an in-memory dataset's cache lives in a temporary
    directory of each process, where the others do not find rank 0's file (a 2-process run failed
    with 'Failed to open local file .../cache-....arrow')."""
    import shutil

    from datasets import Dataset

    if accelerator.is_main_process:
        shutil.rmtree(where, ignore_errors=True)  # a resumed run writes the same pairs again
        dataset.save_to_disk(str(where))
    accelerator.wait_for_everyone()
    return Dataset.load_from_disk(str(where))


def _pretokenized():
    """TRL's DPOTrainer on data that arrive as token ids (`_pairs`): its own chat formatting and
    tokenization are skipped, so the tokens are those the reward model sees."""
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PreTokenizedDPOTrainer


def memory_plan(cfg: DPOConfig, launcher: str, nproc: int, device, prompt_len: int = 256, mesh=None):
    """What each of `nproc` processes holds while DPO trains (`pipeline.memory.Plan`): the policy
    with gradients and AdamW state (LoRA: adapters only), no reference (its log-probabilities are
    computed before training), and a micro-batch's activations over chosen and rejected sequences."""
    from transformers import AutoConfig

    from pipeline.memory import Phase, Plan, PlannedModel, activation_bytes, model_row, planned_precision, \
        training_activation_bytes

    config = AutoConfig.from_pretrained(str(runs.resolve_parent("dpo", cfg.runs_dir, cfg.run_name, cfg.parent).model_dir))
    lora = cfg.lora if cfg.lora.enabled else None
    planned = [PlannedModel("policy", config, trained=True, lora=lora)]
    act = activation_bytes(planned_precision(cfg, device))
    micro = batch_split(cfg.batch.size, cfg.batch.micro, nproc)[0]
    update = training_activation_bytes(config, 2 * micro * cfg.data.max_length, cfg.gradient_checkpointing, act,
                                       2 * micro * cfg.data.max_length)
    return Plan("dpo", launcher, nproc, [model_row(pm, launcher, nproc, mesh) for pm in planned],
                [Phase("update", update, f"activations for {micro} pairs x 2 responses x {cfg.data.max_length} tokens"
                       + (" (checkpointed)" if cfg.gradient_checkpointing else ""))])


# The keys `python -m pipeline plan` may change to make this stage fit, besides batch.micro (pipeline.memory.cheaper_settings)
MEMORY_KNOBS = {"lora": ["lora.enabled"]}


def main(argv: list[str] | None = None) -> int:
    return stage_main(DPOConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
