"""Configuration of stage `ppo`: the schema (source of truth) with one line of help per field.

Batch words (`batch`): `batch.rollout` prompts per PPO iteration (all processes), `batch.size`
episodes per optimizer step, a minibatch (all processes), `batch.micro` at most this many
episodes per process per forward/backward. Micro-batches and gradient accumulation are derived
(`pipeline.runtime.batch_split`). The training length `steps` counts iterations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import F, BatchConfig, DataSource, PolicyEvalConfig, StageConfig
from pipeline.runtime import batch_split


@dataclass
class LoraSection:
    enabled: bool = F(False, "train a LoRA adapter on top of the SFT weights; the reference is the same model with the adapter disabled")
    r: int = F(16, "LoRA rank", gt=0)
    alpha: int = F(32, "LoRA alpha (scale = alpha / r)", gt=0)
    target_modules: list[str] = F(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                  "module names that get adapters ('all-linear' alone = every linear layer but the head)")
    critic: bool = F(False, "also give the critic a LoRA adapter (its score head stays fully trainable)")


@dataclass
class PolicySection:
    name_or_path: str | None = F(None, "start from this causal LM instead of the run's SFT model (skips the manifests; for development)")
    lora: LoraSection = F(LoraSection(), "parameter-efficient training of the policy")


@dataclass
class RewardSection:
    name_or_path: str | None = F(None, "use this sequence-classification reward model instead of the run's rm stage (skips the manifests)")


@dataclass
class PromptDataConfig(DataSource):
    source: Literal["world", "files"] = F("world", "'world' = prompts of the built-in world; 'files' = data.files")
    files: list[str] = F([], "prompt records (JSONL/JSON/Parquet/CSV, save_to_disk directories, dataset directories or hub "
                             "datasets): a prompt field, chat `messages`, or preference records")
    prompt_field: str = F("prompt", "field holding the prompt text (or a list of chat messages)")
    num_prompts: int = F(4096, "prompts drawn from the built-in world's ppo split", gt=0)


@dataclass
class PPOBatchConfig(BatchConfig):
    rollout: int = F(64, "prompts (episodes) per iteration, all processes together", gt=0)
    size: int = F(32, "episodes per optimizer step (a minibatch), all processes together", gt=0)
    forward: int = F(64, "sequences per no-grad generation or scoring forward (rollouts and evaluation): a memory knob", gt=0)


@dataclass
class RolloutConfig:
    temperature: float = F(0.7, "sampling temperature τ; also divides the logits of the old, new and reference log-probs", gt=0)
    max_new_tokens: int = F(64, "response length limit, long enough for the longest demonstration: with a shorter one "
                                "chatty answers are cut off and finishing becomes what PPO learns; responses without "
                                "the stop token get the missing-stop penalty", gt=0)
    gather: Literal["auto", "whole", "layer"] = F(
        "auto", "how a policy sharded by fsdp or zero3 is gathered for generation: whole (once per rollout, then each "
                "process decodes on its own; fastest) or layer (one layer at a time in every forward, as in training, "
                "all processes decoding in lockstep: for a policy whose full weights do not fit next to everything "
                "else; slower). auto = whole unless the memory plan says it does not fit this GPU (docs/memory.md)")


@dataclass
class ObjectiveConfig:
    kl_coef: float = F(0.1, "β: weight of the per-token KL penalty in the reward (initial value when adaptive)", ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = F("k1", "per-token KL estimate in the reward: k1 (unbiased, standard), k2, k3")
    adaptive_kl: bool = F(False, "adapt β towards kl_target (Ziegler et al. 2019) instead of keeping it fixed")
    kl_target: float = F(6.0, "target sequence KL in nats for the adaptive controller", gt=0)
    kl_horizon: float = F(10000.0, "adaptive controller horizon in episodes (larger = slower β changes)", gt=0)
    gamma: float = F(1.0, "discount γ", ge=0, le=1)
    lam: float = F(0.95, "GAE λ", ge=0, le=1)
    clip_eps: float = F(0.2, "policy ratio clip ε", gt=0)
    value_clip_eps: float = F(0.2, "value clip ε_v, in reward units", gt=0)
    vf_coef: float = F(1.0, "weight of the value loss (the critic has its own optimizer, so this only scales its gradients)", ge=0)
    entropy_coef: float = F(0.0, "entropy bonus weight c_H (0 = off, the usual choice)", ge=0)
    missing_stop_penalty: float = F(1.0, "subtracted from the score of a response that never emitted the stop token", ge=0)
    reward_clip: float = F(10.0, "scores are clipped to ±this after the penalty", gt=0)
    whiten_rewards: bool = F(False, "rescale the shaped rewards by their global std (no mean shift) before GAE")


@dataclass
class PtxConfig:
    coef: float = F(0.0, "γ_ptx: weight of the pretraining/SFT log-likelihood term (InstructGPT PPO-ptx); 0 = off. "
                         "On the world's valid prompts γ=1 and γ=0 tie in win rate and accuracy (γ=1 holds KL "
                         "lower); make pipeline trains both for the alignment-tax table", ge=0)
    source: Literal["sft", "pretrain"] = F("sft", "sft = demonstrations (loss on the response), pretrain = corpus documents")
    files: list[str] = F([], "user data instead of the built-in world: chat `messages` / prompt+completion (sft) or text (pretrain)")
    batch_size: int = F(32, "ptx sequences per optimizer step, all processes together", gt=0)
    max_length: int = F(128, "ptx sequences are cut to this many tokens", ge=2)


@dataclass
class PPOOptimConfig:
    policy_lr: float = F(3e-5, "policy learning rate (AdamW)", ge=0)
    critic_lr: float = F(1e-4, "critic learning rate (AdamW); usually 2-5x the policy's", ge=0)
    schedule: Literal["constant", "linear"] = F("constant", "learning-rate schedule over iterations: constant or linear decay to 0")
    betas: list[float] = F([0.9, 0.95], "AdamW betas", ge=0, lt=1)
    eps: float = F(1e-5, "AdamW epsilon (1e-5 as in Huang et al. 2024, docs/ppo.md §27)", gt=0)
    weight_decay: float = F(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = F(1.0, "gradient clipping norm, applied to policy and critic separately", gt=0)


@dataclass
class EMAConfig:
    enabled: bool = F(False, "keep an exponential moving average of the policy weights for evaluation and export")
    decay: float = F(0.992, "EMA decay per optimizer step", gt=0, lt=1)


@dataclass
class PPOConfig(StageConfig):
    policy: PolicySection = F(PolicySection(), "the policy (from the SFT model) and LoRA")
    reward: RewardSection = F(RewardSection(), "the reward model (from the rm stage); the critic starts from it")
    data: PromptDataConfig = F(PromptDataConfig(), "prompts for rollouts")
    rollout: RolloutConfig = F(RolloutConfig(), "sampling")
    objective: ObjectiveConfig = F(ObjectiveConfig(), "rewards, KL control, advantages, losses")
    ptx: PtxConfig = F(PtxConfig(), "PPO-ptx: keep the pretraining/SFT likelihood up")
    optim: PPOOptimConfig = F(PPOOptimConfig(), "optimizers and schedules")
    ema: EMAConfig = F(EMAConfig(), "EMA of the policy")
    eval: PolicyEvalConfig = F(PolicyEvalConfig(), "gold evaluation against the SFT policy")
    batch: PPOBatchConfig = F(PPOBatchConfig(), "episodes per iteration, per optimizer step and per forward")
    steps: int = F(40, "PPO iterations (a rollout batch, then its epochs of updates); on the built-in world the "
                       "valid gold score peaks at 30-40, and falls after (over-optimization)", gt=0)
    epochs: int = F(2, "passes over each rollout batch", gt=0)
    compile: bool = F(False, "torch.compile the teacher-forced forwards of policy and critic (scoring and update; "
                             "generation stays eager). On a CPU: updates 1.2x faster at 256 hidden x 6 layers after "
                             "1-2 minutes of compilation, more once when the sequence length first changes; no "
                             "faster in the tiny pipeline's PPO. One process or DDP (docs/stages.md)")

    stage = "ppo"

    def micro_batches(self, world: int) -> tuple[int, int]:
        """(micro-batch size, micro-batches per minibatch) on each of `world` processes
        (`pipeline.runtime.batch_split`)."""
        return batch_split(self.batch.size, self.batch.micro, world, "batch.size")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.batch.rollout % self.batch.size:
            p.append(f"batch.rollout ({self.batch.rollout}) must be a multiple of batch.size ({self.batch.size})")
        if self.ptx.coef > 0 and self.data.source == "files" and not self.ptx.files:
            p.append("ptx.files: required when ptx.coef > 0 and the prompts come from files (the built-in world has no data for you)")
        return p
