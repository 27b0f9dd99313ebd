"""PPO against TRL 1.12's `PPOTrainer` from the same initial weights, judged by the world.

  python -m stages.ppo.trl_baseline export DIR [key=value ...]   write TRL's starting point, print both commands
  python -m stages.ppo.trl_baseline judge POLICY_DIR [key=value ...]   judge a trained policy on the test split

The throughput comparison (`make bench-ppo`, docs/stages.md) starts the two programs from
different random models, so it says nothing about what each learns. This one does: `export`
writes the policy, reward model, critic initialisation (the reward model, the convention both
programs share) and the rollout prompts as the chat-template token ids our rollouts feed the
policy, in the layout TRL 1.12's baseline script reads (`--policy-path --reward-path
--value-path --prompts-path`), and prints our `ppo` stage's command and the baseline's with the
same knobs (batch, epochs, minibatches, learning rate and schedule, β, clip ranges, value
coefficient, γ, λ, τ, response budget, stop token, missing-stop penalty). `judge` runs the ppo
stage's own test evaluation (greedy vs greedy and τ vs τ against the SFT policy, same prompts and
budget, the world's gold labeler) on any saved policy, so both programs' final policies are
measured by one judge.

Knobs only our PPO has are set to what TRL does: no gradient clipping, no reward clipping,
AdamW's default betas and eps. What stays different is implementation: TRL takes old log-probs
from the sampler's scores and adds the score one position past the last token; ours
teacher-forces the old log-probs and adds the score at the last token (docs/ppo.md §18, §21).
A reward model with a likelihood term is refused: TRL would read its classifier alone, a
different reward.
"""
from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.runtime import configure_threads, make_accelerator, quiet_libraries, resolve_precision, seed_everything
from pipeline.tokenizer import end_of_turn_id
from pipeline.world import World
from stages.ppo.config import PPOConfig
from stages.ppo.data import load_prompts
from stages.ppo.rollout import encode_prompts

# our knobs that TRL 1.12's PPO does not have, set to what it does
MATCH_TRL = ["optim.max_grad_norm=1e9", "objective.reward_clip=1e9", "optim.betas=[0.9,0.999]", "optim.eps=1e-8",
             "optim.weight_decay=0.0"]


def trl_flags(cfg: PPOConfig, init_dir: Path, tokenizer) -> list[str]:
    """The baseline script's flags for the same run as `cfg` from `init_dir` (see `export`)."""
    o, obj, r = cfg.optim, cfg.objective, cfg.rollout
    problems = []
    if o.policy_lr != o.critic_lr:
        problems.append(f"optim.policy_lr={o.policy_lr:g} and optim.critic_lr={o.critic_lr:g}: TRL trains both with "
                        "one learning rate; set them equal")
    if obj.adaptive_kl:
        problems.append("objective.adaptive_kl=true: TRL's β is fixed; set it to false")
    if obj.kl_estimator not in ("k1", "k3"):
        problems.append(f"objective.kl_estimator={obj.kl_estimator}: TRL has k1 and k3")
    if obj.entropy_coef or cfg.ptx.coef:
        problems.append("objective.entropy_coef and ptx.coef must be 0: TRL's PPO has neither")
    if cfg.batch.size != cfg.batch.micro:
        problems.append("batch.micro must equal batch.size (one backward per minibatch, as TRL)")
    if end_of_turn_id(tokenizer) != tokenizer.eos_token_id:
        problems.append("the chat template ends a turn with a token other than eos_token, which TRL's --stop-token "
                        "eos stops at")
    if problems:
        raise ConfigError([f"TRL 1.12 cannot run with the same knobs: {p}" for p in problems])
    return ["--policy-path", str(init_dir / "policy"), "--reward-path", str(init_dir / "reward"),
            "--value-path", str(init_dir / "value"), "--prompts-path", str(init_dir / "prompts.jsonl"),
            "--batch-size", str(cfg.batch.rollout), "--mini-batches", str(cfg.batch.rollout // cfg.batch.size),
            "--ppo-epochs", str(cfg.epochs), "--total-episodes", str(cfg.steps * cfg.batch.rollout),
            "--response-length", str(r.max_new_tokens), "--temperature", f"{r.temperature:g}",
            "--lr", f"{o.policy_lr:g}", "--lr-scheduler", o.schedule, "--kl-coef", f"{obj.kl_coef:g}",
            "--kl-estimator", obj.kl_estimator, "--cliprange", f"{obj.clip_eps:g}",
            "--cliprange-value", f"{obj.value_clip_eps:g}", "--vf-coef", f"{obj.vf_coef:g}", "--gamma", f"{obj.gamma:g}",
            "--lam", f"{obj.lam:g}", "--stop-token", "eos", "--missing-eos-penalty", f"{obj.missing_stop_penalty:g}",
            *(["--whiten-rewards"] if obj.whiten_rewards else []), "--seed", str(cfg.seed),
            "--save-final", str(init_dir / "trl_final")]


def export(cfg: PPOConfig, out: Path) -> list[str]:
    """Write `out/{policy,reward,value}` (plain copies), `out/prompts.jsonl` (one
    {"input_ids": [...]} per rollout prompt, the chat-template ids) and `out/prompts.eval.jsonl`
    (the valid prompts, for the baseline's own before/after check); return the baseline's flags."""
    from stages.policy_eval import eval_prompts
    from stages.ppo.models import resolve_sources
    from pipeline.models import load_tokenizer

    sources = resolve_sources(cfg)
    config = json.loads((Path(sources.reward_dir) / "config.json").read_text())
    if config.get("reward_likelihood"):
        raise ConfigError([f"reward.name_or_path: {sources.reward_dir} scores with a likelihood term (docs/ppo.md §13), "
                           "which TRL's PPO would not add: compare with a plain classifier (an rm stage run with "
                           "likelihood_term=false)"])
    tokenizer = load_tokenizer(sources.policy_dir)
    flags = trl_flags(cfg, out, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    for name, src in (("policy", sources.policy_dir), ("reward", sources.reward_dir), ("value", sources.reward_dir)):
        shutil.copytree(src, out / name, dirs_exist_ok=True)
    world = World(cfg.world)
    for name, prompts in (("prompts.jsonl", load_prompts(cfg, world)), ("prompts.eval.jsonl", eval_prompts(world))):
        (out / name).write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in encode_prompts(tokenizer, prompts)))
    return flags


def judge(cfg: PPOConfig, policy_dir: str) -> dict:
    """The ppo stage's test evaluation of the policy in `policy_dir` against the run's SFT policy."""
    from pipeline.distributed import trained_numerics
    from pipeline.models import disable_dropout, load_causal_lm
    from stages.policy_eval import test_evaluation
    from stages.ppo.models import load_models, resolve_sources
    from stages.ppo.runner import eval_settings, print_evaluation

    configure_threads(cfg.threads)
    accelerator = make_accelerator(mixed_precision=resolve_precision(cfg.precision))
    seed_everything(cfg.seed)
    models = load_models(cfg, resolve_sources(cfg), accelerator.device, trained_numerics(accelerator))
    policy = disable_dropout(load_causal_lm(policy_dir, models.tokenizer, attn=cfg.attention())).to(accelerator.device)
    _, evaluation, _ = test_evaluation(policy.eval(), models, World(cfg.world), eval_settings(cfg), accelerator)
    print(f"{policy_dir} against the SFT policy {resolve_sources(cfg).policy_dir}:")
    print_evaluation(evaluation)
    return evaluation


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in ("export", "judge"):
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    command, where, overrides = argv[0], Path(argv[1]), argv[2:]
    quiet_libraries()
    try:
        cfg = load_config(PPOConfig, overrides + ["wandb.mode=disabled"])
        if command == "export":
            flags = export(cfg, where)
            ours = ["python", "-m", "stages.ppo", *overrides, *MATCH_TRL, "eval.best_of=[]"]
            print(f"wrote {where}/{{policy,reward,value,prompts.jsonl,prompts.eval.jsonl}}\n\nours:\n  {shlex.join(ours)}\n"
                  f"\nTRL 1.12 (its own environment, trl112_ppo_bench.py):\n  python trl112_ppo_bench.py {shlex.join(flags)}"
                  f"\n\nthen judge its final policy:\n  python -m stages.ppo.trl_baseline judge {where / 'trl_final'} "
                  f"{shlex.join(overrides)}")
        else:
            cfg.eval.best_of = []
            judge(cfg, str(where))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)  # the last thing the user sees
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
