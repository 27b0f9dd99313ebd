"""Evaluation of a trained policy against its reference (the SFT policy) on held-out prompts of
the built-in world, judged by its gold labeler: what every policy-training stage (ppo, dpo)
reports, the same way (docs/ppo.md §34, §38).

The gold labeler, not a learned reward model, judges: a rising RM score with a flat or falling
gold win rate is reward over-optimization. The protocol (docs/ppo.md §38):

- during training, every `eval.every` steps, the policy is sampled at τ on the `valid` prompts:
  the curves (gold, RM score, KL) and every choice of settings;
- at the end, on the disjoint `test` prompts, the policy and SFT with the same decoding and budget:
  greedy vs greedy (the headline) and τ vs τ, then the baselines to beat: SFT plus the
  post-processing rule (cut after the answer) and best-of-n of SFT samples ranked by the reward
  model (Gao et al. 2022), its KL estimated from the samples.

Each comparison's SFT responses are generated once with the same settings; a tie counts half.
Sampled responses draw from named random streams (`pipeline.evaluation.KeyedSampling`): the SFT
opponent, the policy, the rule's SFT draw and the best-of-n candidates each from their own, so no side shares the
other's draws, and a prompt's draws are the same on any number of processes. Evaluation never
touches the training random state.

What it needs: the `eval` section (`PolicyEvalConfig`) with a batch size and the temperature the
KL is measured at (`EvalSettings`), and models with `tokenizer`, `ref` (None: the `policy`'s
LoRA adapter disabled), `reward` and `reward_tokenizer` (`reward` None: no RM score, no best-of-n).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.config import PolicyEvalConfig
from pipeline.distributed import is_sharded
from pipeline.evaluation import gather, generate, shard_even
from pipeline.logprobs import sequence_kl_tokens
from pipeline.stats import paired_bootstrap, policy_summary, rate
from pipeline.tokenizer import end_of_turn_id
from stages.ppo.functional import masked_sum
from stages.ppo.rollout import (
    encode_prompts,
    queries,
    reference_context,
    reference_model,
    score_responses,
    sequence_inputs,
)


@dataclass(frozen=True)
class EvalSettings:
    """What the evaluation reads: the `eval` section's values (`pipeline.config.PolicyEvalConfig`), the batch size of its no-grad
    forwards and the temperature at which the policy's KL from the reference is measured (the
    temperature the policy trains at)."""

    seed: int
    max_new_tokens: int
    temperature: float
    best_of: tuple[int, ...]
    num_prompts: int
    batch_size: int
    kl_temperature: float

    @classmethod
    def of(cls, section: PolicyEvalConfig, batch_size: int, kl_temperature: float) -> "EvalSettings":
        return cls(section.seed, section.max_new_tokens, section.temperature, tuple(section.best_of),
                   section.num_prompts, batch_size, kl_temperature)


def eval_prompts(world, n: int = 0, split: str = "valid") -> list[str]:
    """world.prompts(split), or `n` of them taken evenly across the list (all skills stay in)."""
    prompts = [r["prompt"] for r in world.prompts(split)]
    if n <= 0 or n >= len(prompts):
        return prompts
    return [prompts[int(i * len(prompts) / n)] for i in range(n)]


@dataclass
class EvalSet:
    """This process's share of one split's prompts and the SFT policy's responses to them under
    one decoding (temperature 0 = greedy). Every process holds as many prompts (`shard_even`):
    the first `n_real` are its own, the rest repeat one so that models sharded over the processes
    run the same forwards everywhere; only the real ones are judged."""

    split: str
    temperature: float
    rows: list[int]        # each prompt's place in the split's evaluation prompts (its random stream row)
    prompts: list[str]
    sft_texts: list[str]
    sft_finished: list[bool]
    sft_gold: list[float]
    n_real: int = -1

    def __post_init__(self):
        if self.n_real < 0:
            self.n_real = len(self.prompts)


def eval_stream(ev: EvalSettings, split: str, who: str) -> str:
    """The random stream of one side of the evaluation: 'reference' (the SFT opponent), 'policy',
    'best-of-n' (the candidates)."""
    return f"{ev.seed}/eval/{split}/{who}"


@torch.no_grad()
def sample_eval(model, tokenizer, prompts: list[str], ev: EvalSettings, temperature: float, stream: str,
                rows: list[int]) -> tuple[list[str], list[bool], list[list[int]]]:
    """(texts, finished, response ids without stop) at `temperature` with the eval budget; prompt
    i draws as row `rows[i]` of `stream`."""
    out = generate(model, tokenizer, encode_prompts(tokenizer, prompts), ev.max_new_tokens,
                   temperature=temperature, batch_size=ev.batch_size, stream=stream, rows=rows,
                   lockstep=is_sharded(model))
    ids = [r for r, _ in out]
    return tokenizer.batch_decode(ids, skip_special_tokens=True), [f for _, f in out], ids


def make_eval_set(models, world, ev: EvalSettings, accelerator, split: str = "valid", temperature: float | None = None) -> EvalSet:
    """Generate the SFT policy's (the reference's) responses once on this process's share of `split`."""
    temperature = ev.temperature if temperature is None else temperature
    everything = eval_prompts(world, ev.num_prompts, split)
    rows, n_real = shard_even(list(range(len(everything))), accelerator)
    prompts = [everything[i] for i in rows]
    with reference_context(models):
        texts, finished, _ = sample_eval(reference_model(models), models.tokenizer, prompts, ev, temperature,
                                         eval_stream(ev, split, "reference"), rows)
    gold = [world.gold_score(p, t, f) for p, t, f in zip(prompts, texts, finished)]
    return EvalSet(split, temperature, rows, prompts, texts, finished, gold, n_real)


@torch.no_grad()
def sequence_kl(model, models, prompts: list[str], ids: list[list[int]], finished: list[bool], temperature: float,
                batch_size: int, device) -> list[float]:
    """Exact KL(π_τ || ref_τ) summed over each response's tokens: Σ_t Σ_v p log(p/q) along the
    sampled trajectory (non-negative, and the sequence KL in expectation over π's samples)."""
    tok, stop = models.tokenizer, end_of_turn_id(models.tokenizer)
    out = []
    for i in range(0, len(prompts), batch_size):
        q_ids, q_mask = queries(tok, prompts[i: i + batch_size], device)
        rows = [r + [stop] if f else r for r, f in zip(ids[i: i + batch_size], finished[i: i + batch_size])]
        T = max(1, max(len(r) for r in rows))
        # built on the CPU row by row, then one transfer to `device`
        r_ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long, device="cpu")
        r_mask = torch.zeros((len(rows), T), dtype=torch.bool, device="cpu")
        for j, r in enumerate(rows):
            r_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long, device="cpu")
            r_mask[j, : len(r)] = True
        r_ids, r_mask = r_ids.to(device), r_mask.to(device)
        inputs = sequence_inputs(q_ids, q_mask, r_ids, r_mask)
        window = dict(use_cache=False, logits_to_keep=T + 1)  # the response window only
        logits = model(input_ids=inputs[0], attention_mask=inputs[1], position_ids=inputs[2], **window).logits[:, :-1]
        with reference_context(models):
            ref_logits = reference_model(models)(input_ids=inputs[0], attention_mask=inputs[1],
                                                 position_ids=inputs[2], **window).logits[:, :-1]
        kl = sequence_kl_tokens(logits, ref_logits, temperature)  # fp32 a slice at a time
        out.extend(masked_sum(kl, r_mask, dim=1).tolist())
    return out


def evaluate(model, models, eval_set: EvalSet, world, ev: EvalSettings, accelerator, prefix: str = "eval") -> tuple[dict, list]:
    """Gold score, win rate vs SFT, accuracy, finish rate, RM score and (sampled decoding only) KL
    of `model` on the eval set's prompts, decoded as its SFT responses were. Returns (metrics,
    table rows); every process gets the same numbers."""
    was_training = model.training
    model.eval()
    texts, finished, ids = sample_eval(model, models.tokenizer, eval_set.prompts, ev, eval_set.temperature,
                                       eval_stream(ev, eval_set.split, "policy"), eval_set.rows)
    device = accelerator.device
    rm = (score_responses(models.reward, models.reward_tokenizer, eval_set.prompts, texts, finished).tolist()
          if texts and models.reward is not None else [float("nan")] * len(texts))
    # KL along a greedy trajectory is not an estimate of the policies' KL: sampled decoding only.
    kl = sequence_kl(model, models, eval_set.prompts, ids, finished, ev.kl_temperature,
                     ev.batch_size, device) if texts and eval_set.temperature > 0 else [float("nan")] * len(texts)
    rows = []
    for i, (p, t, f) in enumerate(zip(eval_set.prompts[: eval_set.n_real], texts, finished)):
        gold, sft_gold = world.gold_score(p, t, f), eval_set.sft_gold[i]
        rows.append([p, eval_set.sft_texts[i], t, sft_gold, gold, rm[i], kl[i], _win(gold, sft_gold),
                     float(world.is_correct(p, t)), float(f), len(ids[i]) + int(f), world.skill_of(p),
                     float(world.is_correct(p, eval_set.sft_texts[i])), float(eval_set.sft_finished[i])])
    model.train(was_training)
    rows = gather(rows, accelerator)
    col = _columns(rows)
    metrics = {f"{prefix}/{k}": _mean(col[c]) for k, c in (
        ("gold_score", "gold"), ("win_rate", "win"), ("rm_score", "rm_score"), ("accuracy", "correct"),
        ("eos_rate", "finished"), ("length", "length"), ("sft_gold_score", "sft_gold"),
        ("sft_accuracy", "sft_correct"), ("sft_eos_rate", "sft_finished"))}
    if eval_set.temperature > 0:
        metrics[f"{prefix}/kl"] = _mean(col["kl"])
    return metrics, rows


def _win(gold: float, other: float) -> float:
    return 1.0 if gold > other + 1e-9 else (0.5 if abs(gold - other) <= 1e-9 else 0.0)


def _columns(rows: list) -> dict[str, list]:
    """`evaluate`'s table rows as one list per TABLE_COLUMNS name."""
    return {name: [r[j] for r in rows] for j, name in enumerate(TABLE_COLUMNS)}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


TABLE_COLUMNS = ["prompt", "sft_response", "response", "sft_gold", "gold", "rm_score", "kl", "win", "correct",
                 "finished", "length", "skill", "sft_correct", "sft_finished"]
SKILL = TABLE_COLUMNS.index("skill")


def comparison(rows: list, decoding: str) -> dict:
    """PPO vs SFT on one decoding from `evaluate`'s rows: win rate with its interval, the mean gold
    difference with its paired bootstrap interval, both sides' summaries, RM score and KL."""
    col = _columns(rows)
    kl = [k for k in col["kl"] if not math.isnan(k)]
    return {"decoding": decoding, "prompts": len(rows), "win_rate": rate(col["win"]),
            "gold_diff": paired_bootstrap([g - s for g, s in zip(col["gold"], col["sft_gold"])]),
            "policy": policy_summary(col["correct"], col["finished"], col["gold"], col["skill"]) | {
                "rm_score": _mean(col["rm_score"]), "kl": _mean(kl) if kl else None},
            "sft": policy_summary(col["sft_correct"], col["sft_finished"], col["sft_gold"], col["skill"])}


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n − (n−1)/n nats, analytically (Stiennon et al. 2020, Gao et al.
    2022): an upper bound, reached when no two samples are the same (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def best_of_n_kl_estimate(rewards: list[float], keys: list, n: int) -> float:
    """KL(best-of-n || base) of one prompt estimated from its m candidate samples (Beirami et al.
    2024, the discrete case): the samples' empirical distribution q is the base (identical
    responses, equal `keys`, are one outcome of probability count / m, scored by their first
    copy); outcomes are ordered by reward, outcomes of equal reward pooled, and best-of-n picks
    a level with probability p = F^n − F_<^n, F (F_<) the base mass at rewards <= (<) its own.
    KL = Σ p log(p / q). It is the bound when the m samples are distinct and m is large, lower
    when samples repeat, as a small model's do (a plug-in estimate: low when m samples miss much
    of the base's mass)."""
    first: dict = {}
    for key, r in zip(keys, rewards):
        first.setdefault(key, r)
    mass: dict[float, float] = {}
    for key in keys:
        mass[first[key]] = mass.get(first[key], 0.0) + 1.0 / len(keys)
    kl, below = 0.0, 0.0
    for level in sorted(mass):
        q = mass[level]
        p = (below + q) ** n - below ** n
        if p > 0:
            kl += p * math.log(p / q)
        below += q
    return max(0.0, kl)


@torch.no_grad()
def best_of_n(models, eval_set: EvalSet, world, ev: EvalSettings, accelerator, ns: list[int]) -> list[dict]:
    """Best-of-n with the reward model as the baseline (docs/ppo.md §38): max(ns) SFT samples per
    prompt at the eval set's temperature, ranked by the RM; for each n the RM's pick among the
    first n is judged by the gold labeler against the eval set's own SFT sample (one draw). n = 1,
    the SFT policy itself at KL 0, is always included: the curve's origin."""
    if not ns or models.reward is None:
        return []
    ns = sorted({1, *ns})
    m, prompts = max(ns), eval_set.prompts
    repeated = [p for p in prompts for _ in range(m)]
    rows = [row * m + c for row in eval_set.rows for c in range(m)]
    with reference_context(models):
        texts, finished, _ = sample_eval(reference_model(models), models.tokenizer, repeated, ev, eval_set.temperature,
                                         eval_stream(ev, eval_set.split, "best-of-n"), rows)
    scores = []
    for i in range(0, len(repeated), ev.batch_size):
        j = i + ev.batch_size
        scores += score_responses(models.reward, models.reward_tokenizer, repeated[i:j], texts[i:j], finished[i:j]).tolist()
    per_prompt = []  # per prompt, one row per n: (n, correct, finished, gold, rm, win, skill, KL estimate, SFT gold)
    for k, p in enumerate(prompts[: eval_set.n_real]):
        picks, every = [], range(k * m, (k + 1) * m)
        keys = [(texts[c], finished[c]) for c in every]
        for n in ns:
            best = max(range(k * m, k * m + n), key=lambda c: scores[c])
            gold = world.gold_score(p, texts[best], finished[best])
            picks.append((n, float(world.is_correct(p, texts[best])), float(finished[best]), gold, scores[best],
                          _win(gold, eval_set.sft_gold[k]), world.skill_of(p),
                          best_of_n_kl_estimate([scores[c] for c in every], keys, n), eval_set.sft_gold[k]))
        per_prompt.append(picks)
    rows = [row for picks in gather(per_prompt, accelerator) for row in picks]
    out = []
    for n in ns:
        mine = [r for r in rows if r[0] == n]
        out.append({"n": n, "kl": _mean([r[7] for r in mine]), "kl_bound": best_of_n_kl(n),
                    "win_rate": rate([r[5] for r in mine]), "gold_diff": paired_bootstrap([r[3] - r[8] for r in mine]),
                    "rm_score": _mean([r[4] for r in mine])}
                   | policy_summary([r[1] for r in mine], [r[2] for r in mine], [r[3] for r in mine], [r[6] for r in mine]))
    return out


def rule_baseline(models, eval_set: EvalSet, world, ev: EvalSettings, accelerator) -> dict:
    """SFT plus the post-processing rule (`World.cut_after_answer`) against the eval set's SFT
    responses, as `comparison` reports a policy: greedy, the SFT greedy responses cut; sampled, an
    independent SFT draw (its own random stream, never the opponent's) cut."""
    if eval_set.temperature > 0:
        with reference_context(models):
            texts, finished, _ = sample_eval(reference_model(models), models.tokenizer, eval_set.prompts, ev,
                                             eval_set.temperature, eval_stream(ev, eval_set.split, "sft+rule"),
                                             eval_set.rows)
    else:
        texts, finished = eval_set.sft_texts, eval_set.sft_finished
    rows = []
    for i, p in enumerate(eval_set.prompts[: eval_set.n_real]):
        t, f = world.cut_after_answer(texts[i], finished[i])
        gold, sft_gold = world.gold_score(p, t, f), eval_set.sft_gold[i]
        rows.append([p, eval_set.sft_texts[i], t, sft_gold, gold, float("nan"), float("nan"), _win(gold, sft_gold),
                     float(world.is_correct(p, t)), float(f), float("nan"), world.skill_of(p),
                     float(world.is_correct(p, eval_set.sft_texts[i])), float(eval_set.sft_finished[i])])
    rows = gather(rows, accelerator)
    return comparison(rows, "greedy" if eval_set.temperature == 0 else f"τ={eval_set.temperature:g}")


def test_evaluation(policy, models, world, ev: EvalSettings, accelerator) -> tuple[dict, dict, list]:
    """The reported figures, on the `test` split: PPO vs SFT greedy vs greedy (the headline) and
    at τ vs τ, with the same budget, and the baselines a skeptic tries first: SFT plus the
    post-processing rule (both decodings) and best-of-n of SFT samples. Returns (flat metrics for the
    tracker, the structured result for the manifest and report, the greedy table rows)."""
    result: dict = {"split": "test", "max_new_tokens": ev.max_new_tokens, "comparisons": {}}
    metrics, greedy_rows = {}, []
    for name, temperature in (("greedy", 0.0), ("sampled", ev.temperature)):
        if name == "sampled" and temperature <= 0:
            continue
        eval_set = make_eval_set(models, world, ev, accelerator, "test", temperature)
        m, rows = evaluate(policy, models, eval_set, world, ev, accelerator, prefix=f"test/{name}")
        metrics.update(m)
        result["comparisons"][name] = comparison(rows, "greedy" if temperature == 0 else f"τ={temperature:g}")
        result.setdefault("baselines", {})[name] = {"sft+rule": rule_baseline(models, eval_set, world, ev, accelerator)}
        if name == "greedy":
            greedy_rows = rows
        else:
            result["best_of_n"] = best_of_n(models, eval_set, world, ev, accelerator, ev.best_of)
            for b in result["best_of_n"]:
                metrics.update({f"test/best_of_{b['n']}/gold_score": b["gold_score"],
                                f"test/best_of_{b['n']}/accuracy": b["accuracy"]["value"],
                                f"test/best_of_{b['n']}/rm_score": b["rm_score"],
                                f"test/best_of_{b['n']}/win_rate": b["win_rate"]["value"]})
    return metrics, result, greedy_rows
