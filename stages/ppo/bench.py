"""Throughput of PPO iterations against the floor: `python -m stages.ppo.bench [options] [key=value ...]`.

Runs N iterations of a fixed configuration (configs/ppo.yaml + overrides) after one warm-up
iteration and prints episodes/s, generated tokens/s, the time split (generate / score / update)
and peak memory. After each of our iterations it runs the same work as bare torch on the same
batch (`floor_*` below) and prints, per phase, ours, the floor and floor time / our time:

  generate  `model.generate` (KV cache, pure sampling, no stop token) on the same left-padded
            queries for exactly as many new tokens as our rollout generated (its width T)
  score     no-grad forwards of policy, reference and critic on the same [B, P+T] tensors, in
            the same batch.forward chunks, and of the reward model on what it reads: the
            responses rendered in its own tokenizer and template (docs/ppo.md §32). Random bench
            models write token strings that re-encode into more tokens than were sampled (~1.4x
            at the tiny preset), so a reward forward on the sampled ids would not be the same work;
            a trained policy's text re-encodes to its own length
  update    the same epochs x minibatches x micro-batches: forward policy and critic, a plain
            ratio x advantage loss and squared value error, one backward, AdamW step of each,
            on copies of the models (so the floor never changes our run)
  total     episodes/s of a whole iteration vs the sum of the three floors

It also prints the update's model FLOP/s (`update_flops`) and, on GPUs whose bf16 peak it knows,
the model FLOPs utilisation (MFU) of the update.

Without `policy.name_or_path` / `reward.name_or_path` it builds random models on the fly, of size
`--preset` or of the shape given with the TRL-baseline knobs (--hidden-size ...), so it needs no
earlier stage. Writes nothing under runs/.
"""
from __future__ import annotations

import argparse
import copy
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.distributed import trained_numerics
from pipeline.runtime import (adamw, batch_indices, configure_threads, make_accelerator, quiet_libraries, resolve_precision,
                              seed_everything)
from pipeline.world import World
from reward_model.likelihood import term_of
from reward_model.scoring import render, right_pad
from stages.ppo.config import PPOConfig
from stages.ppo.data import load_prompts
from stages.ppo.loop import iteration_step, make_trainer
from stages.ppo.models import load_models, resolve_sources
from stages.ppo.rollout import encode_prompts, sequence_inputs


def random_models(root: Path, world: World, preset: str, shape: dict | None = None,
                  vocab_size: int = 2048) -> tuple[str, str]:
    """A tokenizer trained on part of the world corpus, a random Llama of `preset` (or of `shape`:
    hidden_size, num_hidden_layers, ... overriding it), and a random-head reward model from it:
    (policy dir, reward dir)."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.models import PRESETS, llama_from_preset
    from pipeline.tokenizer import train_tokenizer

    tok = train_tokenizer(world.corpus()[:2000], vocab_size=vocab_size)
    policy, reward = root / "policy", root / "reward"
    saved = dict(PRESETS[preset])
    try:
        PRESETS[preset].update(shape or {})
        model = llama_from_preset(preset, tok, max_position_embeddings=512)
    finally:
        PRESETS[preset].clear()
        PRESETS[preset].update(saved)
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    rm = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(reward)
    tok.save_pretrained(reward)
    return str(policy), str(reward)


def fixed_length_prompts(tokenizer, prompts: list[str], length: int) -> list[str]:
    """Prompt texts whose chat-template query is about `length` tokens (TRL's --prompt-len): the
    prompt's tokens repeated or cut to fit, decoded back to text."""
    overhead = len(encode_prompts(tokenizer, [""])[0])
    keep = max(1, length - overhead)
    out = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id or 0]
        ids = (ids * (keep // len(ids) + 1))[:keep]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# Dense bf16 tensor-core peaks from the vendors' data sheets, for MFU on the GPUs the project meets
# (first match in the device name wins).
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))


def peak_flops(device) -> float | None:
    """The device's dense bf16 peak FLOP/s where known (CUDA GPUs in PEAK_BF16_FLOPS), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def update_flops(policy, critic, batch: int, prompt_len: int, response_len: int, epochs: int) -> float:
    """Model FLOPs of a PPO update (PaLM, Chowdhery et al. 2022, app. B): forward + backward costs
    6 FLOPs per parameter per token, plus 12·L·d·S per token for attention over S positions. Every
    position of the [batch, S = prompt + response] sequences counts (padding is computed too); the
    policy's LM head only on the response_len + 1 positions it runs on; input embeddings (a lookup)
    not at all. Full fine-tuning (a frozen LoRA base costs less backward). `critic`: the
    sequence-classification model inside the value model."""
    S = prompt_len + response_len
    flops = 0.0
    for model, head in ((policy, policy.get_output_embeddings()), (critic, None)):
        embed = model.get_input_embeddings().weight
        body = sum(p.numel() for p in model.parameters() if p is not embed)  # tied weights appear once
        head_params = head.weight.numel() if head is not None else 0
        if head is not None and head.weight is not embed:
            body -= head_params
        cfg = model.config
        flops += 6 * batch * (S * body + (response_len + 1) * head_params)
        flops += 12 * cfg.num_hidden_layers * cfg.hidden_size * S * S * batch
    return epochs * flops


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the floor: bare torch
@torch.no_grad()
def floor_generate(policy, query_ids, query_mask, temperature: float, new_tokens: int, pad_id: int) -> torch.Tensor:
    """`generate` with the KV cache, pure temperature sampling, exactly `new_tokens` per row."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=pad_id, use_cache=True)
    policy.eval()
    saved, policy.generation_config = policy.generation_config, GenerationConfig()
    try:
        return policy.generate(input_ids=query_ids, attention_mask=query_mask.long(), generation_config=config)
    finally:
        policy.generation_config = saved


def reward_inputs(models, r) -> list[list[int]]:
    """The reward model's input for each episode: prompt and response rendered in the RM's own
    tokenizer and template, as `reward_model.scoring.score` renders them."""
    return [render(models.reward_tokenizer, p, t, f) for p, t, f in zip(r.prompts, r.texts, r.has_stop.tolist())]


@torch.no_grad()
def floor_score(models, r, batch_size: int, reward_seqs: list[list[int]]) -> None:
    """No-grad forwards of policy, reference and critic on the rollout's tensors, and of the reward
    model on `reward_seqs` (`reward_inputs`), right-padded."""
    ref = models.ref if models.ref is not None else models.policy
    device = r.query_ids.device
    for i in range(0, len(r), batch_size):
        ids, mask, pos = sequence_inputs(r.query_ids[i: i + batch_size], r.query_mask[i: i + batch_size],
                                         r.response_ids[i: i + batch_size], r.response_mask[i: i + batch_size])
        models.policy(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        models.value_model(ids, mask, pos)
        rm_ids, rm_mask = right_pad(reward_seqs[i: i + batch_size], models.reward_tokenizer.pad_token_id, device)
        models.reward(input_ids=rm_ids, attention_mask=rm_mask)
        if (term := term_of(models.reward)) is not None:  # the RM's likelihood term: one more forward
            term.model(input_ids=rm_ids, attention_mask=rm_mask, use_cache=False)


def floor_update(policy, value_model, opt_policy, opt_critic, r, cfg, temperature: float) -> None:
    """cfg.epochs x minibatches x micro-batches of forward, backward and one AdamW step per model."""
    P = r.query_ids.shape[1]
    policy.train()
    value_model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(r))
        for k in range(0, len(r), cfg.batch.size):
            mb = perm[k: k + cfg.batch.size]
            n = r.response_mask[mb].sum().clamp(min=1)
            for j in range(0, len(mb), cfg.batch.micro):
                idx = mb[j: j + cfg.batch.micro]
                ids, mask, pos = sequence_inputs(r.query_ids[idx], r.query_mask[idx], r.response_ids[idx],
                                                 r.response_mask[idx])
                m = r.response_mask[idx]
                logits = policy(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
                logp = (logits[:, P - 1: -1] / temperature).log_softmax(-1)
                logp = logp.gather(-1, r.response_ids[idx].unsqueeze(-1)).squeeze(-1)
                values = value_model(ids, mask, pos)[:, P - 1: -1]
                pg = -((logp - r.logprobs[idx]).exp() * r.advantages[idx] * m).sum() / n
                vf = ((values - r.returns[idx]) ** 2 * m).sum() / n
                (pg + vf).backward()
            for opt in (opt_policy, opt_critic):
                opt.step()
                opt.zero_grad(set_to_none=True)


def bench(cfg: PPOConfig, iterations: int = 5, warmup: int = 1, prompt_len: int | None = None,
          floor: bool = True, verbose: bool = True) -> dict:
    """Time `iterations` PPO iterations (after `warmup`) and, with `floor`, the bare-torch floor
    of each phase on the same batches; returns the figures it prints."""
    threads = configure_threads(cfg.threads)
    accelerator = make_accelerator(mixed_precision=resolve_precision(cfg.precision))
    device = accelerator.device
    seed_everything(cfg.seed)
    world = World(cfg.world)
    models = load_models(cfg, resolve_sources(cfg), device, trained_numerics(accelerator))
    trainer = make_trainer(cfg, models, accelerator)
    prompts = load_prompts(cfg, world)
    if prompt_len:
        prompts = fixed_length_prompts(models.tokenizer, prompts, prompt_len)
    if floor:  # copies, so the floor's optimizer steps never touch our run
        f_policy = copy.deepcopy(trainer.policy)
        f_value = copy.deepcopy(accelerator.unwrap_model(models.value_model))
        o = cfg.optim
        f_opts = [adamw([p for p in m.parameters() if p.requires_grad], lr=lr, betas=tuple(o.betas), eps=o.eps)
                  for m, lr in ((f_policy, o.policy_lr), (f_value, o.critic_lr))]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    keys = ("generate", "score", "update")
    ours = dict.fromkeys(keys, 0.0)
    bare = dict.fromkeys(keys, 0.0)
    tokens, wall, query_len, flops, warm = 0.0, 0.0, 0.0, 0.0, 0.0
    for it in range(warmup + iterations):
        idx = batch_indices(it, len(prompts), cfg.batch.rollout, cfg.seed)
        mine = [prompts[i] for i in idx][accelerator.process_index:: accelerator.num_processes]
        _sync(device)
        t0 = time.perf_counter()
        metrics, rollout = iteration_step(trainer, it, mine)
        _sync(device)
        t1 = time.perf_counter()
        f = {}
        if floor:
            T = rollout.response_ids.shape[1]
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                f["generate"] = _timed(device, floor_generate, f_policy, rollout.query_ids, rollout.query_mask,
                                       cfg.rollout.temperature, T, models.tokenizer.pad_token_id)
                f["score"] = _timed(device, floor_score, models, rollout, cfg.batch.forward,
                                    reward_inputs(models, rollout))
                f["update"] = _timed(device, floor_update, f_policy, f_value, *f_opts, rollout, cfg,
                                     cfg.rollout.temperature)
        if it < warmup:
            warm += t1 - t0
            continue
        wall += t1 - t0
        tokens += metrics["rollout/generated_tokens"]
        query_len += rollout.query_ids.shape[1]
        flops += update_flops(trainer.policy, accelerator.unwrap_model(models.value_model).critic, len(rollout),
                              rollout.query_ids.shape[1], rollout.response_ids.shape[1], cfg.epochs)
        for k in keys:
            ours[k] += metrics[f"perf/time_{k}"]
            bare[k] += f.get(k, float("nan"))
    n = iterations
    out = {"iterations": n, "episodes_per_s": n * cfg.batch.rollout / wall,
           "generated_tokens_per_s": tokens / max(ours["generate"], 1e-9), "s_per_iteration": wall / n,
           **{f"time_{k}_s": ours[k] / n for k in keys}, **{f"floor_{k}_s": bare[k] / n for k in keys},
           **{f"ratio_{k}": bare[k] / ours[k] for k in keys},
           "floor_episodes_per_s": n * cfg.batch.rollout / sum(bare.values()),
           "query_tokens": query_len / n, "peak_memory_mb": peak_memory_mb(device), "device": str(device),
           "processes": accelerator.num_processes, "threads": threads,
           "update_flops_per_s": flops / max(ours["update"], 1e-9), "warmup_s": warm}
    peak = peak_flops(device)
    out["update_mfu"] = out["update_flops_per_s"] / peak if peak else float("nan")
    out["ratio_total"] = out["episodes_per_s"] / out["floor_episodes_per_s"]
    if verbose and accelerator.is_main_process:
        print(f"ppo bench: {n} iterations x {cfg.batch.rollout} episodes, {cfg.epochs} epochs x "
              f"{cfg.batch.rollout // cfg.batch.size} minibatches of {cfg.batch.size} (micro "
              f"{cfg.batch.micro}), query {out['query_tokens']:.0f} tokens, max_new_tokens "
              f"{cfg.rollout.max_new_tokens} | {out['device']} x {out['processes']} proc, {threads} threads")
        print(f"  episodes/s          {out['episodes_per_s']:.1f}   ({out['s_per_iteration']:.2f} s/iteration; "
              f"{warmup} warm-up iteration(s) before: {warm:.1f} s{', compilation included' if cfg.compile else ''})")
        print(f"  generated tokens/s  {out['generated_tokens_per_s']:.0f}   (while generating)")
        kind = "GPU allocated" if out["device"].startswith("cuda") else "max RSS"
        print(f"  peak memory         {out['peak_memory_mb']:.0f} MiB ({kind})")
        mfu = (f"MFU {100 * out['update_mfu']:.1f}% of the device's bf16 peak" if peak else
               "MFU: peak of this device unknown")
        print(f"  update FLOP/s       {out['update_flops_per_s'] / 1e12:.3f} TFLOP/s per process (model FLOPs, "
              f"PaLM app. B); {mfu}")
        if floor:
            print(f"\n  {'phase':<10} {'ours':>12} {'floor':>12} {'ratio':>7}   (s per iteration; ratio = floor / ours)")
            for k in keys:
                print(f"  {k:<10} {out[f'time_{k}_s']:>11.3f}s {out[f'floor_{k}_s']:>11.3f}s {out[f'ratio_{k}']:>7.2f}")
            print(f"  {'total':<10} {out['episodes_per_s']:>8.1f} ep/s {out['floor_episodes_per_s']:>7.1f} ep/s "
                  f"{out['ratio_total']:>7.2f}")
    return out


def _timed(device, fn, *args) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn(*args)
    _sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ppo.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--preset", default="tiny", help="size of the random models when no paths are given")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare-torch floor")
    g = parser.add_argument_group("the knobs of the TRL 1.12 PPO baseline, trl112_ppo_bench.py (default: configs/ppo.yaml "
                                  "and the preset)")
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-layers", type=int)
    g.add_argument("--num-heads", type=int)
    g.add_argument("--num-kv-heads", type=int, help="default: = num-heads")
    g.add_argument("--intermediate-size", type=int, help="default: 4 x hidden-size when --hidden-size is given")
    g.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary of the random models")
    g.add_argument("--prompt-len", type=int, help="query length in tokens, chat template included")
    g.add_argument("--response-length", type=int, help="= rollout.max_new_tokens")
    g.add_argument("--batch-size", type=int, help="= batch.rollout (episodes per iteration)")
    g.add_argument("--mini-batches", type=int, help="optimizer steps per epoch; micro-batch = minibatch")
    g.add_argument("--ppo-epochs", type=int, help="= epochs")
    g.add_argument("--threads", type=int, help="= threads")
    g.add_argument("--seed", type=int)
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = list(overrides)
    batch = args.batch_size or load_config(PPOConfig, overrides + ["wandb.mode=disabled"]).batch.rollout
    for key, value in (("batch.rollout", args.batch_size), ("epochs", args.ppo_epochs),
                       ("rollout.max_new_tokens", args.response_length), ("threads", args.threads),
                       ("seed", args.seed)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.mini_batches:
        overrides += [f"batch.size={batch // args.mini_batches}", f"batch.micro={batch // args.mini_batches}"]
    cfg = load_config(PPOConfig, overrides + ["wandb.mode=disabled"])
    shape = {k: v for k, v in (("hidden_size", args.hidden_size), ("num_hidden_layers", args.num_layers),
                               ("num_attention_heads", args.num_heads),
                               ("num_key_value_heads", args.num_kv_heads or args.num_heads),
                               ("intermediate_size", args.intermediate_size or
                                (4 * args.hidden_size if args.hidden_size else None))) if v}
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        if not (cfg.policy.name_or_path and cfg.reward.name_or_path):
            policy, reward = random_models(Path(tmp), World(cfg.world), args.preset, shape, args.vocab_size)
            cfg.policy.name_or_path = cfg.policy.name_or_path or policy
            cfg.reward.name_or_path = cfg.reward.name_or_path or reward
        out = bench(cfg, args.iterations, args.warmup, args.prompt_len, floor=not args.no_floor)
    return 0 if all(math.isfinite(v) for k, v in out.items() if k.startswith("ratio_")) or args.no_floor else 1


if __name__ == "__main__":
    sys.exit(main())
