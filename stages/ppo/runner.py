"""Stage `ppo`: KL-regularized PPO of the SFT policy against the frozen reward model.

Data flow: rm manifest -> reward model + critic; its parent sft manifest -> policy + reference
-> prompts (built-in world or files) in a seeded order addressed by iteration -> per iteration:
generate, score, advantages, optimise (`loop.py`) -> gold evaluation vs the SFT policy every
`eval.every` iterations on the valid prompts (`stages/policy_eval.py`) -> resumable checkpoints (models, optimizers, schedules,
KL controller, EMA, random state; the prompt position is the iteration) -> `model/` (+
`model_ema/`) as plain `save_pretrained` directories -> the reported figures on the test prompts
(greedy and sampled comparisons with SFT, best-of-n) -> manifest (headline: greedy gold win rate).
"""
from __future__ import annotations

import json
import time

from pipeline import runs
from pipeline.config import InputError
from pipeline.distributed import full_parameters, launcher_kind, save_model, trained_numerics
from pipeline.evaluation import shard
from pipeline.memory import check_fits, gpu_memory_gib, plan_launcher
from pipeline.models import count_parameters
from pipeline.runtime import batch_indices, seed_everything, seed_for
from pipeline.stats import fmt_rate
from pipeline.stage import StageRun, check_parent_world
from pipeline.tracking import Progress, stratified
from pipeline.world import World
from stages.ppo.config import PPOConfig
from stages.ppo.data import demonstration_unknowns, load_prompts, load_ptx
from stages.policy_eval import SKILL, TABLE_COLUMNS, EvalSettings, evaluate, make_eval_set, test_evaluation
from stages.ppo.loop import Trainer, iteration_step, make_trainer
from stages.ppo.models import Sources, export_policy, load_models, resolve_sources


def run(cfg: PPOConfig) -> runs.Manifest:
    with StageRun.open(cfg) as sr:
        return _run(cfg, sr, sr.accelerator, sr.threads)


def check_sizes(cfg: PPOConfig, world: int) -> int:
    """Derived sizes must divide evenly over processes; returns micro-batches per minibatch."""
    problems = []
    if cfg.batch.rollout % world:
        problems.append(f"batch.rollout={cfg.batch.rollout} is not divisible by {world} processes")
    if cfg.batch.size % world:
        problems.append(f"batch.size={cfg.batch.size} is not divisible by {world} processes")
    if cfg.ptx.coef > 0 and cfg.ptx.batch_size % world:
        problems.append(f"ptx.batch_size={cfg.ptx.batch_size} is not divisible by {world} processes")
    if problems:
        raise InputError("; ".join(problems) + "; pick sizes so that they are")
    return cfg.micro_batches(world)[1]


def memory_plan(cfg: PPOConfig, launcher: str, nproc: int, device, prompt_len: int = 256, mesh=None):
    """What each of `nproc` processes holds (`pipeline.memory.Plan`): the models of `load_models`
    and the largest of the iteration's phases at the configured batch sizes, for prompts of
    `prompt_len` tokens and responses of `rollout.max_new_tokens`."""
    from pipeline.memory import (Phase, Plan, activation_bytes, gathered_bytes, kv_cache_bytes, model_row,
                                 planned_precision, training_activation_bytes)
    from stages.ppo.models import planned_models

    try:
        sources = resolve_sources(cfg)
    except runs.HandoffError:
        if not cfg.policy.name_or_path:
            raise
        sources = Sources(cfg.policy.name_or_path, None)  # no reward model yet: the rm stage's from this policy
    precision = planned_precision(cfg, device)
    models = planned_models(cfg, sources, precision, launcher)
    act = activation_bytes(precision)
    rows = [model_row(pm, launcher, nproc, mesh) for pm in models]
    policy = next(pm for pm in models if pm.role == "policy")
    critic = next(pm for pm in models if pm.role == "critic")
    T, L = cfg.rollout.max_new_tokens, prompt_len + cfg.rollout.max_new_tokens
    local = max(1, cfg.batch.rollout // nproc)
    rows_fwd = min(cfg.batch.forward, local)
    micro = cfg.micro_batches(nproc)[0] if cfg.batch.size >= nproc else 1
    gather = launcher in ("fsdp", "zero3") and nproc > 1
    whole = cfg.rollout.gather != "layer"
    generate = kv_cache_bytes(policy.config, rows_fwd, L, act) + rows_fwd * policy.config.vocab_size * 4
    generate += gathered_bytes(policy, act, whole) if gather else 0
    score = rows_fwd * (T + 1) * policy.config.vocab_size * act + training_activation_bytes(
        policy.config, rows_fwd * L, True, act, lm_head=False) // max(1, policy.config.num_hidden_layers)
    update = (training_activation_bytes(policy.config, micro * L, cfg.gradient_checkpointing, act, micro * (T + 1))
              + training_activation_bytes(critic.config, micro * L, cfg.gradient_checkpointing, act, lm_head=False))
    phases = [Phase("generate", generate, f"KV cache of {rows_fwd} x {L} tokens"
                    + ((", the policy gathered whole" if whole else ", the policy gathered a layer at a time")
                       if gather else "")),
              Phase("score", score, f"no-grad forwards of {rows_fwd} sequences, logits over {T + 1} positions"),
              Phase("update", update, f"activations of policy and critic for a micro-batch of {micro} x {L} tokens"
                    + (" (checkpointed)" if cfg.gradient_checkpointing else ""))]
    return Plan("ppo", launcher, nproc, rows, phases)


# The keys `python -m pipeline plan` may change to make this stage fit, besides batch.micro (pipeline.memory.cheaper_settings)
MEMORY_KNOBS = {"lora": ["policy.lora.enabled", "policy.lora.critic"],
                "gather": "rollout.gather"}


def resolve_auto(cfg: PPOConfig, launcher: str, nproc: int, device, prompt_len: int = 256,
                 gpu_mem_gib: float | None = None) -> PPOConfig:
    """`cfg` with `rollout.gather=auto` decided: layer by layer when a sharded policy (fsdp, zero3)
    gathered whole makes the plan exceed `gpu_mem_gib` while gathering per layer fits; else whole
    (and whole wherever there is no limit to plan against, as on a CPU)."""
    import dataclasses

    from pipeline.memory import build_plan

    if cfg.rollout.gather != "auto":
        return cfg
    pick = lambda how: dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, gather=how))  # noqa: E731
    if gpu_mem_gib is None or launcher not in ("fsdp", "zero3") or nproc == 1:
        return pick("whole")
    if build_plan(memory_plan, pick("whole"), launcher, nproc, device, prompt_len, gpu_mem_gib).fits():
        return pick("whole")
    layer = pick("layer")
    return layer if build_plan(memory_plan, layer, launcher, nproc, device, prompt_len, gpu_mem_gib).fits() else pick("whole")


def eval_settings(cfg: PPOConfig) -> EvalSettings:
    """The evaluation's settings: the `eval` section, the rollout's forward batch, and the KL
    measured at the temperature the policy trains at."""
    return EvalSettings.of(cfg.eval, cfg.batch.forward, cfg.rollout.temperature)


def _run(cfg: PPOConfig, sr: StageRun, accelerator, threads: int) -> runs.Manifest:
    main = accelerator.is_main_process
    log = sr.log
    accum = check_sizes(cfg, accelerator.num_processes)
    if launcher_kind(accelerator) in ("fsdp2", "zero3") and (cfg.policy.lora.enabled or cfg.ema.enabled):
        raise InputError("policy.lora.enabled and ema.enabled need full weights on every process; with a sharded "
                         "launcher (fsdp, zero3) turn them off, or use ACCEL=ddp or zero2")
    # 1. parents, data, models
    sources = resolve_sources(cfg)
    cfg = resolve_auto(cfg, plan_launcher(accelerator), accelerator.num_processes, accelerator.device,
                       gpu_mem_gib=gpu_memory_gib(accelerator))
    check_fits(cfg, accelerator, memory_plan)
    check_parent_world(cfg, sources.parent)
    world = World(cfg.world)
    prompts = load_prompts(cfg, world)
    resume_from = sr.latest_checkpoint()
    sr.clear_stale_checkpoints(resuming=resume_from is not None)
    sr.begin(parent=sources.parent, resuming=resume_from is not None,
             data_fingerprint=runs.data_fingerprint([cfg.data.source, cfg.data.files, len(prompts), prompts[:3]]))
    sr.manifest.extra = {"policy_source": sources.policy_dir, "reward_source": sources.reward_dir,
                         "sft_manifest": str(sources.sft_manifest) if sources.sft_manifest else None}
    models = load_models(cfg, sources, accelerator.device, trained_numerics(accelerator))
    ptx = load_ptx(cfg, world, models.tokenizer, demonstration_unknowns(sources.sft_manifest)) if cfg.ptx.coef > 0 else None
    trainer = make_trainer(cfg, models, accelerator, ptx)
    whole = cfg.rollout.gather != "layer"
    if launcher_kind(accelerator) in ("fsdp2", "zero3") and accelerator.num_processes > 1:
        log("generation gathers the policy " + ("whole, once per rollout" if whole else
                                                "one layer at a time, all processes decoding in lockstep (rollout.gather)"))
    # Same prompt order on every process (explicit generators); different samples per process.
    seed_everything(seed_for(cfg.seed, "train", accelerator.process_index))
    n_policy = count_parameters(trainer.policy)
    n_train = sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad)
    n_minibatches = cfg.batch.rollout // cfg.batch.size
    log(f"policy {sources.policy_dir} ({n_policy / 1e6:.2f}M params, {n_train / 1e6:.2f}M trainable"
        f"{', LoRA' if models.lora else ''}) | reward {sources.reward_dir} | critic from the {models.critic_source}")
    log(f"{cfg.steps} iterations x {cfg.batch.rollout} episodes = {cfg.steps * cfg.batch.rollout} "
        f"| {cfg.epochs} epochs x {n_minibatches} minibatches = {cfg.epochs * n_minibatches} optimizer steps/iteration "
        f"| minibatch {cfg.batch.size} = {cfg.micro_batches(accelerator.num_processes)[0]} micro "
        f"x {accelerator.num_processes} procs x {accum} accum "
        f"| {len(prompts)} prompts | {threads} threads/proc")
    if cfg.compile:
        log("compile: the first iterations compile the policy's and critic's forwards (a minute or two on a CPU), "
            "and again once when the response width first changes")

    # 2. the SFT baseline on the curve's prompts, valid by default (eval.curve_split; gold labeler: built-in world only)
    gold = cfg.data.source == "world"
    ev = eval_settings(cfg)
    eval_set = make_eval_set(models, world, ev, accelerator, cfg.eval.curve_split) if gold else None

    iteration = 0
    if resume_from:
        iteration = sr.load_checkpoint(accelerator, resume_from)["iteration"]
        log(f"resumed from {resume_from} at iteration {iteration}")
    tracker = sr.tracker(resume_step=iteration if resume_from else None)

    def skill_of(prompt: str) -> str:  # the sample tables' strata; user prompts have none
        return world.skill_of(prompt) if cfg.data.source == "world" else ""

    def run_eval(step: int) -> dict:
        if eval_set is None:
            return {}
        t0 = time.perf_counter()
        with accelerator.autocast(), full_parameters(accelerator, trainer.models.policy, whole) as policy:
            metrics, rows = evaluate(policy, models, eval_set, world, ev, accelerator)
            if trainer.ema is not None:
                ema_metrics, _ = evaluate(trainer.ema.model, models, eval_set, world, ev, accelerator, prefix="eval_ema")
                metrics.update(ema_metrics)
        metrics["perf/time_eval"] = time.perf_counter() - t0
        tracker.log(metrics, step)
        tracker.table("eval/samples", TABLE_COLUMNS, stratified(rows, SKILL, cfg.eval.samples), step)
        log(f"eval @ {step}: gold {metrics['eval/gold_score']:.3f} (SFT {metrics['eval/sft_gold_score']:.3f}) "
            f"| win rate {metrics['eval/win_rate']:.3f} | rm {metrics['eval/rm_score']:.3f} | kl {metrics['eval/kl']:.3f}")
        return metrics

    if not resume_from:
        run_eval(0)

    # 3. train
    progress = Progress("ppo", cfg.steps, start=iteration, every=cfg.log_every, unit="episodes", enabled=main)
    metrics: dict = {}
    while iteration < cfg.steps:
        mine = shard([prompts[i] for i in batch_indices(iteration, len(prompts), cfg.batch.rollout, cfg.seed)],
                     accelerator)
        metrics, rollout = iteration_step(trainer, iteration, mine)
        iteration += 1
        metrics["perf/generated_tokens_per_s"] = metrics["rollout/generated_tokens"] / max(
            metrics["perf/time_generate"], 1e-9)
        tracker.log(metrics, iteration)
        progress.update(iteration, cfg.batch.rollout, score=metrics["rollout/score"], kl=metrics["ppo/kl"],
                        eos=metrics["rollout/eos_rate"], clipfrac=metrics["ppo/clipfrac"])
        if cfg.eval.every and iteration % cfg.eval.every == 0 and iteration < cfg.steps:
            run_eval(iteration)
            tracker.table("rollout/samples", ["prompt", "response", "score", "finished", "skill"],
                          stratified([[p, t, s, bool(f), skill_of(p)] for p, t, s, f in zip(
                              rollout.prompts, rollout.texts, rollout.scores.tolist(), rollout.has_stop.tolist())],
                              4, cfg.eval.samples), iteration)
        if sr.checkpoint(accelerator, iteration, cfg.steps, {"iteration": iteration, "metrics": metrics}):
            tracker.finish()
            return sr.stopped(iteration, "iteration")

    # 4. evaluate: the curve's last point on valid, the reported figures on test; hand off
    final = run_eval(cfg.steps)
    evaluation: dict = {}
    if gold:
        t0 = time.perf_counter()
        with accelerator.autocast(), full_parameters(accelerator, trainer.models.policy, whole) as policy:
            test_metrics, evaluation, rows = test_evaluation(policy, models, world, ev, accelerator)
        test_metrics["perf/time_test_eval"] = time.perf_counter() - t0
        tracker.log(test_metrics, cfg.steps)
        tracker.table("test/samples", TABLE_COLUMNS, stratified(rows, SKILL, cfg.eval.samples), cfg.steps)
        final |= test_metrics
        if main:  # SFT vs PPO on the same test prompts, greedy, for the report
            runs.atomic_write_text(sr.dir / "samples.jsonl", "".join(
                json.dumps({"prompt": r[0], "sft": r[1], "ppo": r[2], "sft_gold": r[3], "gold": r[4], "skill": r[SKILL]})
                + "\n" for r in stratified(rows, SKILL, cfg.eval.samples)))
    summary = {**metrics, **final}
    tracker.summary(summary)
    model_dir = sr.dir / "model"
    _export(trainer, models, sr, accelerator)
    headline = {"gold_win_rate": final.get("test/greedy/win_rate"), "accuracy": final.get("test/greedy/accuracy"),
                "sft_accuracy": final.get("test/greedy/sft_accuracy"), "gold_score": final.get("test/greedy/gold_score"),
                "sft_gold_score": final.get("test/greedy/sft_gold_score"),
                "sampled_win_rate": final.get("test/sampled/win_rate"),
                "kl": final.get("test/sampled/kl", metrics.get("ppo/kl")),
                "rm_score": final.get("test/sampled/rm_score", metrics.get("rollout/score"))}
    if trainer.ema is not None:
        headline["ema_gold_win_rate"] = final.get("eval_ema/win_rate")
    extra = sr.manifest.extra | ({"ema_model_dir": "model_ema"} if trainer.ema is not None else {})
    if evaluation:
        extra["evaluation"] = evaluation
    manifest = sr.finish(model_dir, summary, {k: v for k, v in headline.items() if v is not None}, extra=extra)
    tracker.finish()
    if main:
        print(f"\nppo done in {manifest.wall_time_s:.0f}s")
        if evaluation:
            print_evaluation(evaluation)
        print(f"  model: {model_dir}")
    return manifest


def print_evaluation(evaluation: dict) -> None:
    """The test-split comparison with SFT, per decoding and per skill, and the best-of-n baselines."""
    for name, c in evaluation["comparisons"].items():
        p, s = c["policy"], c["sft"]
        print(f"  {c['decoding']} vs {c['decoding']} ({c['prompts']} test prompts, {evaluation['max_new_tokens']} tokens):"
              f" win rate vs SFT {fmt_rate(c['win_rate'])} (ties half)")
        print(f"    accuracy  PPO {fmt_rate(p['accuracy'])} | SFT {fmt_rate(s['accuracy'])}")
        print(f"    finished  PPO {fmt_rate(p['finish'])} | SFT {fmt_rate(s['finish'])}")
        print(f"    gold      PPO {p['gold_score']:.3f} | SFT {s['gold_score']:.3f} | RM score {p['rm_score']:.3f}"
              + (f" | KL to SFT {p['kl']:.3f} nats" if p.get("kl") is not None else ""))
        if name == "greedy":
            for skill, v in p["skills"].items():
                sv = s["skills"][skill]
                print(f"      {skill:<6} accuracy {100 * v['accuracy']['value']:5.1f}% (SFT {100 * sv['accuracy']['value']:5.1f}%)"
                      f" | finished {100 * v['finish']['value']:5.1f}% (SFT {100 * sv['finish']['value']:5.1f}%)")
    for b in evaluation.get("best_of_n", []):
        print(f"  best-of-{b['n']} SFT samples (KL {b['kl']:.2f}): win rate {fmt_rate(b['win_rate'])} | accuracy "
              f"{fmt_rate(b['accuracy'])} | gold {b['gold_score']:.3f} | RM {b['rm_score']:.3f}")


def _export(trainer: Trainer, models, sr: StageRun, accelerator) -> None:
    """`model/` (and `model_ema/`) as plain save_pretrained directories, gathered on rank 0 under
    sharded launchers; LoRA adapters are merged into plain weights."""
    if models.lora:
        if accelerator.is_main_process:
            export_policy(trainer.policy, models.tokenizer, sr.dir / "model")
    else:
        save_model(accelerator, models.policy, models.tokenizer, sr.dir / "model")
    if trainer.ema is not None and accelerator.is_main_process:
        export_policy(trainer.ema.model, models.tokenizer, sr.dir / "model_ema")
    accelerator.wait_for_everyone()
