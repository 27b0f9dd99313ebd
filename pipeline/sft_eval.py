"""Held-out evaluation of a chat policy on the built-in world, by greedy generation.

The protocol: the `test` prompt split (disjoint from `valid`, where choices are made, and from
every training prompt), greedy decoding, `eval.max_new_tokens` new tokens (enough for the longest
chatty demonstration, so a policy that imitates one can finish it). Every rate carries its 95%
interval (`pipeline.stats.rate`): a split of ~200 prompts measures a rate to within several points.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.evaluation import gather, generate, shard
from pipeline.stats import policy_summary, rate
from pipeline.tokenizer import chat_ids
from pipeline.world import KNOWN_UNKNOWN_SKILLS, abstains

SPLIT = "test"  # reported figures only; `valid` is for choices (a checkpoint, a setting)


@dataclass
class EvalRow:
    """One held-out prompt, its greedy response and the world's judgement of it."""

    skill: str
    prompt: str
    response: str
    correct: bool
    finished: bool  # the end-of-turn token was produced within max_new_tokens
    formatted: bool  # `Answer: x.` and finished
    gold_score: float


def chat_prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of `<s><|user|>prompt<|assistant|>` for each prompt (the generation prompt)."""
    return [chat_ids(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]


def evaluate_world(model, tokenizer, world, max_new_tokens: int, batch_size: int,
                   accelerator=None) -> tuple[dict, dict, list[EvalRow]]:
    """Greedy responses to the `test` prompts, judged: (flat metrics, the `evaluation` table of
    `summarise`, one `EvalRow` per prompt). The `fact` skill asks about held-out people, so its
    accuracy measures knowledge carried over from pretraining."""
    records = shard(world.prompts(SPLIT), accelerator)
    ids = chat_prompt_ids(tokenizer, [r["prompt"] for r in records])
    outs = generate(model, tokenizer, ids, max_new_tokens, temperature=0.0, batch_size=batch_size) if ids else []
    rows = []
    for r, (resp, finished) in zip(records, outs):
        text = tokenizer.decode(resp, skip_special_tokens=True)
        rows.append(EvalRow(r["skill"], r["prompt"], text, world.is_correct(r["prompt"], text), finished,
                            world.extract(text) is not None and finished, world.gold_score(r["prompt"], text, finished)))
    rows = gather(rows, accelerator)
    metrics, evaluation = summarise(rows, max_new_tokens)
    return metrics, evaluation, rows


def summarise(rows: list[EvalRow], max_new_tokens: int, split: str = SPLIT) -> tuple[dict, dict]:
    """Flat metrics for the tracker (`eval/accuracy`, its `_low`/`_high` interval, `eval/acc_<skill>`,
    `eval/finish_<skill>`, format, end-of-turn and gold-score means) and the manifest's table:
    {"split", "decoding", "max_new_tokens", "prompts", "overall": {"accuracy", "finish", "format":
    rate, "gold_score": mean}, "skills": {skill: {"accuracy", "finish": rate, "n"}}}."""
    summary = policy_summary([r.correct for r in rows], [r.finished for r in rows], [r.gold_score for r in rows],
                             [r.skill for r in rows], [float(abstains(r.response)) for r in rows])
    overall = {"accuracy": summary["accuracy"], "finish": summary["finish"], "format": rate([r.formatted for r in rows]),
               "gold_score": summary["gold_score"], "abstain": summary["abstain"],
               "hallucination": summary["hallucination"]}
    skills = {skill: v | {"n": v["accuracy"]["n"]} for skill, v in summary["skills"].items()}
    metrics = {"eval/accuracy": overall["accuracy"]["value"], "eval/accuracy_low": overall["accuracy"]["low"],
               "eval/accuracy_high": overall["accuracy"]["high"]}
    for skill, s in skills.items():
        metrics[f"eval/acc_{skill}"] = s["accuracy"]["value"]
        metrics[f"eval/finish_{skill}"] = s["finish"]["value"]
    metrics["eval/fact_accuracy"] = metrics.get("eval/acc_fact", 0.0)
    metrics["eval/format_rate"] = overall["format"]["value"]
    metrics["eval/eos_rate"] = overall["finish"]["value"]
    metrics["eval/gold_score"] = overall["gold_score"]
    metrics["eval/abstain_rate"] = overall["abstain"]["value"]
    metrics["eval/hallucination_rate"] = overall["hallucination"]["value"]
    evaluation = {"split": split, "decoding": "greedy", "max_new_tokens": max_new_tokens, "prompts": len(rows),
                  "overall": overall, "skills": skills}
    return metrics, evaluation


def knowledge_split(rows: list[EvalRow], parent_knows: dict[str, bool]) -> tuple[dict, dict]:
    """Hallucinations split by what pretraining stored (`evaluation.parent_knowledge`): over the
    fact and sum prompts, the share whose corpus sentence the parent completes (`parent_knows`),
    and the share answered wrongly where it does (`hallucination_known`: stored, not extracted by
    the question) and where it does not (`hallucination_unknown`: not known at all)."""
    asked = [r for r in rows if r.skill in KNOWN_UNKNOWN_SKILLS and r.prompt in parent_knows]
    wrong = [not r.correct and not abstains(r.response) for r in asked]
    known = [parent_knows[r.prompt] for r in asked]
    table = {"parent_knows": rate(known), "hallucination_known": rate([w and k for w, k in zip(wrong, known)]),
             "hallucination_unknown": rate([w and not k for w, k in zip(wrong, known)])}
    return {f"eval/{k}_rate": v["value"] for k, v in table.items()}, table
