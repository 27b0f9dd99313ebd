"""Held-out evaluation of a chat policy on the built-in world, by greedy generation."""
from __future__ import annotations

from collections import defaultdict

from pipeline.evaluation import gather, generate, shard
from pipeline.tokenizer import chat_ids
from pipeline.world import SKILLS


def chat_prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of `<s><|user|>prompt<|assistant|>` for each prompt (the generation prompt)."""
    return [chat_ids(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]


def evaluate_world(model, tokenizer, world, eval_cfg, accelerator=None):
    """Accuracy per skill, format rate (taught `Answer: x.` format ending with the template's
    end-of-turn token, where `generate` stops), accuracy on pretraining-only facts (the `fact`
    skill asks about held-out people), and the gold score."""
    records = shard(world.prompts("test"), accelerator)
    ids = chat_prompt_ids(tokenizer, [r["prompt"] for r in records])
    outs = generate(model, tokenizer, ids, eval_cfg.max_new_tokens, temperature=0.0, batch_size=eval_cfg.batch_size) if ids else []
    rows = []
    for r, (resp, finished) in zip(records, outs):
        text = tokenizer.decode(resp, skip_special_tokens=True)
        rows.append([r["skill"], r["prompt"], text, world.is_correct(r["prompt"], text), finished,
                     world.extract(text) is not None and finished, world.gold_score(r["prompt"], text, finished)])
    rows = gather(rows, accelerator)
    by_skill = defaultdict(list)
    for row in rows:
        by_skill[row[0]].append(row[3])
    metrics = {f"eval/acc_{s}": sum(v) / len(v) for s in SKILLS if (v := by_skill.get(s))}
    metrics["eval/accuracy"] = sum(r[3] for r in rows) / max(1, len(rows))
    metrics["eval/fact_accuracy"] = metrics.get("eval/acc_fact", 0.0)
    metrics["eval/format_rate"] = sum(r[5] for r in rows) / max(1, len(rows))
    metrics["eval/eos_rate"] = sum(r[4] for r in rows) / max(1, len(rows))
    metrics["eval/gold_score"] = sum(r[6] for r in rows) / max(1, len(rows))
    return metrics, [r[:4] for r in rows]
