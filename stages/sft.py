"""Stage `sft`: supervised fine-tuning on prompt -> response pairs with TRL's SFTTrainer.

Data flow: parent manifest (pretrain) -> model + tokenizer -> records (built-in world or user
files: prompt/completion, messages or plain text, validated, columns mapped) -> token ids and
loss masks built here from the chat template (`sft_features`: assistant tokens only, for any
template) -> SFTTrainer on the pre-tokenized data (optional packing and LoRA) -> held-out
evaluation (world: greedy generation on the `test` prompt split, accuracy and finish rate per
skill with 95% intervals, format rate, pretraining-only facts, gold score; user data: held-out
loss) -> `model/` (plain, LoRA merged) + `adapter/` (LoRA only) + manifest.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pipeline import runs
from pipeline.config import F, BatchConfig, DataSource, InputError, StageConfig
from pipeline.distributed import configure_reduction, full_parameters, launcher_kind, save_model, trainer_launch_args
from pipeline.evaluation import parent_knowledge
from pipeline.memory import check_fits
from pipeline.models import disable_dropout, fp32_attention, load_causal_lm, load_tokenizer
from pipeline.runtime import batch_split, in_step_order, resolve_precision, total_steps
from pipeline.records import load_sft_records, replay_documents
from pipeline.sft_eval import evaluate_world, knowledge_split
from pipeline.stats import fmt_rate
from pipeline.stage import StageRun, check_parent_world, stage_main
from pipeline.tokenizer import assistant_token_mask, document_ids
from pipeline.tracking import stratified, trainer_bridge
from pipeline.world import KNOWN_UNKNOWN_SKILLS, World


@dataclass
class SFTModelConfig:
    name_or_path: str | None = F(None, "start from this causal-LM checkpoint instead of the parent stage's model")
    random_init: bool = F(False, "control experiment: same architecture and tokenizer, freshly initialised weights")


@dataclass
class LoraConfig:
    enabled: bool = F(False, "train LoRA adapters instead of all weights (the handoff model is merged)")
    r: int = F(16, "LoRA rank", gt=0)
    alpha: int = F(32, "LoRA alpha (scale = alpha / r)", gt=0)
    dropout: float = F(0.0, "LoRA dropout", ge=0, lt=1)
    target_modules: list[str] = F(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                  "module names that get adapters")


@dataclass
class SFTDataConfig(DataSource):
    source: Literal["world", "files"] = F("world", "'world' = built-in demonstrations; 'files' = data.files")
    columns: dict = F({}, "column mapping, e.g. {prompt: [instruction, input], completion: output}")
    valid_fraction: float = F(0.05, "share of user records held out for loss evaluation", ge=0, lt=1)
    max_length: int = F(128, "longest tokenized example; longer ones are truncated", ge=2)
    replay: float = F(0.0, "pretraining documents mixed into the training data per demonstration, the loss on every "
                           "token of them, so SFT does not overwrite what pretraining stored: the world's corpus, or "
                           "data.replay_files (docs/world.md)", ge=0)
    replay_files: list[str] = F([], "text documents to replay (.txt/.md or records with a `text` field) when "
                                    "data.source is files")
    packing: bool = F(False, "pack several examples into each sequence (faster on long data)")


@dataclass
class SFTOptimConfig:
    """The HF Trainer's AdamW and schedule."""

    lr: float = F(1e-3, "peak learning rate (tiny full fine-tune, chosen on the world's valid prompts: 3e-3 left the "
                       "last-word skill unlearned from one of two pretrained models; ~2e-5 for real models, "
                       "~2e-4 for LoRA)", ge=0)
    weight_decay: float = F(0.0, "AdamW weight decay", ge=0)
    warmup_ratio: float = F(0.05, "share of steps for linear warm-up", ge=0, le=1)
    scheduler: str = F("cosine", "learning-rate schedule (transformers name: cosine, linear, constant, ...)")
    max_grad_norm: float = F(1.0, "gradient clipping norm", gt=0)


@dataclass
class SFTEvalConfig:
    max_new_tokens: int = F(64, "tokens generated per test prompt, greedy: enough for the longest chatty "
                                "demonstration (~40 with the default world), so a policy imitating one can finish", gt=0)
    samples: int = F(40, "sample generations logged to the wandb table", ge=0)


@dataclass
class SFTConfig(StageConfig):
    model: SFTModelConfig = F(SFTModelConfig(), "starting model")
    lora: LoraConfig = F(LoraConfig(), "LoRA (peft) fine-tuning")
    data: SFTDataConfig = F(SFTDataConfig(), "demonstrations")
    optim: SFTOptimConfig = F(SFTOptimConfig(), "optimizer and schedule")
    batch: BatchConfig = F(BatchConfig(size=16, micro=8), "examples per step and per forward; forward = prompts per "
                                                          "generation batch of the evaluation")
    eval: SFTEvalConfig = F(SFTEvalConfig(), "held-out evaluation")
    epochs: float = F(4.0, "passes over the training data (when steps is -1)", gt=0)
    steps: int = F(-1, "optimizer steps (-1 = from epochs)", ge=-1)

    stage = "sft"

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.data.replay and self.data.source == "files" and not self.data.replay_files:
            problems.append("data.replay: with data.source=files, name the documents to replay in data.replay_files")
        return problems


# The SFT trainer's logs, as the stage's metrics
SFT_LOGS = {"loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm", "eval_loss": "eval/loss",
            "mean_token_accuracy": "train/token_accuracy"}


def run(cfg: SFTConfig) -> runs.Manifest:
    with StageRun.open(cfg) as sr:
        return _run(cfg, sr, sr.accelerator, sr.threads)


def _run(cfg: SFTConfig, sr: StageRun, accelerator, threads: int) -> runs.Manifest:
    check_fits(cfg, accelerator, memory_plan)  # on a GPU: a run that cannot fit stops here
    # 1. parent and data (validated before anything is written)
    parent = None
    if cfg.model.name_or_path:
        model_path = cfg.model.name_or_path
    else:
        parent = runs.resolve_parent("sft", cfg.runs_dir, cfg.run_name, cfg.parent)
        model_path = str(parent.model_dir)
        check_parent_world(cfg, parent)
    world = World(cfg.world) if cfg.data.source == "world" else None
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, tokenizer, attn=cfg.attention())
    asked = world.sft_questions() if world is not None and cfg.world.abstain_demos else []
    knows = {}  # what the parent completes of the facts and sums asked in demonstrations and tests
    if world is not None and not cfg.model.random_init:
        tested = [r["prompt"] for r in world.prompts("test") if r["skill"] in KNOWN_UNKNOWN_SKILLS]
        knows = parent_knowledge(model, tokenizer, world, asked + tested, accelerator)
    unknown = frozenset(q for q in asked if not knows.get(q, False))  # refusal-aware demonstrations abstain here
    train_records, valid_records, kind = load_sft_records(cfg.data, world, unknown)
    replay = replay_documents(cfg.data, world, len(train_records))
    resume, resume_step = sr.latest_trainer_checkpoint()
    sr.begin(parent, runs.data_fingerprint([cfg.data.source, cfg.data.files, len(train_records), train_records[:3],
                                            sorted(unknown), len(replay), replay[:3]]),
             resuming=resume is not None)
    sr.clear_stale_checkpoints(resuming=resume is not None)

    # 2. train
    if cfg.model.random_init:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(model.config)
    tracker = sr.tracker(resume_step=resume_step)
    tuned = fine_tune(cfg, sr, accelerator, threads, model, tokenizer, (train_records, valid_records, kind), resume,
                      tracker, replay=replay)
    if tuned.model is None:
        tracker.finish()
        return sr.stopped(tuned.step)
    metrics, final, trained, step = tuned.metrics, tuned.model, tuned.accelerator, tuned.step

    # 4. evaluate and hand off
    extra = {"lora": cfg.lora.enabled}
    if asked:
        extra["abstain_demos"] = {"unknown": sorted(unknown), "asked": len(asked)}
    if world is not None:
        with full_parameters(trained, final) as full:
            world_metrics, extra["evaluation"], rows = evaluate_world(full, tokenizer, world, cfg.eval.max_new_tokens, cfg.batch.forward,
                                                                      accelerator)
        metrics.update(world_metrics)
        if knows:
            knowledge_metrics, extra["evaluation"]["parent_knowledge"] = knowledge_split(rows, knows)
            metrics.update(knowledge_metrics)
        tracker.table("eval/samples", ["skill", "prompt", "response", "correct"],
                      stratified([[r.skill, r.prompt, r.response, r.correct] for r in rows], 0, cfg.eval.samples),
                      step)
    tracker.log(metrics, step)
    tracker.summary(metrics)
    model_dir = sr.dir / "model"
    save_model(trained, final, tokenizer, model_dir)
    headline = {k.split("/")[-1]: v for k, v in metrics.items()
                if k in ("eval/accuracy", "eval/fact_accuracy", "eval/format_rate", "eval/loss")}
    manifest = sr.finish(model_dir, metrics, headline, extra=extra)
    tracker.finish()
    if accelerator.is_main_process:
        _print_report(manifest, metrics, extra.get("evaluation"))
    return manifest


@dataclass
class Tuned:
    """What `fine_tune` ends with."""

    step: int
    metrics: dict | None = None
    model: Any = None         # the trained model, LoRA merged (None: stopped before the last step)
    accelerator: Any = None   # the trainer's own accelerator, which knows the launcher


def fine_tune(cfg, sr: StageRun, accelerator, threads: int, model, tokenizer, records: tuple, resume, tracker,
              every: int = 0, curve: Callable | None = None, replay: list[str] = ()):
    """TRL's SFTTrainer on `records` (train records, held-out records, their kind: what
    `load_sft_records` returns), the loss on the assistant tokens (`sft_features`), in the stage's
    data order; `cfg` has the sft stage's training sections (batch, lora, optim, epochs, steps,
    data.max_length, data.packing). Returns the metrics, the final model in full weights, the trainer's
    accelerator, the last step: `Tuned`; its model None when the run stopped before the end). With
    `every`, `curve(trainer accelerator, model, step)` runs before the first step and every `every`
    steps (a policy stage's valid curve, `stages.judge.Judge.curve`). `replay`: pretraining
    documents trained on among the records, the loss on every token (`sft_features`' text kind)."""
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    train_records, valid_records, kind = records
    disable_dropout(model)
    micro, accum = batch_split(cfg.batch.size, cfg.batch.micro, accelerator.num_processes, "batch.size")
    total = total_steps(cfg.steps, cfg.epochs, len(train_records) + len(replay), cfg.batch.size)
    if cfg.lora.enabled and launcher_kind(accelerator) in ("fsdp2", "zero3"):
        raise InputError("lora.enabled with a sharded launcher (fsdp, zero3) is not supported: the adapter is merged "
                         "into full weights at the end; use ACCEL=ddp or zero2 for LoRA")
    precision = resolve_precision(cfg.precision)
    args = TRLSFTConfig(
        **trainer_launch_args(accelerator, cfg.dist_timeout_min, accum, cfg.optim.max_grad_norm),
        output_dir=str(sr.ckpt_dir), per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro, gradient_accumulation_steps=accum,
        learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_ratio,
        lr_scheduler_type=cfg.optim.scheduler, num_train_epochs=cfg.epochs, max_steps=cfg.steps if cfg.data.packing else total,
        # Our data order, whatever the process count (`runtime.in_step_order`: the dataset below is
        # already in it); with packing the Trainer shuffles the packed sequences itself.
        train_sampling_strategy="random" if cfg.data.packing else "sequential",
        max_grad_norm=cfg.optim.max_grad_norm, logging_steps=cfg.log_every, save_strategy="steps",
        save_steps=cfg.save_every if cfg.save_every > 0 else 10**9, save_total_limit=cfg.keep_checkpoints,
        seed=cfg.seed, data_seed=cfg.seed, report_to="none", disable_tqdm=True,
        bf16=precision == "bf16", fp16=precision == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        dataloader_num_workers=0, max_length=cfg.data.max_length,
        # The data arrive tokenized with their loss masks (`sft_features`): TRL's own masking
        # needs `{% generation %}` markers that released chat templates do not have.
        packing=cfg.data.packing, completion_only_loss=False, assistant_only_loss=False,
        eval_strategy="no", dataset_num_proc=None,
    )
    peft_config = None
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig

        peft_config = PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                     target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    from datasets import Dataset

    def features(records, docs=()):
        return Dataset.from_list([sft_features(tokenizer, r, kind) for r in records]
                                 + [sft_features(tokenizer, {"text": d}, "text") for d in docs])

    train = features(train_records, replay)
    if not cfg.data.packing:
        train = in_step_order(train, total, cfg.batch.size, cfg.seed)
    trainer = _plain_head(SFTTrainer)(model=model, args=args, train_dataset=train,
                         eval_dataset=features(valid_records) if valid_records else None,
                         processing_class=tokenizer, peft_config=peft_config,
                         callbacks=[bridge := trainer_bridge(
                             cfg, tracker, "examples", cfg.batch.size, accelerator.is_main_process, names=SFT_LOGS,
                             every=every if curve is not None else 0,
                             at_every=lambda at: curve(trainer.accelerator, trainer.model_wrapped, at))])
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress goes through our own line format
    sr.log(f"{len(train_records)} train / {len(valid_records)} held-out records ({kind})"
           + (f" + {len(replay)} pretraining documents replayed" if replay else "") + " | global batch "
           f"{cfg.batch.size} = {micro} micro x {accelerator.num_processes} procs x {accum} accum"
           f" | {'LoRA r=%d' % cfg.lora.r if cfg.lora.enabled else 'full fine-tune'} | {threads} threads/proc"
           + (f" | resuming from {resume}" if resume else ""))

    # 3. train
    configure_reduction(trainer.accelerator, cfg.reduce_fp32)  # its own state under DeepSpeed
    result = trainer.train(resume_from_checkpoint=resume)
    if trainer.state.global_step < trainer.state.max_steps:
        return Tuned(trainer.state.global_step)
    # the loss of the final logging window: comparable across restarts, where the mean is not
    metrics = {"train/loss": bridge.last.get("train/loss", float("nan")), "train/mean_loss": result.training_loss,
               "perf/train_runtime_s": result.metrics.get("train_runtime", 0.0)}
    if bridge.raw.get("num_tokens") and metrics["perf/train_runtime_s"]:
        metrics["perf/tokens_per_s"] = bridge.raw["num_tokens"] / metrics["perf/train_runtime_s"]
    if valid_records:
        metrics["eval/loss"] = trainer.evaluate()["eval_loss"]
    # The trainer's own accelerator knows the launcher (FSDP2 / DeepSpeed); `model_wrapped` is the
    # DeepSpeed engine under ZeRO and the model itself otherwise.
    final, trained = trainer.model_wrapped, trainer.accelerator
    if cfg.lora.enabled:
        adapter_dir = sr.dir / "adapter"
        if accelerator.is_main_process:
            with runs.atomic_dir(adapter_dir) as tmp:
                trained.unwrap_model(final).save_pretrained(tmp)
        final = fp32_attention(trained.unwrap_model(final).merge_and_unload())  # evaluated in fp32
    return Tuned(trainer.state.global_step, metrics, final, trained)


def memory_plan(cfg: SFTConfig, launcher: str, nproc: int, device, prompt_len: int = 0, mesh=None):
    """What each of `nproc` processes holds while SFT trains (`pipeline.memory.Plan`): the policy
    in fp32 with its gradients and AdamW state (LoRA: the adapters' only), and the activations of a
    micro-batch of `data.max_length` tokens. `prompt_len` is unused (SFT's length is max_length)."""
    path = cfg.model.name_or_path or str(runs.resolve_parent("sft", cfg.runs_dir, cfg.run_name, cfg.parent).model_dir)
    return fine_tune_plan("sft", path, cfg, launcher, nproc, device, mesh)


def fine_tune_plan(stage: str, model_path: str, cfg, launcher: str, nproc: int, device, mesh=None):
    """The memory plan of `fine_tune` for the model at `model_path` (`cfg` as `fine_tune` reads it)."""
    from transformers import AutoConfig

    from pipeline.memory import (Phase, Plan, PlannedModel, activation_bytes, model_row, planned_precision,
                                 training_activation_bytes)

    config = AutoConfig.from_pretrained(model_path)
    policy = PlannedModel("policy", config, trained=True, lora=cfg.lora if cfg.lora.enabled else None)
    act = activation_bytes(planned_precision(cfg, device))
    micro = batch_split(cfg.batch.size, cfg.batch.micro, nproc, "batch.size")[0]
    tokens = micro * cfg.data.max_length
    update = training_activation_bytes(config, tokens, cfg.gradient_checkpointing, act)
    return Plan(stage, launcher, nproc, [model_row(policy, launcher, nproc, mesh)],
                [Phase("update", update, f"activations for a micro-batch of {micro} x {cfg.data.max_length} tokens"
                       + (" (checkpointed)" if cfg.gradient_checkpointing else ""))])


# The keys `python -m pipeline plan` may change to make this stage fit, besides batch.micro (pipeline.memory.cheaper_settings)
MEMORY_KNOBS = {"lora": ["lora.enabled"]}


def _plain_head(trainer_class):
    """TRL's SFTTrainer with the loss from the model's plain LM head. TRL's fused head projects in
    tiles and also computes every token's entropy for its logs; for the small vocabularies and
    batches of this project's CPU runs the plain head is cheaper (`make bench` compares the stage
    with a bare loop); its log-softmax runs a slice at a time (`pipeline.logprobs`). The loss is
    TRL's own: the sum of the assistant tokens' negative log-likelihoods over `num_items_in_batch`
    (the step's tokens on all processes), times the process count under
    `average_tokens_across_devices`. Token accuracy is still logged.
    Everything else (label smoothing, other loss types, MoE aux loss, eval outputs) goes to TRL."""
    import torch

    from pipeline.logprobs import token_nll_sum

    class PlainHeadSFTTrainer(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if (return_outputs or self.compute_loss_func is not None or self.label_smoother is not None
                    or self.args.loss_type != "nll" or self.aux_loss_enabled or not self.model.training):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"][:, 1:]
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits[:, :-1]
            mask = labels != -100
            loss = token_nll_sum(logits, labels)  # no [B, L, V] float32 tensor (pipeline.logprobs)
            num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = loss / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            stats = torch.stack([mask.sum(), ((logits.detach().argmax(-1) == labels) & mask).sum(),
                                 inputs["attention_mask"].sum() if "attention_mask" in inputs
                                 else torch.tensor(inputs["position_ids"].size(1), device=mask.device)])
            valid, correct, tokens = self.accelerator.gather_for_metrics(stats[None]).sum(0).tolist()
            self._metrics["train"]["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
            self._total_train_tokens += tokens // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

    return PlainHeadSFTTrainer


def sft_features(tokenizer, record: dict, kind: str) -> dict:
    """One example as token ids and a loss mask -> {"input_ids", "assistant_masks"} (1 = loss).

    - messages: the conversation in the chat template; loss on every assistant turn, its
      end-of-turn token included (`pipeline.tokenizer.assistant_token_mask`, any template);
    - prompt_completion: the prompt's turns then the completion's (a string is one user turn and
      one assistant turn, as the rm and ppo stages render them); loss on the completion;
    - text: `bos text eos` as pretraining packs documents (bos where the tokenizer has one); loss
      on every token.
    """
    if kind == "text":
        (ids,) = document_ids(tokenizer, [record["text"]])
        return {"input_ids": ids, "assistant_masks": [1] * len(ids)}
    if kind == "messages":
        messages, first = record["messages"], 0
    else:
        turn = lambda role, x: [{"role": role, "content": x}] if isinstance(x, str) else list(x)  # noqa: E731
        prompt = turn("user", record["prompt"])
        messages, first = prompt + turn("assistant", record["completion"]), len(prompt)
    ids, mask = assistant_token_mask(tokenizer, messages, first)
    return {"input_ids": ids, "assistant_masks": [int(m) for m in mask]}


def _print_report(manifest: runs.Manifest, metrics: dict, evaluation: dict | None) -> None:
    print(f"\nsft done in {manifest.wall_time_s:.0f}s")
    if evaluation:
        e, o = evaluation, evaluation["overall"]
        print(f"  accuracy {fmt_rate(o['accuracy'])} ({e['split']} split, {e['prompts']} prompts, {e['decoding']}, "
              f"{e['max_new_tokens']} tokens)")
        for skill, s in e["skills"].items():
            note = "  (held-out people: knowledge from pretraining)" if skill == "fact" else ""
            print(f"    {skill:<6} accuracy {fmt_rate(s['accuracy'])}  finished {fmt_rate(s['finish'])}  "
                  f"{s['n']} prompts{note}")
        print(f"  finished {fmt_rate(o['finish'])}  format {fmt_rate(o['format'])}  gold score {o['gold_score']:.3f} (max 5)")
        if "hallucination" in o:
            print(f"  abstain {fmt_rate(o['abstain'])}  hallucination {fmt_rate(o['hallucination'])} of the fact and sum prompts")
        if k := e.get("parent_knowledge"):
            print(f"    the pretrained model completes the corpus sentence of {fmt_rate(k['parent_knows'])} of them; "
                  f"wrong where it does {fmt_rate(k['hallucination_known'])}, where it does not "
                  f"{fmt_rate(k['hallucination_unknown'])}")
    if "eval/loss" in metrics:
        print(f"  held-out loss {metrics['eval/loss']:.4g}")
    print(f"  model: {Path(manifest.config['runs_dir']) / manifest.run_name / 'sft' / manifest.model_dir}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(SFTConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
