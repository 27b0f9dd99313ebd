"""Stage `rsft`: rejection-sampling fine-tuning, the SFT policy fine-tuned on its own best-of-n
samples as the reward model picks them (Touvron et al. 2023, Llama 2 §3.2.3; Dong et al. 2023,
RAFT): a baseline of ppo on the same reward model, with no RL.

Data flow: parent manifest (rm) -> the reward model and, its own parent, the SFT policy -> the
prompts PPO trains on (the world's ppo split, or prompt files, as ppo reads them) -> `n` SFT
samples per prompt at `temperature` (ppo's rollout temperature) -> the reward model scores each
-> per prompt the best finished sample (`best_of_n.jsonl`; a prompt none of whose samples
finished is dropped) -> the sft stage's training (`stages.sft.fine_tune`: loss on the response,
the same data order, LoRA, resume) from the SFT weights -> `model/` + manifest; on the world, the
policy evaluated against SFT on the test prompts exactly as ppo is (`stages.judge`).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline import runs
from pipeline.config import F, BatchConfig, PolicyEvalConfig, StageConfig
from pipeline.distributed import load_frozen
from pipeline.memory import check_fits
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.stage import DataError, StageRun, check_parent_world, stage_main
from pipeline.world import World
from reward_model import comparisons as cmp
from stages.judge import Judge, hand_off
from stages.ppo.config import PromptDataConfig
from stages.sft import LoraConfig, SFTOptimConfig, fine_tune, fine_tune_plan

DATA = "best_of_n.jsonl"  # the selected samples, reused by an interrupted run


@dataclass
class RSFTDataConfig(PromptDataConfig):
    num_prompts: int = F(256, "prompts drawn from the built-in world's ppo split (n samples each)", gt=0)
    max_length: int = F(128, "longest tokenized example; longer ones are truncated", ge=2)
    packing: bool = F(False, "pack several examples into each sequence")


@dataclass
class RSFTConfig(StageConfig):
    data: RSFTDataConfig = F(RSFTDataConfig(), "prompts to sample on: ppo's data section, the same keys")
    n: int = F(16, "samples per prompt; the reward model keeps the best finished one (16: the report's best-of-16)",
               ge=1)
    temperature: float = F(0.7, "sampling temperature (ppo's rollout temperature)", gt=0)
    max_new_tokens: int = F(64, "response length limit when sampling", gt=0)
    lora: LoraConfig = F(LoraConfig(), "LoRA (peft) instead of all weights")
    optim: SFTOptimConfig = F(SFTOptimConfig(lr=1e-4), "optimizer and schedule (the sft stage's; a tenth of its "
                                                       "learning rate, as the policy starts trained)")
    batch: BatchConfig = F(BatchConfig(size=16, micro=8), "examples per step and per forward; forward = sequences "
                                                          "per sampling, scoring or evaluation batch")
    eval: PolicyEvalConfig = F(PolicyEvalConfig(every=0, best_of=[]),
                               "gold evaluation against the SFT policy, as ppo's (every: optimizer steps, 0 = the test "
                               "figures only; best-of-n: ppo reports it)")
    epochs: float = F(2.0, "passes over the selected samples (when steps is -1)", gt=0)
    steps: int = F(-1, "optimizer steps (-1 = from epochs)", ge=-1)

    stage = "rsft"


def run(cfg: RSFTConfig) -> runs.Manifest:
    with StageRun.open(cfg) as sr:
        return _run(cfg, sr, sr.accelerator, sr.threads)


def select_best(prompts: list[str], responses: list[str], finished: list[bool], scores: list[float], n: int) -> list[dict]:
    """Per prompt (its n samples consecutive in the flat lists), the finished sample the reward
    model scores highest (the first of equal scores), as a chat record with its score and the
    prompt's mean sample score; prompts without a finished sample are left out."""
    out = []
    for i, prompt in enumerate(prompts):
        rows = [j for j in range(i * n, (i + 1) * n) if finished[j]]
        if not rows:
            continue
        best = max(rows, key=lambda j: scores[j])
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": responses[best]}],
                    "rm_score": scores[best], "mean_rm_score": sum(scores[i * n:(i + 1) * n]) / n})
    return out


def sample_and_select(cfg: RSFTConfig, accelerator, sft_dir: Path, rm_dir: Path, tokenizer, prompts: list[str],
                      log) -> list[dict]:
    """`n` SFT samples per prompt (`reward_model.comparisons.sample_responses`: rows of a seeded
    stream, the same on any number of processes), scored by the reward model, the best kept."""
    from reward_model.likelihood import term_of
    from reward_model.model import load_reward_model
    from reward_model.scoring import score

    policy = load_frozen(accelerator, sft_dir, tokenizer, cfg.precision, cfg.attention())
    comps = cmp.sample_responses(policy, tokenizer, prompts, cfg.n, cfg.max_new_tokens, cfg.temperature,
                                 cfg.seed, accelerator, cfg.batch.forward)
    del policy
    responses = [r for c in comps for r in c.responses]
    finished = [f for c in comps for f in c.finished]
    rm_tokenizer = load_tokenizer(rm_dir)
    rm = load_reward_model(rm_dir, rm_tokenizer, attn=cfg.attention()).to(accelerator.device).eval()
    if term_of(rm) is not None:
        term_of(rm).model.to(accelerator.device)
    scores = score(rm, rm_tokenizer, [p for p in prompts for _ in range(cfg.n)], responses, finished,
                   cfg.batch.forward, accelerator).tolist()
    del rm
    records = select_best(prompts, responses, finished, scores, cfg.n)
    log(f"{len(prompts)} prompts x {cfg.n} samples: {sum(finished)} finished, {len(records)} prompts kept, mean RM "
        f"score of the kept samples {sum(r['rm_score'] for r in records) / max(1, len(records)):.3f} (all samples "
        f"{sum(scores) / max(1, len(scores)):.3f})")
    return records


def _run(cfg: RSFTConfig, sr: StageRun, accelerator, threads: int) -> runs.Manifest:
    from stages.ppo.data import load_prompts
    from stages.ppo.models import sft_of

    log = sr.log
    check_fits(cfg, accelerator, memory_plan)
    # 1. parent, prompts, samples (validated before anything is written)
    parent = runs.resolve_parent("rsft", cfg.runs_dir, cfg.run_name, cfg.parent)
    check_parent_world(cfg, parent)
    _, sft_dir = sft_of(parent)
    tokenizer = load_tokenizer(sft_dir)
    world = World(cfg.world) if cfg.data.source == "world" else None
    prompts = load_prompts(cfg, world)
    if not prompts:
        raise DataError("no prompts to sample on")
    resume, resume_step = sr.latest_trainer_checkpoint()
    saved = sr.dir / DATA
    if resume is not None and saved.exists():
        records = [json.loads(line) for line in saved.read_text().splitlines() if line]
        log(f"resuming: {len(records)} selected samples from {saved}")
    else:
        records = sample_and_select(cfg, accelerator, sft_dir, parent.model_dir, tokenizer, prompts, log)
    if not records:
        raise DataError(f"none of the {len(prompts)} prompts has a finished sample: raise max_new_tokens")
    sr.begin(parent, runs.data_fingerprint([r["messages"] for r in records]), resuming=resume is not None)
    sr.clear_stale_checkpoints(resuming=resume is not None)
    if accelerator.is_main_process:
        runs.atomic_write_text(saved, "".join(json.dumps(r) + "\n" for r in records))

    # 2. train from the SFT weights (a valid curve every eval.every steps)
    tracker = sr.tracker(resume_step=resume_step)
    judge = Judge(cfg, accelerator, sft_dir, tokenizer, world, tracker, log) if world is not None else None
    model = load_causal_lm(sft_dir, tokenizer, attn=cfg.attention())
    tuned = fine_tune(cfg, sr, accelerator, threads, model, tokenizer,
                      ([{"messages": r["messages"]} for r in records], [], "messages"), resume, tracker,
                      every=cfg.eval.every, curve=judge.curve if judge is not None else None)
    if tuned.model is None:
        tracker.finish()
        return sr.stopped(tuned.step)

    # 3. evaluate against SFT and hand off
    metrics, extra = tuned.metrics, {"lora": cfg.lora.enabled, "examples": len(records), "n": cfg.n}
    metrics["data/selected_rm_score"] = sum(r["rm_score"] for r in records) / len(records)
    metrics["data/sample_rm_score"] = sum(r["mean_rm_score"] for r in records) / len(records)
    if judge is not None:
        test_metrics, extra["evaluation"] = judge.final(tuned.accelerator, tuned.model, tuned.step)
        metrics.update(test_metrics)
    return hand_off(sr, tracker, tuned.accelerator, tuned.model, tokenizer, metrics, extra, tuned.step,
                    f"{len(records)} best-of-{cfg.n} samples")


def memory_plan(cfg: RSFTConfig, launcher: str, nproc: int, device, prompt_len: int = 256, mesh=None):
    """What each of `nproc` processes holds while training (`pipeline.memory.Plan`), as the sft
    stage. Sampling and scoring come before it, one frozen model at a time: the SFT policy as the
    launcher stores a frozen model, then the reward model whole on every process with its
    likelihood term's copy of the SFT weights (for models that do not fit whole, sample with the
    ppo stage's sharded models instead)."""
    from stages.ppo.models import sft_of

    rm = runs.resolve_parent("rsft", cfg.runs_dir, cfg.run_name, cfg.parent)
    return fine_tune_plan("rsft", str(sft_of(rm)[1]), cfg, launcher, nproc, device, mesh)


# The keys `python -m pipeline plan` may change to make this stage fit, besides batch.micro (pipeline.memory.cheaper_settings)
MEMORY_KNOBS = {"lora": ["lora.enabled"]}


def main(argv: list[str] | None = None) -> int:
    return stage_main(RSFTConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
