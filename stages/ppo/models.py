"""The four PPO models and where they come from.

- policy: the SFT model, trainable (optionally a fresh LoRA adapter on top of the SFT weights);
- reference: the frozen SFT policy; with LoRA the same module with its adapter disabled, which
  is exactly the SFT model because the SFT weights are the adapter's base (nothing is merged);
- reward model: frozen sequence classifier (already normalized by the rm stage); its likelihood
  term, when it has one, is computed by the reference itself wherever the term's model has the
  reference's weights (their fingerprints agree), so the SFT weights are held once;
- critic: a separate sequence classifier initialised from the RM, read at every position. It
  reads the policy's token ids, so when the RM has another vocabulary (another model family) it
  is the policy's backbone with a fresh, zero scalar head instead (`critic_source`).
Dropout is off in all four: with it, ratios are not 1 at step 0 and KL estimates are noise.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import runs
from pipeline.models import (as_frozen, attn_implementation, disable_dropout, enable_gradient_checkpointing,
                             frozen_numerics, load_causal_lm, load_tokenizer, whole_on_every_rank)
from pipeline.runtime import resolve_precision
from reward_model.likelihood import attach, likelihood_spec, load_likelihood, term_from_spec
from stages.ppo.functional import ema_update


@dataclass
class Sources:
    """Model directories, and the rm stage this run hands off from (None with explicit paths)."""

    policy_dir: str
    reward_dir: str
    parent: runs.Parent | None = None
    sft_manifest: Path | None = None


def resolve_sources(cfg) -> Sources:
    """The rm manifest (previous stage or `parent=`) gives the reward model; the policy is the rm
    stage's own parent, the sft manifest. `policy.name_or_path` / `reward.name_or_path` skip them."""
    policy_dir, reward_dir = cfg.policy.name_or_path, cfg.reward.name_or_path
    if policy_dir and reward_dir:
        return Sources(str(policy_dir), str(reward_dir))
    parent = runs.resolve_parent("ppo", cfg.runs_dir, cfg.run_name, cfg.parent)
    sft_manifest = None
    if not policy_dir:
        sft_manifest, sft_dir = sft_of(parent)
        policy_dir = str(sft_dir)
    return Sources(str(policy_dir), str(reward_dir or parent.model_dir), parent, sft_manifest)


def sft_of(rm: runs.Parent) -> tuple[Path, Path]:
    """(sft manifest path, sft model dir) recorded as the rm stage's parent, checked."""
    where = rm.manifest_path
    if not rm.manifest.parent:
        raise runs.HandoffError(f"{where}: the rm manifest records no parent, so the SFT policy is unknown; "
                                f"pass policy.name_or_path=<SFT model dir>")
    path = runs.recorded_parent(where, rm.manifest)
    m = runs.Manifest.load(path)
    if m.stage != "sft":
        raise runs.HandoffError(f"{path}: the reward model's parent is a '{m.stage}' stage; PPO starts from an 'sft' policy")
    if not m.complete:
        raise runs.HandoffError(f"{path}: the sft stage is {m.status}, not complete; re-run it, then rm, then ppo")
    if rm.manifest.parent_hash and runs.file_hash(path) != rm.manifest.parent_hash:
        raise runs.HandoffError(f"{path}: the sft stage changed after the reward model was trained on it "
                                f"(manifest hash differs from the one in {where}); re-run rm before ppo")
    if not m.model_dir:
        raise runs.HandoffError(f"{path}: manifest records no model directory")
    model_dir = Path(m.model_dir) if Path(m.model_dir).is_absolute() else path.parent / m.model_dir
    if not model_dir.exists():
        raise runs.HandoffError(f"{path}: model directory {model_dir} is missing")
    if m.tokenizer_fingerprint and runs.tokenizer_fingerprint(model_dir) != m.tokenizer_fingerprint:
        raise runs.HandoffError(f"{model_dir}: tokenizer differs from the one recorded in {path}")
    return path.resolve(), model_dir.resolve()


class ValueModel(torch.nn.Module):
    """Per-token values V [B, L] from a sequence-classification model: the backbone's hidden
    states at every position through its `score` head (the classifier itself reads one position).

    Wrapped as a module so DDP sees a real forward (calling a submodule directly would bypass the
    gradient-synchronisation bookkeeping)."""

    def __init__(self, critic: torch.nn.Module):
        super().__init__()
        self.critic = critic

    @property
    def config(self):
        """The critic's config (DeepSpeed sizes its buckets from `config.hidden_size`)."""
        return self.critic.config

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        base = self.critic.get_base_model() if hasattr(self.critic, "get_base_model") else self.critic
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return base.score(hidden).squeeze(-1).float()


@dataclass
class PPOModels:
    """The models of one PPO run. `policy` and `value_model` are replaced by their prepared
    (possibly DDP-wrapped) versions after `accelerator.prepare`."""

    policy: torch.nn.Module
    value_model: torch.nn.Module
    ref: torch.nn.Module | None     # None with LoRA: use the policy with its adapter disabled
    reward: torch.nn.Module
    tokenizer: object
    reward_tokenizer: object
    lora: bool = False
    critic_source: str = "reward model"
    likelihood_shared: bool = False  # the reward model's likelihood term is the reference's own forward


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    model.eval()
    return model


def _lora(model: torch.nn.Module, section, task_type: str):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if list(section.target_modules) == ["all-linear"] else list(section.target_modules)
    # lora_dropout is 0 on purpose: dropout would make the step-0 ratio differ from 1.
    config = LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=0.0, target_modules=targets,
                        task_type=task_type)
    return get_peft_model(model, config)


def load_sequence_classifier(path: str, tokenizer, dtype: torch.dtype = torch.float32, attn: str = "auto") -> torch.nn.Module:
    """A one-label sequence classifier whose pooling reads the last non-pad token."""
    from transformers import AutoModelForSequenceClassification

    with whole_on_every_rank():
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype,
                                                                   attn_implementation=attn_implementation(attn))
    if model.config.pad_token_id is None or model.config.pad_token_id == tokenizer.eos_token_id:
        # pad == eos would make the classifier read the score one token before eos (docs/ppo.md §14).
        model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


def load_models(cfg, sources: Sources, device, numerics: str | None = None) -> PPOModels:
    """Load policy, reference, reward model and critic; dropout off everywhere. The trained ones
    load in fp32; the frozen ones are stored as `numerics` says (`pipeline.models.frozen_numerics`:
    default, for one process or DDP at the run's precision), so that the reference computes
    exactly what the policy computes from the same weights."""
    precision = resolve_precision(cfg.precision)
    numerics = numerics or frozen_numerics(precision)
    tokenizer = load_tokenizer(sources.policy_dir)
    reward_tokenizer = load_tokenizer(sources.reward_dir)
    attn = cfg.attention()

    def frozen(model):
        return as_frozen(_frozen(disable_dropout(model)), numerics, precision).to(device)

    policy = disable_dropout(load_causal_lm(sources.policy_dir, tokenizer, attn=attn))
    lora = cfg.policy.lora.enabled
    ref = None
    if lora:
        policy = _lora(policy, cfg.policy.lora, "CAUSAL_LM")
    else:
        ref = frozen(load_causal_lm(sources.policy_dir, tokenizer, attn=attn))
    reward = frozen(load_sequence_classifier(sources.reward_dir, reward_tokenizer, attn=attn))
    spec = likelihood_spec(sources.reward_dir)
    shared = spec is not None and reference_is_likelihood_model(spec, sources, tokenizer, reward_tokenizer)
    if shared:  # one copy of the SFT weights: the term is computed by the reference
        attach(reward, term_from_spec(ref if ref is not None else AdapterDisabled(policy), spec))
    else:  # the RM's likelihood term, if it has one, with a model of its own
        term = load_likelihood(sources.reward_dir, attn=attn)
        if term is not None:
            term.model = frozen(term.model)
        attach(reward, term)
    critic, critic_source = load_critic(sources, tokenizer, reward_tokenizer, attn)
    if lora and cfg.policy.lora.critic:
        critic = _lora(critic, cfg.policy.lora, "SEQ_CLS")
    for m in (policy, reward, critic):
        disable_dropout(m)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
        enable_gradient_checkpointing(critic)
    return PPOModels(policy=policy, value_model=ValueModel(critic), ref=ref, reward=reward, tokenizer=tokenizer,
                     reward_tokenizer=reward_tokenizer, lora=lora, critic_source=critic_source, likelihood_shared=shared)


def reference_is_likelihood_model(spec: dict, sources: Sources, tokenizer, reward_tokenizer) -> bool:
    """Whether the reward model's likelihood term can be computed by the PPO reference: the
    term's model has the reference's weights (`likelihood_has_policy_weights`) and reads the same
    token ids in the same chat template."""
    return (likelihood_has_policy_weights(spec, sources) and same_vocabulary(tokenizer, reward_tokenizer)
            and tokenizer.chat_template == reward_tokenizer.chat_template)


def likelihood_has_policy_weights(spec: dict, sources: Sources) -> bool:
    """Whether the likelihood model `spec` records has the policy's weights: their fingerprints
    agree (compared, not assumed). A policy directory without weights (a `config.json` to plan
    with) has none to compare: then the term's model must be that very directory."""
    policy = Path(sources.policy_dir)
    if any(p.name.endswith(runs.WEIGHT_SUFFIXES) for p in policy.iterdir()):
        return bool(spec.get("fingerprint")) and spec["fingerprint"] == runs.weights_fingerprint(policy)
    return _likelihood_dir(sources.reward_dir, spec).resolve() == policy.resolve()


def _likelihood_dir(reward_dir: str, spec: dict) -> Path:
    """Where the likelihood model is (`likelihood_model_dir`), or where it should be when it is
    missing or changed (a plan may be made before it exists)."""
    from reward_model.likelihood import likelihood_model_dir

    try:
        return likelihood_model_dir(reward_dir, spec)
    except (FileNotFoundError, runs.HandoffError):
        return Path(reward_dir) / spec["model"]


def planned_models(cfg, sources: Sources, precision: str, launcher: str) -> list:
    """The models `load_models` holds, as `pipeline.memory.PlannedModel`s (configs only: model
    directories, or directories with only a `config.json`, as for a model not downloaded yet).
    With no reward model (`sources.reward_dir` None): the one the rm stage makes from this policy,
    a classifier of its shape whose likelihood term is the policy itself."""
    from transformers import AutoConfig

    from pipeline.memory import PlannedModel

    policy = AutoConfig.from_pretrained(sources.policy_dir)
    reward = AutoConfig.from_pretrained(sources.reward_dir) if sources.reward_dir else policy
    frozen = frozen_numerics(precision, launcher)
    lora = cfg.policy.lora if cfg.policy.lora.enabled else None
    same_vocab = policy.vocab_size == reward.vocab_size
    out = [PlannedModel("policy", policy, trained=True, lora=lora),
           PlannedModel("critic", reward if same_vocab else policy, classifier=True, trained=True,
                        lora=lora if lora is not None and cfg.policy.lora.critic else None)]
    if lora is None:
        out.append(PlannedModel("reference", policy, numerics=frozen))
    out.append(PlannedModel("reward model", reward, classifier=True, numerics=frozen))
    reference = "reference" if lora is None else "policy, adapter off"
    if not sources.reward_dir:  # the rm stage's reward model: its term is this policy
        out.append(PlannedModel("likelihood LM", policy, numerics=frozen, shared_with=reference))
        return out
    spec = likelihood_spec(sources.reward_dir)
    if spec is not None:
        where = _likelihood_dir(sources.reward_dir, spec)
        config = AutoConfig.from_pretrained(where) if (where / "config.json").exists() else policy
        shared = likelihood_has_policy_weights(spec, sources)
        out.append(PlannedModel("likelihood LM", config, numerics=frozen, shared_with=reference if shared else None))
    return out


class AdapterDisabled:
    """A LoRA policy called with its adapter disabled: the SFT model (the reference) without a
    copy of its weights, for the reward model's likelihood term."""

    def __init__(self, policy):
        self.policy = policy

    def parameters(self):
        return self.policy.parameters()

    def __call__(self, **inputs):
        from accelerate.utils import extract_model_from_parallel

        with extract_model_from_parallel(self.policy).disable_adapter():
            return self.policy(**inputs)


def same_vocabulary(tokenizer, other) -> bool:
    """Whether token ids mean the same text in both tokenizers."""
    return tokenizer.get_vocab() == other.get_vocab()


def load_critic(sources: Sources, tokenizer, reward_tokenizer, attn: str = "auto") -> tuple[torch.nn.Module, str]:
    """(critic, where it came from). The critic reads the policy's token ids (query + sampled
    response): initialised from the reward model when the RM shares the policy's vocabulary
    (InstructGPT; docs/ppo.md §24), else from the policy's own backbone with a zero scalar head, so
    that its embeddings match the ids it reads (first values 0, learned from the returns). The RM
    itself still scores re-rendered text in its own tokenizer."""
    if same_vocabulary(tokenizer, reward_tokenizer):
        return load_sequence_classifier(sources.reward_dir, tokenizer, attn=attn), "reward model"
    from reward_model.model import load_reward_model

    critic = load_reward_model(sources.policy_dir, tokenizer, attn=attn)
    with torch.no_grad():
        critic.score.weight.zero_()
    return critic, "policy (the reward model has another vocabulary)"


class PolicyEMA:
    """Exponential moving average of the policy's trainable weights, updated after every
    optimizer step; used for evaluation and export only, never for rollouts (docs/ppo.md §33).
    Has state_dict / load_state_dict so `accelerator.register_for_checkpointing` saves it."""

    def __init__(self, policy: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in policy.named_parameters() if p.requires_grad]
        # fp32 whatever the engine holds: a bf16 average would round most (1 - decay) = 0.008 steps away
        self.model = _frozen(copy.deepcopy(policy)).float()

    def update(self, policy: torch.nn.Module) -> None:
        live = dict(policy.named_parameters())
        mine = dict(self.model.named_parameters())
        ema_update([mine[n] for n in self.names], [live[n] for n in self.names], self.decay)

    def state_dict(self) -> dict:
        mine = dict(self.model.named_parameters())
        return {"decay": self.decay, "params": {n: mine[n].detach().cpu().clone() for n in self.names}}

    def load_state_dict(self, state: dict) -> None:
        mine = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in state["params"].items():
                mine[n].copy_(t)
        self.decay = state["decay"]


def export_policy(model: torch.nn.Module, tokenizer, out_dir: Path) -> None:
    """A plain `save_pretrained` directory loadable with no project code. A LoRA adapter is
    merged into its base in place, so call this last."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config.use_cache = True  # a user's generate() should use the KV cache
    with runs.atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
