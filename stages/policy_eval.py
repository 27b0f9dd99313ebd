"""Evaluation of a trained policy against its reference (the SFT policy) on held-out prompts of
the built-in world, judged by its gold labeler: what every policy-training stage (ppo, dpo)
reports, the same way (docs/ppo.md §34, §38).

The gold labeler, not a learned reward model, judges: a rising RM score with a flat or falling
gold win rate is reward over-optimization. The protocol (docs/ppo.md §38):

- during training, every `eval.every` steps, the policy is sampled at τ on the `valid` prompts:
  the curves (gold, RM score, KL) and every choice of settings;
- at the end, on the disjoint `test` prompts, the policy and SFT with the same decoding and budget:
  greedy vs greedy (the headline) and τ vs τ, then the baselines to beat: SFT plus the
  post-processing rule (cut after the answer), SFT at the temperature best on valid, and best-of-n
  of SFT samples ranked by the reward model (Gao et al. 2022), its KL estimated from the samples.

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

import contextlib
import math
from dataclasses import dataclass

import torch

from pipeline.config import PolicyEvalConfig
from pipeline.distributed import is_sharded
from pipeline.evaluation import gather, generate, shard_even
from pipeline.logprobs import sequence_kl_tokens
from pipeline.stats import paired_bootstrap, policy_summary, rate
from pipeline.tokenizer import end_of_turn_id
from pipeline.world import ANSWER_RE, KNOWN_UNKNOWN_SKILLS, UNKNOWN, abstains
from stages.ppo.functional import masked_sum
from stages.self_knowledge import self_knowledge
from stages.ppo.rollout import (
    encode_prompts,
    queries,
    reference_context,
    reference_model,
    score_responses,
    sequence_inputs,
    token_logprobs,
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
    sft_ids: list[list[int]] | None = None  # the SFT responses' token ids, without the stop token

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
        texts, finished, ids = sample_eval(reference_model(models), models.tokenizer, prompts, ev, temperature,
                                           eval_stream(ev, split, "reference"), rows)
    gold = [world.gold_score(p, t, f) for p, t, f in zip(prompts, texts, finished)]
    return EvalSet(split, temperature, rows, prompts, texts, finished, gold, n_real, ids)


def _responses(tok, ids: list[list[int]], finished: list[bool], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded response ids [B, T] (the stop token appended where a response finished) and
    their bool mask, built on the CPU row by row, then one transfer to `device`."""
    stop = end_of_turn_id(tok)
    rows = [r + [stop] if f else r for r, f in zip(ids, finished)]
    T = max(1, max(len(r) for r in rows))
    r_ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long, device="cpu")
    r_mask = torch.zeros((len(rows), T), dtype=torch.bool, device="cpu")
    for j, r in enumerate(rows):
        r_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long, device="cpu")
        r_mask[j, : len(r)] = True
    return r_ids.to(device), r_mask.to(device)


@torch.no_grad()
def sequence_kl(model, models, prompts: list[str], ids: list[list[int]], finished: list[bool], temperature: float,
                batch_size: int, device) -> list[float]:
    """Exact KL(π_τ || ref_τ) summed over each response's tokens: Σ_t Σ_v p log(p/q) along the
    sampled trajectory (non-negative, and the sequence KL in expectation over π's samples)."""
    tok = models.tokenizer
    out = []
    for i in range(0, len(prompts), batch_size):
        q_ids, q_mask = queries(tok, prompts[i: i + batch_size], device)
        r_ids, r_mask = _responses(tok, ids[i: i + batch_size], finished[i: i + batch_size], device)
        T = r_ids.shape[1]
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
        rows.append(_row(world, p, t, f, eval_set.sft_texts[i], eval_set.sft_finished[i], eval_set.sft_gold[i],
                         rm[i], kl[i], len(ids[i]) + int(f)))
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


def _row(world, prompt: str, text: str, finished: bool, sft_text: str, sft_finished: bool, sft_gold: float,
         rm: float = math.nan, kl: float = math.nan, length: float = math.nan) -> list:
    """One TABLE_COLUMNS row: a response to `prompt` judged beside the SFT response it is compared with."""
    gold = world.gold_score(prompt, text, finished)
    return [prompt, sft_text, text, sft_gold, gold, rm, kl, _win(gold, sft_gold), float(world.is_correct(prompt, text)),
            float(finished), length, world.skill_of(prompt), float(world.is_correct(prompt, sft_text)), float(sft_finished)]


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
            "policy": policy_summary(col["correct"], col["finished"], col["gold"], col["skill"],
                                     [float(abstains(t)) for t in col["response"]]) | {
                "rm_score": _mean(col["rm_score"]), "kl": _mean(kl) if kl else None},
            "sft": policy_summary(col["sft_correct"], col["sft_finished"], col["sft_gold"], col["skill"],
                                  [float(abstains(t)) for t in col["sft_response"]]),
            # per prompt, in the eval set's order: paired comparisons between any two rows (pipeline.study)
            "golds": col["gold"], "sft_golds": col["sft_gold"]}


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
    scores = _rm_scores(models, repeated, texts, finished, ev.batch_size)
    # per prompt, one row per n: (n, correct, finished, gold, rm, win, skill, KL estimate, SFT gold, abstained)
    per_prompt = []
    for k, p in enumerate(prompts[: eval_set.n_real]):
        picks, every = [], range(k * m, (k + 1) * m)
        keys = [(texts[c], finished[c]) for c in every]
        for n in ns:
            best = max(range(k * m, k * m + n), key=lambda c: scores[c])
            gold = world.gold_score(p, texts[best], finished[best])
            picks.append((n, float(world.is_correct(p, texts[best])), float(finished[best]), gold, scores[best],
                          _win(gold, eval_set.sft_gold[k]), world.skill_of(p),
                          best_of_n_kl_estimate([scores[c] for c in every], keys, n), eval_set.sft_gold[k],
                          float(abstains(texts[best]))))
        per_prompt.append(picks)
    rows = [row for picks in gather(per_prompt, accelerator) for row in picks]
    out = []
    for n in ns:
        mine = [r for r in rows if r[0] == n]
        out.append({"n": n, "kl": _mean([r[7] for r in mine]), "kl_bound": best_of_n_kl(n),
                    "win_rate": rate([r[5] for r in mine]), "gold_diff": paired_bootstrap([r[3] - r[8] for r in mine]),
                    "rm_score": _mean([r[4] for r in mine]), "golds": [r[3] for r in mine]}
                   | policy_summary([r[1] for r in mine], [r[2] for r in mine], [r[3] for r in mine], [r[6] for r in mine],
                                    [r[9] for r in mine]))
    return out


RM_SAMPLES = 4  # samples per test prompt and policy on which the reward model's ranking is judged


def pairwise_agreement(rm: list[float], gold: list[float], k: int) -> list[float]:
    """Per ranked pair (gold scores differ) among each prompt's k consecutive samples: 1 where the
    reward model orders it as the gold judge does (an RM tie counts half)."""
    out = []
    for start in range(0, len(gold) - k + 1, k):
        for i in range(start, start + k):
            for j in range(i + 1, start + k):
                if abs(gold[i] - gold[j]) > 1e-9:
                    same = (rm[i] - rm[j]) * (gold[i] - gold[j])
                    out.append(1.0 if same > 0 else 0.5 if same == 0 else 0.0)
    return out


@torch.no_grad()
def rm_accuracy_on_samples(model, models, eval_set: EvalSet, world, ev: EvalSettings, accelerator) -> dict:
    """The reward model judged where PPO uses it: its pairwise accuracy against the gold judge on
    `RM_SAMPLES` samples per test prompt of the trained policy, beside the same on SFT's samples
    (the distribution it was trained on), each at the eval set's temperature from its own stream.
    A reward model that ranks the policy's samples worse than SFT's is being over-optimized."""
    out, k = {}, RM_SAMPLES
    prompts = [p for p in eval_set.prompts for _ in range(k)]
    rows = [r * k + c for r in eval_set.rows for c in range(k)]
    for who, m in (("policy", model), ("sft", None)):
        with reference_context(models) if m is None else contextlib.nullcontext():
            texts, finished, _ = sample_eval(m if m is not None else reference_model(models), models.tokenizer, prompts, ev,
                                             eval_set.temperature, eval_stream(ev, eval_set.split, f"rm-judged-{who}"), rows)
        scores = _rm_scores(models, prompts, texts, finished, ev.batch_size)
        gold = [world.gold_score(p, t, f) for p, t, f in zip(prompts, texts, finished)]
        per_prompt = [pairwise_agreement(scores[i * k:(i + 1) * k], gold[i * k:(i + 1) * k], k)
                      for i in range(eval_set.n_real)]  # one item per real prompt: gather's contract
        out[who] = rate([a for pairs in gather(per_prompt, accelerator) for a in pairs])
    return out


def _rm_scores(models, prompts: list[str], texts: list[str], finished: list[bool], batch_size: int) -> list[float]:
    """The reward model's scores of responses, `batch_size` at a time."""
    scores = []
    for i in range(0, len(prompts), batch_size):
        j = i + batch_size
        scores += score_responses(models.reward, models.reward_tokenizer, prompts[i:j], texts[i:j], finished[i:j]).tolist()
    return scores


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
        rows.append(_row(world, p, t, f, eval_set.sft_texts[i], eval_set.sft_finished[i], eval_set.sft_gold[i]))
    rows = gather(rows, accelerator)
    return comparison(rows, "greedy" if eval_set.temperature == 0 else f"τ={eval_set.temperature:g}")


SFT_TEMPERATURES = (0.0, 0.3, 0.5, 0.7, 1.0)  # the best-temperature baseline's candidates (0 = greedy)


def best_temperature_baseline(models, eval_set: EvalSet, world, ev: EvalSettings, accelerator) -> dict:
    """SFT sampled at the temperature (of `SFT_TEMPERATURES`) with the best mean gold score on the
    `valid` prompts, against the eval set's SFT responses, as `comparison` reports a policy: the
    sharpening a skeptic tries before any training (a policy that only sharpens SFT towards its
    likely answers gains no more than this). Its own random stream, never the opponent's."""
    def valid_gold(tau: float) -> float:
        v = make_eval_set(models, world, ev, accelerator, "valid", tau)
        return _mean(gather(v.sft_gold[: v.n_real], accelerator))

    best = max(SFT_TEMPERATURES, key=lambda tau: (valid_gold(tau), -tau))  # ties: the lower temperature
    with reference_context(models):
        texts, finished, _ = sample_eval(reference_model(models), models.tokenizer, eval_set.prompts, ev, best,
                                         eval_stream(ev, eval_set.split, "sft@best-temperature"), eval_set.rows)
    rows = [_row(world, p, texts[i], finished[i], eval_set.sft_texts[i], eval_set.sft_finished[i], eval_set.sft_gold[i])
            for i, p in enumerate(eval_set.prompts[: eval_set.n_real])]
    return comparison(gather(rows, accelerator), f"τ={best:g}") | {"temperature": best}


def answer_span(tokenizer, ids: list[int]) -> tuple[int, int] | None:
    """Token positions [a, b) of the answer x in a response's first `Answer: x.` (None without
    one), found by decoding ever longer prefixes of its ids."""
    m = ANSWER_RE.search(tokenizer.decode(ids, skip_special_tokens=True))
    if m is None:
        return None
    start = None
    for i in range(1, len(ids) + 1):
        n = len(tokenizer.decode(ids[:i], skip_special_tokens=True))
        if start is None and n > m.start(1):
            start = i - 1
        if n >= m.end(1):
            return start, i
    return None


@torch.no_grad()
def answer_confidence(models, prompts: list[str], ids: list[list[int]], finished: list[bool], batch_size: int,
                      device) -> list[float]:
    """The SFT (reference) model's own confidence in each response's answer: the lowest
    log-probability, at temperature 1, among the tokens of x in `Answer: x.` (nan without one)."""
    tok, out = models.tokenizer, []
    for i in range(0, len(prompts), batch_size):
        q_ids, q_mask = queries(tok, prompts[i: i + batch_size], device)
        r_ids, r_mask = _responses(tok, ids[i: i + batch_size], finished[i: i + batch_size], device)
        with reference_context(models):
            logp = token_logprobs(reference_model(models), *sequence_inputs(q_ids, q_mask, r_ids, r_mask), r_ids, 1.0)
        for j, r in enumerate(ids[i: i + batch_size]):
            span = answer_span(tok, r)
            out.append(float(logp[j, span[0]: span[1]].min()) if span else float("nan"))
    return out


def abstain_below(response: str, confidence: float, threshold: float) -> str:
    """The response with its answer replaced by the abstention (`unknown`, the style kept) when its
    confidence is below `threshold`."""
    m = ANSWER_RE.search(response)
    if m is None or math.isnan(confidence) or confidence >= threshold:
        return response
    return response[: m.start(1)] + UNKNOWN + response[m.end(1):]


def threshold_baseline(models, greedy: EvalSet, world, ev: EvalSettings, accelerator) -> dict:
    """SFT greedy with confidence-threshold abstention (`answer_confidence`): the threshold that
    maximises the mean gold score on the `valid` prompts, applied to the test set `greedy`, as
    `comparison` reports a policy, plus the curve a threshold sweep traces on the test prompts:
    (abstain, hallucination) rates on the fact and addition prompts, the frontier a policy that
    knows what it knows must beat."""
    def judged(eval_set: EvalSet) -> list:
        conf = answer_confidence(models, eval_set.prompts, eval_set.sft_ids, eval_set.sft_finished, ev.batch_size,
                                 accelerator.device)
        return gather([(p, t, f, c) for p, t, f, c in zip(eval_set.prompts, eval_set.sft_texts, eval_set.sft_finished,
                                                           conf)][: eval_set.n_real], accelerator)

    def mean_gold(items, threshold):
        return _mean([world.gold_score(p, abstain_below(t, c, threshold), f) for p, t, f, c in items])

    valid = judged(make_eval_set(models, world, ev, accelerator, "valid", 0.0))
    candidates = sorted({-math.inf} | {c for *_, c in valid if not math.isnan(c)})
    threshold = max(candidates, key=lambda t: (mean_gold(valid, t), -t))  # ties: the fewest abstentions
    test = judged(greedy)
    rows = [_row(world, p, abstain_below(t, c, threshold), f, t, f, world.gold_score(p, t, f)) for p, t, f, c in test]
    known = [(p, t, f, c) for p, t, f, c in test if world.skill_of(p) in KNOWN_UNKNOWN_SKILLS]
    confs = sorted(c for *_, c in known if not math.isnan(c))
    curve = []
    for q in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        cut = -math.inf if q == 0 or not confs else (math.inf if q == 1 else confs[int(q * len(confs))])
        answers = [abstain_below(t, c, cut) for p, t, f, c in known]
        curve.append({"threshold": cut, "abstain": _mean([float(abstains(a)) for a in answers]),
                      "hallucination": _mean([float(not world.is_correct(p, a) and not abstains(a))
                                              for (p, *_), a in zip(known, answers)])})
    return comparison(rows, "greedy") | {"threshold": threshold, "curve": curve}


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
        if name == "sampled":
            result["baselines"][name]["sft@best-τ"] = best_temperature_baseline(models, eval_set, world, ev, accelerator)
        if name == "greedy" and world.strangers:  # abstaining pays only with the honesty axis
            result["baselines"][name]["sft+threshold"] = threshold_baseline(models, eval_set, world, ev, accelerator)
            result["self_knowledge"] = self_knowledge(models, world, ev, accelerator, eval_set)
        if name == "greedy":
            greedy_rows = rows
        else:
            result["best_of_n"] = best_of_n(models, eval_set, world, ev, accelerator, ev.best_of)
            if models.reward is not None:
                result["rm_accuracy"] = rm_accuracy_on_samples(policy, models, eval_set, world, ev, accelerator)
            for b in result["best_of_n"]:
                metrics.update({f"test/best_of_{b['n']}/gold_score": b["gold_score"],
                                f"test/best_of_{b['n']}/accuracy": b["accuracy"]["value"],
                                f"test/best_of_{b['n']}/rm_score": b["rm_score"],
                                f"test/best_of_{b['n']}/win_rate": b["win_rate"]["value"]})
    return metrics, result, greedy_rows
