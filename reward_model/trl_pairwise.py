"""Pairwise reward-model training through TRL's `RewardTrainer`, for data that is pure pairs.

The pairs are pre-rendered with `reward_model.scoring.render` (the same chat-template text that
the K-wise loop trains on and that PPO scores), so TRL does no formatting of its own. The trainer
checkpoints into `<stage>/checkpoints/checkpoint-N` and resumes from the newest one; its logs go
to the stage's tracker (metrics.jsonl + wandb), not to TRL's own reporters.
"""
from __future__ import annotations


from pipeline.distributed import configure_reduction, trainer_launch_args
from pipeline.runtime import batch_split, in_step_order, resolve_precision, total_steps
from pipeline.tracking import trainer_bridge


def train_pairwise(cfg, sr, accelerator, model, tokenizer, train_seqs: list, train: list, log):
    """Train `model` on every ranked pair of `train` with `trl.RewardTrainer`.

    Returns (model, step, finished?, last train metrics, tracker, accelerator) like the K-wise
    loop; finished is False when `stop_after` ended the run early (a checkpoint is left behind).
    Under DeepSpeed the Trainer builds its own accelerator state, which replaces the stage's: the
    stage goes on with the returned one.
    """
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    rows = [{"chosen_ids": g[i], "rejected_ids": g[j]} for g, c in zip(train_seqs, train) for i, j in c.pairs()]
    procs, is_main = accelerator.num_processes, accelerator.is_main_process  # before the Trainer resets the state
    micro, accum = batch_split(cfg.batch.size, cfg.batch.micro, procs)
    total = total_steps(cfg.steps, cfg.epochs, len(rows), cfg.batch.size)
    precision = resolve_precision(cfg.precision)
    # TRL 1.16 defaults are for GPUs and LoRA: bf16 and activation checkpointing on, reporting off.
    args = RewardConfig(
        **trainer_launch_args(accelerator, cfg.dist_timeout_min, accum, cfg.optim.max_grad_norm),
        output_dir=str(sr.ckpt_dir), per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum, max_steps=total, learning_rate=cfg.optim.lr,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": cfg.optim.min_lr_ratio},
        warmup_steps=cfg.optim.warmup_steps, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], max_grad_norm=cfg.optim.max_grad_norm,
        logging_steps=cfg.log_every, save_strategy="steps" if cfg.save_every else "no", save_steps=max(1, cfg.save_every),
        save_total_limit=cfg.keep_checkpoints, seed=cfg.seed, data_seed=cfg.seed,
        bf16=precision == "bf16", fp16=precision == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        center_rewards_coefficient=cfg.center_coef or None, max_length=None, disable_dropout=True)
    resume_from, step = sr.latest_trainer_checkpoint()
    tracker = sr.tracker(resume_step=step)
    names = {"loss": "loss", "accuracy": "accuracy", "margin": "margin", "learning_rate": "lr",
             "grad_norm": "grad_norm", "mean_reward": "reward_mean"}
    bridge = trainer_bridge(cfg, tracker, "seq", 2 * cfg.batch.size, is_main,
                            names={k: f"train/{v}" for k, v in names.items()}, shown=("loss", "accuracy"))
    log(f"TRL RewardTrainer: {len(rows)} pairs | {total} steps x {cfg.batch.size} pairs = {micro} "
        f"micro x {procs} procs x {accum} accum | lr {cfg.optim.lr:g}")
    trainer = RewardTrainer(model=model, args=args, train_dataset=in_step_order(Dataset.from_list(rows), total, cfg.batch.size,
                                                                                cfg.seed), processing_class=tokenizer,
                            callbacks=[bridge])
    trainer.remove_callback(PrinterCallback)
    if resume_from:
        log(f"resuming from {resume_from}")
    configure_reduction(trainer.accelerator, cfg.reduce_fp32)  # its own state under DeepSpeed
    trainer.train(resume_from_checkpoint=resume_from)
    step = trainer.state.global_step
    last = {k.removeprefix("train/"): v for k, v in bridge.last.items()}
    if bridge.stopped:
        sr.stopped(step)
        return trainer.model, step, False, last, tracker, trainer.accelerator
    return trainer.model_wrapped, step, True, last, tracker, trainer.accelerator
