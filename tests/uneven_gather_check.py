"""Every evaluation that deals items over processes and gathers them back, on counts that the
process count does not divide: the fact cloze, the SFT stage's greedy test evaluation, the rm
stage's K samples per prompt and its scoring, and PPO's test evaluation (greedy, sampled, best-of-n).
Samples are keyed by row (`pipeline.evaluation.KeyedSampling`), so any number of processes must
give one process's results. tests/test_gather.py compares one process with two:
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        tests/uneven_gather_check.py POLICY_DIR REWARD_DIR OUT.json
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORLD = ["world.num_people=20", "world.corpus_docs=600", "world.sft_examples=300", "world.eval_examples=3",
         "world.strangers=4"]  # the honesty axis: the threshold baseline and the self-knowledge probe gather too


def compute(policy_dir: str, reward_dir: str, accelerator) -> dict:
    from pipeline.config import load_config
    from pipeline.evaluation import fact_cloze_accuracy
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.sft_eval import evaluate_world
    from pipeline.world import World
    from reward_model.comparisons import sample_responses
    from reward_model.scoring import score_ids
    from stages.ppo.config import PPOConfig
    from stages.policy_eval import test_evaluation
    from stages.ppo.runner import eval_settings
    from stages.ppo.models import load_models, resolve_sources

    cfg = load_config(PPOConfig, [f"policy.name_or_path={policy_dir}", f"reward.name_or_path={reward_dir}", *WORLD,
                                  "eval.num_prompts=5", "eval.max_new_tokens=6", "eval.best_of=[2,3]",
                                  "batch.forward=2"])
    world = World(cfg.world)
    tok = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir, tok).eval()
    out: dict = {"world": accelerator.num_processes}
    out["cloze"] = fact_cloze_accuracy(policy, tok, world.fact_cloze()[:5], accelerator)[1]
    out["sft_eval"] = [dataclasses.astuple(r) for r in evaluate_world(policy, tok, world, 6, 2, accelerator)[2]]
    prompts = [r["prompt"] for r in world.prompts("rm", 5)]
    comps = sample_responses(policy, tok, prompts, k=2, max_new_tokens=6, temperature=1.0, seed=3,
                             accelerator=accelerator, batch_size=4)
    out["comparisons"] = [[c.responses, c.finished] for c in comps]
    models = load_models(cfg, resolve_sources(cfg), accelerator.device)
    seqs = [tok(p)["input_ids"] for p in prompts]
    out["scores"] = score_ids(models.reward, seqs, tok.pad_token_id, 2, accelerator)[0].tolist()
    metrics, result, rows = test_evaluation(models.policy, models, world, eval_settings(cfg), accelerator)
    out["ppo_test"] = {"metrics": metrics, "result": result, "rows": rows}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    from pipeline.runtime import make_accelerator

    acc = make_accelerator()
    result = compute(sys.argv[1], sys.argv[2], acc)
    if acc.is_main_process:
        Path(sys.argv[3]).write_text(json.dumps(result))
    acc.wait_for_everyone()
