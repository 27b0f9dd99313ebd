"""The PPO iteration, phase by phase (docs/ppo.md §3):

1. generate   sample responses from the current policy (KV cache, pure temperature sampling)
2. score      teacher-forced log-probs (policy, reference), critic values, reward-model scores
3. advantages KL-shaped rewards, GAE, advantage whitening with global statistics
4. optimise   epochs x minibatches x micro-batches of clipped policy and value updates

The math lives in `functional.py`; this module moves tensors between it and the models.
Distribution: every process holds batch.rollout / processes episodes; token counts,
whitening statistics, the KL-controller input and every logged metric are reduced globally.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace

import torch

from pipeline.config import ConfigError
from pipeline.distributed import (backward, clip_grad_norm, configure_deepspeed, full_parameters, is_sharded,
                                  launcher_kind, no_sync, shard_frozen)
from pipeline.evaluation import row_keys
from pipeline.logprobs import token_nll_sum
from pipeline.runtime import adamw, micro_batch
from reward_model.likelihood import term_of
from stages.ppo.data import PtxData
from stages.ppo.functional import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    kl_penalty,
    masked_sum,
    masked_whiten,
    policy_loss,
    process_scores,
    shaped_rewards,
    value_loss,
)
from stages.ppo.models import PolicyEMA, PPOModels
from stages.ppo.rollout import (Rollout, TransformersSampler, build_rollout, queries, sequence_inputs, token_logprobs,
                                token_values)


@dataclass
class Trainer:
    """Everything one PPO iteration needs; the models are `accelerator.prepare`d."""

    cfg: object
    accelerator: object
    models: PPOModels
    opt_policy: torch.optim.Optimizer
    opt_critic: torch.optim.Optimizer
    sched_policy: torch.optim.lr_scheduler.LRScheduler
    sched_critic: torch.optim.lr_scheduler.LRScheduler
    kl_ctl: AdaptiveKLController | FixedKLController
    ema: PolicyEMA | None = None
    ptx: PtxData | None = None
    sampler: object = None  # rollout generation (`rollout.TransformersSampler` or an engine with its interface)
    # What the teacher-forced forwards (scoring and update) call: the prepared models, or with
    # `compile` their torch.compile wrappers. Backward, no_sync, clipping and checkpoints always
    # go through `models`, and generation through the unwrapped eager module.
    policy_forward: object = None
    value_forward: object = None

    def __post_init__(self):
        self.policy_forward = self.models.policy if self.policy_forward is None else self.policy_forward
        self.value_forward = self.models.value_model if self.value_forward is None else self.value_forward

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, "sum")

    @property
    def policy(self):
        return self.accelerator.unwrap_model(self.models.policy)


def make_trainer(cfg, models: PPOModels, accelerator, ptx: PtxData | None = None, sampler=None) -> Trainer:
    """Optimizers, schedules, KL controller, EMA; prepare the trainable models; register every
    stateful object for checkpoints (resume restores all of them). `sampler` generates the
    rollouts: default `rollout.TransformersSampler`; an inference engine with the same two
    methods plugs in here without touching the PPO math."""
    o = cfg.optim

    def optimizer(module, lr):
        return adamw([p for p in module.parameters() if p.requires_grad], lr=lr, betas=tuple(o.betas), eps=o.eps,
                     weight_decay=o.weight_decay)

    opt_policy, opt_critic = optimizer(models.policy, o.policy_lr), optimizer(models.value_model, o.critic_lr)
    # Stepped once per iteration; not `prepare`d (accelerate would step it once per process).
    factor = (lambda it: 1.0) if o.schedule == "constant" else (lambda it: max(0.0, 1.0 - it / cfg.steps))
    sched_policy = torch.optim.lr_scheduler.LambdaLR(opt_policy, factor)
    sched_critic = torch.optim.lr_scheduler.LambdaLR(opt_critic, factor)
    # One `prepare` per trained model: under DeepSpeed each becomes its own engine.
    configure_deepspeed(accelerator, *cfg.micro_batches(accelerator.num_processes), o.max_grad_norm)
    models.policy, opt_policy = accelerator.prepare(models.policy, opt_policy)
    models.value_model, opt_critic = accelerator.prepare(models.value_model, opt_critic)
    shard_frozen_models(models, accelerator)
    obj = cfg.objective
    kl_ctl = (AdaptiveKLController(obj.kl_coef, obj.kl_target, obj.kl_horizon) if obj.adaptive_kl
              else FixedKLController(obj.kl_coef))
    ema = PolicyEMA(accelerator.unwrap_model(models.policy), cfg.ema.decay) if cfg.ema.enabled else None
    for thing in (sched_policy, sched_critic, kl_ctl, ema):
        if thing is not None:
            accelerator.register_for_checkpointing(thing)
    sampler = sampler or TransformersSampler(models.tokenizer, cfg.rollout.temperature, cfg.rollout.max_new_tokens,
                                             cfg.batch.forward)
    # Train mode throughout (dropout is off, docs/ppo.md §23): scoring and update forwards then run
    # the same module state, so a compiled forward is not compiled again for another mode.
    models.policy.train()
    models.value_model.train()
    policy_forward, value_forward = compiled_forwards(cfg, accelerator, models)
    return Trainer(cfg, accelerator, models, opt_policy, opt_critic, sched_policy, sched_critic, kl_ctl, ema, ptx,
                   sampler, policy_forward, value_forward)


def shard_frozen_models(models: PPOModels, accelerator) -> None:
    """The reference, the reward model and a likelihood model of its own, sharded over the
    processes under fsdp and zero3 like the trained models (`pipeline.distributed.shard_frozen`):
    their memory per GPU divides by the process count. Their forwards then run in lockstep:
    rollouts hold as many episodes on every process, evaluation pads its shares."""
    if models.ref is not None:
        models.ref = shard_frozen(accelerator, models.ref)
    term = term_of(models.reward)
    models.reward = shard_frozen(accelerator, models.reward)
    if term is not None:
        if models.likelihood_shared:
            term.model = models.ref if models.ref is not None else term.model
        else:
            term.model = shard_frozen(accelerator, term.model)
        term.lockstep = is_sharded(term.model)


def compiled_forwards(cfg, accelerator, models: PPOModels) -> tuple:
    """(policy, critic) modules for the teacher-forced forwards: the prepared models themselves, or
    with `compile` torch.compile wrappers of them (inductor; a DDP model is compiled whole, so
    its gradient hooks stay in place). Shapes are static at first and dynamic after the first
    change of sequence length (torch's automatic dynamic shapes), so a run compiles each model
    about four times: without and with gradients, static and dynamic."""
    if not cfg.compile:
        return models.policy, models.value_model
    kind = launcher_kind(accelerator)
    if kind != "plain":
        raise ConfigError([f"compile: not supported under {kind} (one process or DDP only); set compile=false"])
    return torch.compile(models.policy), torch.compile(models.value_model)


# ----------------------------------------------------------------------------- 3. advantages
def compute_advantages(r: Rollout, beta: float, obj, all_reduce=None) -> tuple[Rollout, dict]:
    """Rewards, advantages (whitened over all processes) and returns; plus global statistics."""
    mask = r.response_mask
    scores = process_scores(r.scores, r.has_stop, obj.missing_stop_penalty, obj.reward_clip)
    kl = kl_penalty(r.logprobs, r.ref_logprobs, obj.kl_estimator)
    rewards = shaped_rewards(scores, kl, mask, r.last_index, beta)
    if obj.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
    advantages, returns = gae(rewards, r.values, mask, obj.gamma, obj.lam)
    mean, std = global_mean_std(advantages, mask, all_reduce)
    whitened = masked_whiten(advantages, mask, all_reduce=all_reduce)
    # Episode statistics, summed over processes in one reduction.
    k1 = masked_sum(r.logprobs - r.ref_logprobs, mask, dim=1)           # monitored KL is always k1 (docs/ppo.md §5)
    sums = torch.stack([torch.tensor(float(len(r)), device=mask.device), r.scores.float().sum(),
                        (r.scores.float() ** 2).sum(), r.has_stop.float().sum(), mask.sum(1).float().sum(),
                        k1.sum(), masked_sum(rewards, mask), masked_sum(returns, mask), masked_sum(r.values, mask),
                        mask.sum().float(), scores.sum()])
    if all_reduce is not None:
        sums = all_reduce(sums)
    n, s, s2, stops, length, kl_sum, rew, ret, val, tokens, pscore = sums.tolist()
    stats = {"rollout/score": s / n, "rollout/score_std": max(0.0, s2 / n - (s / n) ** 2) ** 0.5,
             "rollout/score_processed": pscore / n, "rollout/eos_rate": stops / n, "rollout/length": length / n,
             "rollout/reward": rew / n, "ppo/kl": kl_sum / n, "ppo/beta": float(beta),
             "ppo/advantage_mean": float(mean), "ppo/advantage_std": float(std), "ppo/return_mean": ret / tokens,
             "ppo/value_mean": val / tokens,
             "ppo/explained_variance": float(explained_variance(r.values, returns, mask, all_reduce)),
             "episodes": n}
    return replace(r, rewards=rewards, advantages=whitened, returns=returns), stats


def global_mean_std(x: torch.Tensor, mask: torch.Tensor, all_reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean and (biased) std over all processes; two passes, like `masked_whiten`."""
    red = all_reduce or (lambda t: t)
    s, n = red(torch.stack([masked_sum(x, mask), mask.sum().float()])).unbind()
    mean = s / n.clamp(min=1)
    var = red(masked_sum((x.float() - mean) ** 2, mask)) / n.clamp(min=1)
    return mean, var.sqrt()


# ----------------------------------------------------------------------------- 4. optimise
STAT_KEYS = ("policy_loss", "value_loss", "entropy_sum", "clipfrac_sum", "approxkl_sum", "ratio_sum", "ratio_sq_sum",
             "vf_clipfrac_sum", "tokens", "ptx_loss")


def _ptx_backward(t: Trainer, step: int) -> torch.Tensor:
    """γ_ptx x mean token NLL on this step's ptx batch, backpropagated into the policy gradient
    (no sync: the following PPO backward all-reduces the accumulated gradient). Returns the NLL."""
    cfg, acc = t.cfg, t.accelerator
    batches = t.ptx.batch(step, cfg.ptx.batch_size, acc.process_index, acc.num_processes, cfg.batch.micro)
    n_tokens = sum((labels[:, 1:] != -100).sum() for _, _, labels in batches)
    n_tokens = t.all_reduce(torch.as_tensor(n_tokens, dtype=torch.float32, device=acc.device)).clamp(min=1)
    nll = torch.zeros((), device=acc.device)
    for ids, attention, labels in batches:
        ids, attention, labels = ids.to(acc.device), attention.to(acc.device), labels.to(acc.device)
        position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
        with no_sync(acc, t.models.policy), acc.autocast():
            logits = t.models.policy(input_ids=ids, attention_mask=attention, position_ids=position_ids,
                                     use_cache=False).logits[:, :-1]
            loss_sum = token_nll_sum(logits, labels[:, 1:])
            # x processes: DDP averages gradients, the sum over processes is what we want.
            backward(acc, t.models.policy, cfg.ptx.coef * loss_sum / n_tokens * acc.num_processes, boundary=False)
        nll += loss_sum.detach() / n_tokens
    return nll


def optimise(t: Trainer, r: Rollout, iteration: int) -> list[dict]:
    """PPO epochs over the rollout: one optimizer step per minibatch, gradients accumulated over
    micro-batches; losses are token sums over the minibatch's GLOBAL valid-token count, so the
    accumulated gradient equals that of one big batch (docs/ppo.md §25, §26). Returns per-minibatch stats.

    Any number of processes makes the same run: the processes first exchange their episodes
    (`Rollout.gather`, global order = one process's order), each epoch draws ONE permutation of
    all episodes (the same on every process), and each global minibatch is split into
    micro-batches over the processes by `pipeline.runtime.micro_batch`."""
    cfg, acc = t.cfg, t.accelerator
    r = r.gather(acc, t.models.tokenizer.pad_token_id)
    micro, accum = cfg.micro_batches(acc.num_processes)
    n_minibatches = cfg.batch.rollout // cfg.batch.size
    t.models.policy.train()
    t.models.value_model.train()
    out = []
    for epoch in range(cfg.epochs):
        # A fresh permutation per epoch, reproducible from (seed, iteration, epoch) alone.
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration * 1009 + epoch)
        perm = torch.randperm(len(r), generator=g).tolist()
        for k in range(n_minibatches):
            step = (iteration * cfg.epochs + epoch) * n_minibatches + k
            minibatch = perm[k * cfg.batch.size: (k + 1) * cfg.batch.size]
            micros = [r.select(torch.tensor(micro_batch(minibatch, a, micro, acc.process_index, acc.num_processes)))
                      for a in range(accum)]
            n_tokens = t.all_reduce(sum(mu.response_mask.sum().float() for mu in micros)).clamp(min=1)
            sums = torch.zeros(len(STAT_KEYS), device=acc.device)
            if t.ptx is not None and cfg.ptx.coef > 0:
                sums[STAT_KEYS.index("ptx_loss")] = _ptx_backward(t, step)
            for a, mu in enumerate(micros):
                sums += _micro_batch(t, mu, n_tokens, sync=a == accum - 1)
            grad_policy, grad_critic = _optimizer_step(t)
            tot = dict(zip(STAT_KEYS, t.all_reduce(sums).tolist()))
            out.append(_minibatch_metrics(tot, grad_policy, grad_critic, cfg))
    return out


def _micro_batch(t: Trainer, mu: Rollout, n_tokens: torch.Tensor, sync: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its stat sums in STAT_KEYS order."""
    acc, obj, temperature = t.accelerator, t.cfg.objective, t.cfg.rollout.temperature
    policy, value_model = t.models.policy, t.models.value_model
    with contextlib.ExitStack() as stack:
        if not sync:  # only the last micro-batch of a minibatch all-reduces gradients
            stack.enter_context(no_sync(acc, policy))
            stack.enter_context(no_sync(acc, value_model))
        inputs = sequence_inputs(mu.query_ids, mu.query_mask, mu.response_ids, mu.response_mask)
        with acc.autocast():
            logprobs, entropy = token_logprobs(t.policy_forward, *inputs, mu.response_ids, temperature,
                                               entropy="grad" if obj.entropy_coef else "detached")
            values = token_values(t.value_forward, *inputs, mu.response_ids.shape[1])
        pg, pg_stats = policy_loss(logprobs, mu.logprobs, mu.advantages, mu.response_mask, obj.clip_eps, n_tokens)
        vf, vf_stats = value_loss(values, mu.values, mu.returns, mu.response_mask, obj.value_clip_eps, n_tokens)
        entropy_sum = masked_sum(entropy, mu.response_mask)
        # The two models share no parameter: one backward per model (each its own engine under
        # DeepSpeed) gives the gradients of pg - c_ent·H + c_vf·vf.
        # x processes: DDP averages gradients, the sum over processes is what we want.
        backward(acc, policy, (pg - obj.entropy_coef * entropy_sum / n_tokens) * acc.num_processes, boundary=sync)
        backward(acc, value_model, obj.vf_coef * vf * acc.num_processes, boundary=sync)
    stats = {**pg_stats, **vf_stats, "policy_loss": pg, "value_loss": vf, "entropy_sum": entropy_sum,
             "ptx_loss": torch.zeros(())}
    return torch.stack([stats[key].detach().float().to(acc.device) for key in STAT_KEYS])


def _optimizer_step(t: Trainer) -> tuple[float, float]:
    """Clip, step and zero both models; update the EMA. Returns the pre-clip gradient norms."""
    acc, max_norm = t.accelerator, t.cfg.optim.max_grad_norm
    norms = []
    for model, opt in ((t.models.policy, t.opt_policy), (t.models.value_model, t.opt_critic)):
        norms.append(clip_grad_norm(acc, model, max_norm))
        opt.step()  # a no-op under DeepSpeed: the engine stepped in its last backward
        opt.zero_grad(set_to_none=True)
    if t.ema is not None:
        t.ema.update(t.policy)
    return norms[0], norms[1]


def _minibatch_metrics(s: dict, grad_policy: float, grad_critic: float, cfg) -> dict:
    n = max(s["tokens"], 1.0)
    ratio = s["ratio_sum"] / n
    entropy = s["entropy_sum"] / n
    pg = s["policy_loss"]
    return {"ppo/policy_loss": pg, "ppo/value_loss": s["value_loss"], "ppo/entropy": entropy,
            "ppo/clipfrac": s["clipfrac_sum"] / n, "ppo/approxkl": s["approxkl_sum"] / n, "ppo/ratio": ratio,
            "ppo/ratio_var": max(0.0, s["ratio_sq_sum"] / n - ratio**2), "ppo/vf_clipfrac": s["vf_clipfrac_sum"] / n,
            "ppo/ptx_loss": s["ptx_loss"],
            "ppo/loss": pg - cfg.objective.entropy_coef * entropy + cfg.ptx.coef * s["ptx_loss"],
            "ppo/grad_norm_policy": grad_policy, "ppo/grad_norm_critic": grad_critic}


# ----------------------------------------------------------------------------- one iteration
def iteration_step(t: Trainer, iteration: int, prompts: list[str], episodes: list[int] | None = None
                   ) -> tuple[dict, Rollout]:
    """One PPO iteration on this process's `prompts`; returns (global metrics, the rollout).
    `episodes`: the prompts' places in the iteration's global batch (default: as `shard` deals
    them, i * processes + rank); an episode's random key is (seed, iteration, place), so the same
    run samples the same tokens on any number of processes."""
    cfg, acc, models = t.cfg, t.accelerator, t.models
    if episodes is None:
        episodes = [i * acc.num_processes + acc.process_index for i in range(len(prompts))]
    t0 = time.perf_counter()
    # 1. generate
    query_ids, query_mask = queries(models.tokenizer, prompts, acc.device)
    keys = row_keys(f"{cfg.seed}/ppo/rollout/{iteration}", episodes)
    with acc.autocast(), full_parameters(acc, models.policy, whole=cfg.rollout.gather != "layer") as policy:
        sampled = t.sampler.sample(policy, query_ids, query_mask, keys)
    t1 = time.perf_counter()
    # 2. score
    rollout = build_rollout(models, acc, prompts, query_ids, query_mask, sampled, cfg.rollout.temperature,
                            cfg.batch.forward, t.policy_forward, t.value_forward)
    t2 = time.perf_counter()
    # 3. advantages
    rollout, stats = compute_advantages(rollout, t.kl_ctl.value, cfg.objective, t.all_reduce)
    # 4. optimise
    minibatches = optimise(t, rollout, iteration)
    t.sampler.sync(acc, models.policy)
    t3 = time.perf_counter()
    # β is updated once per rollout batch from the global mean sequence KL (docs/ppo.md §11).
    t.kl_ctl.update(stats["ppo/kl"], int(stats.pop("episodes")))
    lrs = {"ppo/lr_policy": t.sched_policy.get_last_lr()[0], "ppo/lr_critic": t.sched_critic.get_last_lr()[0]}
    t.sched_policy.step()
    t.sched_critic.step()
    metrics = {**stats, **{k: sum(m[k] for m in minibatches) / len(minibatches) for k in minibatches[0]}, **lrs}
    metrics["ppo/ratio_first"] = minibatches[0]["ppo/ratio"]
    metrics["ppo/approxkl_first"] = minibatches[0]["ppo/approxkl"]
    metrics["rollout/generated_tokens"] = float(t.all_reduce(rollout.response_mask.sum().float()))
    metrics.update({"perf/time_generate": t1 - t0, "perf/time_score": t2 - t1, "perf/time_update": t3 - t2,
                    "perf/episodes_per_s": cfg.batch.rollout / max(t3 - t0, 1e-9)})
    return metrics, rollout
