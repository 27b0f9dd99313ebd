"""Stage `rm`: a reward model from ranked comparisons, normalized and ready for PPO.

Data flow: parent SFT policy -> K responses per world prompt (temperature 0.7, as PPO samples) -> gold labeler
ranks them (optional simulated label noise) -> `comparisons.jsonl` (or: imported K-wise /
preference files, validated up front) -> SFT weights + fresh scalar head -> K-wise loss, all
C(K,2) pairs of a prompt in one batch element (own accelerate loop; pure pairwise data may go
through TRL's RewardTrainer) -> scores of SFT samples normalized to mean 0 / std 1 inside the
weights -> held-out pairwise accuracy, reward distributions, length bias -> `model/` + manifest.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipeline import runs
from pipeline.config import F, BatchConfig, InputError, OptimConfig, StageConfig
from pipeline.records import load_prompt_records
from pipeline.distributed import (backward, clip_grad_norm, configure_deepspeed, full_state_dict, inference_copy,
                                  load_frozen, no_sync, save_model, trained_numerics)
from pipeline.memory import check_fits
from pipeline.models import count_parameters, enable_gradient_checkpointing, frozen_numerics, load_tokenizer
from pipeline.runtime import (adamw_warmup_cosine, batch_indices, batch_split, micro_batch, resolve_precision,
                              seed_for, total_steps)
from pipeline.stage import DataError, StageRun, check_parent_world, stage_main
from pipeline.tracking import Progress, stratified
from pipeline.world import World
from reward_model import comparisons as cmp
from reward_model.comparisons import ComparisonDataConfig
from reward_model.losses import kwise_loss
from reward_model.likelihood import (SUBDIR, LikelihoodTerm, attach, exempt_mask, fit_on_comparisons, neutralize,
                                     residual_offsets, source_for)
from reward_model.metrics import accuracy_by_part, evaluate_comparisons, response_lengths
from reward_model.model import load_reward_model, normalize_on_reference
from reward_model.probes import run_probes
from reward_model.scoring import group_rewards, log_likelihood_ids, render_span, score, score_ids
from reward_model.trl_pairwise import train_pairwise
from stages.rm_report import print_report


@dataclass
class RMDataConfig(ComparisonDataConfig):
    prompt_files: list[str] = F([], "prompt-only files to sample and export for labeling instead of world prompts (needs export_only)")


@dataclass
class NormalizeConfig:
    enabled: bool = F(True, "fold score normalization on SFT samples into the head after training")
    std: bool = F(True, "also scale scores to std 1 (else mean 0 only)")
    reference_size: int = F(2048, "SFT samples in the reference set (world: training responses; files: fresh samples)", gt=0)


@dataclass
class RMConfig(StageConfig):
    data: RMDataConfig = F(RMDataConfig(), "comparisons: sampled from the world or imported")
    optim: OptimConfig = F(OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=5),
                           "optimizer and schedule (lr tuned for the tiny model's full fine-tune; ~1e-5 at billion scale)")
    normalize: NormalizeConfig = F(NormalizeConfig(), "reward normalization after training")
    trainer: Literal["auto", "kwise", "trl"] = F(
        "auto", "auto = TRL RewardTrainer when every comparison is one pair and no likelihood residual is trained, "
                "else the K-wise loop")
    batch: BatchConfig = F(BatchConfig(size=32, micro=8), "prompts (K-wise) or pairs (trl) per step and per forward; "
                                                          "forward = sequences per scoring or sampling batch")
    epochs: float = F(3.0, "passes over the training comparisons (when steps is -1)", gt=0)
    steps: int = F(-1, "optimizer steps (-1 = as many as the epochs make)", ge=-1)
    center_coef: float = F(0.0, "reward-centering regularizer c·mean(r²) (arXiv 2312.09244; TRL suggests 0.01)", ge=0)
    likelihood_term: bool = F(True, "score = head + c·(log p_SFT(response | prompt) - m): add the frozen parent's "
                                    "log-likelihood of the response (reward_model/likelihood.py); the RM records where "
                                    "the parent model is (path and fingerprint). false = a plain classifier")
    likelihood_copy: bool = F(False, "with the likelihood term, copy the parent SFT model into the reward model's "
                                     "likelihood/ directory: a self-contained reward model (one more copy of the weights)")
    likelihood_residual: float | None = F(None, "the head trains as the residual over this x log p_SFT(response), "
                                              "standardized over the training responses (so any response length gives "
                                              "offsets of the same size): it learns the form the likelihood misjudges "
                                              "instead of a form cue that outweighs its judgement of correctness "
                                              "(docs/ppo.md §13); 0 = the head alone; unset = 8 on the built-in world "
                                              "(chosen on its valid prompts), 0 on files (the term then joins only if "
                                              "the held-out calibration share gives it a weight)", ge=0)
    likelihood_exempt: str = F("", "a regular expression over response text: the responses it matches get no "
                                   "likelihood term, the head alone values them (e.g. 'Answer: unknown\\.', the "
                                   "world's abstention: its SFT likelihood says how often SFT abstains, not whether "
                                   "abstaining is right); empty = none")
    likelihood_calibration: float = F(0.1, "share of the training comparisons held out from the head's training to fit "
                                           "the likelihood term's c on (0 = fit on the head's own training comparisons)", ge=0, lt=1)
    export_only: bool = F(False, "sample K responses per prompt, write comparisons_unlabeled.jsonl for labeling and stop")

    stage = "rm"

    def residual_weight(self) -> float:
        """The likelihood residual's weight in standard deviations (0: the head trains alone)."""
        if not self.likelihood_term:
            return 0.0
        if self.likelihood_residual is not None:
            return self.likelihood_residual
        return 8.0 if self.data.source == "world" else 0.0

    def reads_data_files(self) -> bool:
        return not self.export_only

    def validate(self) -> list[str]:
        p = super().validate()
        d = self.data
        if d.source == "world" and d.eval_split not in (None, "test", "valid"):
            p.append(f"data.eval_split: the world's held-out prompts are 'test' or 'valid', not {d.eval_split!r}")
        if d.prompt_files and not self.export_only:
            p.append("data.prompt_files: only used with export_only=true (no labeler knows your prompts: export, label, "
                     "then import with data.source=files)")
        if d.eval_k == 1:
            p.append("data.eval_k: must be >= 2 (or 0 = data.k)")
        if self.trainer == "trl" and self.residual_weight() > 0:
            p.append("trainer=trl: TRL's RewardTrainer cannot train the head over the likelihood residual; use "
                     "trainer=kwise (the same Bradley-Terry loss for pairs) or likelihood_residual=0")
        return p


@dataclass
class Prepared:
    """Everything checked before the stage writes a byte: parent, tokenizer, data."""

    parent: runs.Parent
    tokenizer: Any
    comparisons: list      # all sampled/imported training comparisons (saved for world runs)
    train: list            # those with >= 1 ranked pair and within max_length
    train_seqs: list       # per comparison, the rendered token ids of each response
    train_starts: list     # per comparison, each response's first token index in its rendered ids
    calibration: list      # comparisons held out from the head's training to fit the likelihood term on
    held_out: list         # Comparison for evaluation
    reference: list        # (prompt, response, finished) SFT samples for normalization
    fingerprint: str
    resuming: bool


def run(cfg: RMConfig) -> runs.Manifest:
    with StageRun.open(cfg) as sr:
        # before `begin`: a bad parent or a bad record leaves every earlier output as it was,
        # including the manifest of a previous rm run
        check_fits(cfg, sr.accelerator, memory_plan, cfg.data.max_length)
        prep = prepare(cfg, sr, sr.accelerator)
        if prep is None:
            return sr.manifest  # export_only
        return _run(cfg, sr, sr.accelerator, sr.threads, prep)


def prepare(cfg: RMConfig, sr: StageRun, accelerator) -> Prepared | None:
    """Resolve the parent and build (sample or import and validate) the comparisons."""
    log = _logger(accelerator)
    parent = runs.resolve_parent("rm", cfg.runs_dir, cfg.run_name, cfg.parent)
    check_parent_world(cfg, parent)
    tokenizer = load_tokenizer(parent.model_dir)
    if cfg.export_only:
        _export(cfg, sr, accelerator, parent, tokenizer)
        return None
    # 1. comparisons: sampled and ranked (or reused after an interruption), or imported and validated
    resuming = sr.latest_checkpoint() is not None or sr.latest_trainer_checkpoint()[0] is not None
    comparisons, held_out, reference = _comparisons(cfg, sr, accelerator, parent, tokenizer, resuming, log)
    train = [c for c in comparisons if c.pairs()]  # all-tie comparisons carry no signal
    spans = [[render_span(tokenizer, c.prompt, r, f) for r, f in zip(c.responses, c.finished)] for c in train]
    keep = [i for i, g in enumerate(spans) if max(len(ids) for ids, _ in g) <= cfg.data.max_length]
    if len(keep) < len(train):
        log(f"dropped {len(train) - len(keep)} comparisons longer than data.max_length={cfg.data.max_length} tokens")
    if not keep:
        raise DataError("no training comparison has a ranked pair (all ties, or longer than data.max_length)")
    fingerprint = runs.data_fingerprint([train[i].record() for i in keep])
    calibrate = set()
    if cfg.likelihood_term and cfg.likelihood_calibration > 0:  # seeded: the same split on resume
        n = int(len(keep) * cfg.likelihood_calibration)
        calibrate = set(random.Random(seed_for(cfg.seed, "rm/calibration")).sample(keep, n)) if n < len(keep) else set()
    head = [i for i in keep if i not in calibrate]
    return Prepared(parent, tokenizer, comparisons, [train[i] for i in head], [[ids for ids, _ in spans[i]] for i in head],
                    [[start for _, start in spans[i]] for i in head], [train[i] for i in sorted(calibrate)], held_out,
                    reference, fingerprint, resuming)


def _logger(accelerator):
    if accelerator.is_main_process:
        return lambda *a: print("[rm]", *a, file=sys.stderr, flush=True)
    return lambda *a: None


def _run(cfg: RMConfig, sr: StageRun, accelerator, threads: int, prep: Prepared) -> runs.Manifest:
    is_main, log = accelerator.is_main_process, _logger(accelerator)
    tokenizer, train, train_seqs, held_out = prep.tokenizer, prep.train, prep.train_seqs, prep.held_out
    residual = cfg.residual_weight()
    use_trl = cfg.trainer == "trl" or (cfg.trainer == "auto" and not residual and all(len(c.responses) == 2 for c in train))
    sr.clear_stale_checkpoints(prep.resuming)
    sr.begin(parent=prep.parent, data_fingerprint=prep.fingerprint, resuming=prep.resuming)
    if is_main and cfg.data.source == "world":
        for name, comps in zip(cmp.SAVED, (prep.comparisons, held_out)):  # reused by an interrupted run
            cmp.write_jsonl(sr.dir / name, comps)

    # 2. model and training
    model = load_reward_model(prep.parent.model_dir, tokenizer, attn=cfg.attention())
    n_pairs = sum(len(c.pairs()) for c in train)
    log(f"{count_parameters(model) / 1e6:.2f}M parameters | {len(train)} comparisons, {n_pairs} ranked pairs, "
        f"{len(prep.calibration)} for the likelihood term, {len(held_out)} held out | "
        f"trainer {'trl RewardTrainer' if use_trl else 'K-wise'} | {threads} threads/proc")
    lm, offsets, spread = None, None, 1.0
    if residual:  # the frozen parent's judgement, added to every training score (recomputed on resume)
        lm = load_frozen(accelerator, prep.parent.model_dir, tokenizer, cfg.precision, cfg.attention()).eval().requires_grad_(False)
        log_lik = log_likelihood_ids(lm, [ids for g in train_seqs for ids in g], [s for g in prep.train_starts for s in g],
                                     tokenizer.pad_token_id, cfg.batch.forward, accelerator)
        log_lik = neutralize(log_lik, exempt_mask(cfg.likelihood_exempt, [r for c in train for r in c.responses]))
        offsets, spread = residual_offsets(log_lik, [len(c.responses) for c in train], residual)
        log(f"the head trains as the residual over {residual:g} x log p_SFT(response) / {spread:.3g} (its standard "
            "deviation over the training responses; likelihood_residual)")
    if use_trl:
        model, step, done, last, tracker, accelerator = train_pairwise(cfg, sr, accelerator, model, tokenizer, train_seqs,
                                                                       train, log)
    else:
        model, step, done, last, tracker = _train_kwise(cfg, sr, accelerator, model, tokenizer, train_seqs, train,
                                                        prep.fingerprint, log, offsets)
    if not done:
        tracker.finish()
        return sr.manifest
    model, master = _for_inference(cfg, accelerator, model)

    # 3. the likelihood term's coefficient, fitted on comparisons the head did not train on
    term, extra = None, {}
    if cfg.likelihood_term:
        term, where = _fit_likelihood(cfg, prep, accelerator, model, lm)
        extra["likelihood_coef_fitted"] = term.coef
        extra["likelihood_residual"] = residual
        if offsets is not None:
            extra["likelihood_residual_sd"] = spread
        if term.coef > 0:
            log(f"likelihood term: score = head + {term.coef:.4g} * log p_SFT(response), c fitted on {where}")
        else:
            log(f"likelihood term: the coefficient fitted on {where} is 0 (the parent's likelihood does not help rank "
                "them): the reward model is a classifier alone"
                + (", so its head trains again without the likelihood residual" if residual else ""))
            term = None
            if residual:  # a head trained over the residual is not a reward model on its own
                model = load_reward_model(prep.parent.model_dir, tokenizer, attn=cfg.attention())
                model, again, _, last, _ = _train_kwise(cfg, sr, accelerator, model, tokenizer, train_seqs, train,
                                                        prep.fingerprint, log, None, tracker=tracker, checkpoints=False,
                                                        log_from=step)
                model, master = _for_inference(cfg, accelerator, model)
                step += again
                extra["likelihood_residual"] = 0.0
    extra["reward_model"] = ("classifier + likelihood term" if term is not None else "classifier trained alone"
                             + (" (the likelihood term's fitted weight was 0)" if cfg.likelihood_term else ""))

    # 4. normalize: SFT samples score mean 0 (std 1), stored in the weights
    eval_spans = [render_span(tokenizer, c.prompt, r, f) for c in held_out for r, f in zip(c.responses, c.finished)]
    eval_seqs, eval_starts = [ids for ids, _ in eval_spans], [start for _, start in eval_spans]
    finished = [f for c in prep.comparisons for f in c.finished]
    metrics = {**{f"train/{k}": v for k, v in last.items()}, "data/comparisons": len(prep.comparisons),
               "data/ranked_pairs": n_pairs,
               "data/all_tie_fraction": sum(not c.pairs() for c in prep.comparisons) / len(prep.comparisons),
               "data/finished_rate": sum(finished) / max(1, len(finished))}
    if cfg.normalize.enabled:
        ref_spans = [render_span(tokenizer, p, r, f) for p, r, f in prep.reference]
        ref_seqs = [ids for ids, _ in ref_spans]
        offset = None
        if term is not None:  # the term centred on the reference: the shift folded into the head stays small
            ref_log_lik = log_likelihood_ids(term.model, ref_seqs, [start for _, start in ref_spans],
                                             tokenizer.pad_token_id, cfg.batch.forward, accelerator)
            ref_log_lik = neutralize(ref_log_lik, exempt_mask(term.exempt, [r for _, r, _ in prep.reference]))
            term.center = ref_log_lik.double().mean().item()  # exempt responses at the others' mean: offset 0
            offset = term(ref_log_lik.double())
        stats = normalize_on_reference(model, ref_seqs, eval_seqs, tokenizer.pad_token_id, cfg.normalize.std,
                                       cfg.batch.forward, accelerator, ref_offset=offset)
        if term is not None:
            term.coef /= stats["raw_std"]  # the whole score is divided by σ, the term with the head
        metrics.update({f"norm/{k}": v for k, v in stats.items()})
        extra["normalization"] = stats
    scores, lengths = None, response_lengths(tokenizer, held_out)
    if term is not None:
        # each part alone on the held-out comparisons: what the head and the likelihood rank right
        pad, bs = tokenizer.pad_token_id, cfg.batch.forward
        head = score_ids(model, eval_seqs, pad, bs, accelerator)[0]
        log_lik = log_likelihood_ids(term.model, eval_seqs, eval_starts, pad, bs, accelerator)
        log_lik = neutralize(log_lik, exempt_mask(term.exempt, [r for c in held_out for r in c.responses]), term.center)
        parts = {"head": head.tolist(), "likelihood": log_lik.tolist()}
        extra["eval_accuracy_of_parts"] = {name: accuracy_by_part(held_out, v, lengths) for name, v in parts.items()}
        scores = (head + term(log_lik)).tolist()  # what scoring with the attached term gives
        attach(model, term)
        metrics["likelihood/coef"] = term.coef

    # 5. evaluate on held-out comparisons (with the likelihood term: also each part alone)
    eval_metrics, eval_extra, rows = evaluate_comparisons(model, tokenizer, held_out, eval_seqs, cfg.batch.forward,
                                                          accelerator, starts=eval_starts, scores=scores,
                                                          lengths=lengths)
    metrics.update(eval_metrics)
    extra.update(eval_extra)
    if cfg.data.source == "world":  # the right answer against variants a policy could drift to (reward_model/probes.py)
        extra["probes"] = run_probes(lambda ps, rs: score(model, tokenizer, ps, rs, batch_size=cfg.batch.forward,
                                                          accelerator=accelerator).tolist(),
                                     World(cfg.world), [c.prompt for c in held_out])
        metrics.update({f"probe/{name.replace(' ', '_')}/rm_prefers": v["rm_prefers"] for name, v in extra["probes"].items()})
    for name, v in extra.get("eval_accuracy_of_parts", {}).items():
        metrics[f"eval/pairwise_accuracy/{name}_only"] = v["overall"]["accuracy"]
        if "correctness" in v["by_kind"]:
            metrics[f"eval/pairwise_accuracy/{name}_only_correctness_pairs"] = v["by_kind"]["correctness"]["accuracy"]
    tracker.log(metrics, step)
    tracker.table("eval/samples", ["prompt", "skill", "response", "finished", "rank", "gold_score", "reward"],
                  stratified(rows, 1, 200), step)
    tracker.summary(metrics)

    # 6. hand off: a plain save_pretrained directory with normalized scores (and the likelihood
    # term's frozen model, an exact copy of the parent's files)
    model_dir = sr.dir / "model"
    copy = term is not None and cfg.likelihood_copy
    if term is not None:  # where PPO and the model card find the term's model
        term.source = source_for(model_dir, prep.parent.model_dir)
        if copy:  # the copy inside, nothing outside
            term.source = {"model": SUBDIR, "fingerprint": term.source["fingerprint"]}
        attach(model, term)
    state = None
    if master is not None and is_main:  # the trained weights as gathered, with the normalized head
        state = {**master, **{f"score.{k}": v.detach().float().cpu() for k, v in model.score.state_dict().items()}}
    save_model(accelerator, model, tokenizer, model_dir, state_dict=state,
               copies={SUBDIR: prep.parent.model_dir} if copy else None)
    headline = {"pairwise_acc": metrics["eval/pairwise_accuracy"],
                "chosen_minus_rejected": metrics["eval/reward_chosen_mean"] - metrics["eval/reward_rejected_mean"]}
    if "norm/heldout_max_abs_dev" in metrics:
        headline["norm_max_dev"] = metrics["norm/heldout_max_abs_dev"]
    manifest = sr.finish(model_dir, metrics, headline, extra=extra)
    tracker.finish()
    if is_main:
        print_report(manifest, metrics, extra, model_dir)
    return manifest


def memory_plan(cfg: RMConfig, launcher: str, nproc: int, device, prompt_len: int = 256, mesh=None):
    """What each of `nproc` processes holds while the reward model trains (`pipeline.memory.Plan`):
    the classifier with gradients and AdamW state, the parent SFT model whole in its inference
    dtype while the likelihood term is on (it scores every training response), and the larger of
    sampling (KV cache) and a K-wise micro-batch's activations."""
    from transformers import AutoConfig

    from pipeline.memory import (Phase, Plan, PlannedModel, activation_bytes, kv_cache_bytes, model_row,
                                 planned_precision, training_activation_bytes)

    config = AutoConfig.from_pretrained(str(runs.resolve_parent("rm", cfg.runs_dir, cfg.run_name, cfg.parent).model_dir))
    planned = [PlannedModel("reward model", config, classifier=True, trained=True)]
    precision = planned_precision(cfg, device)
    if cfg.likelihood_term:
        planned.append(PlannedModel("SFT (likelihood)", config, numerics=frozen_numerics(precision, launcher),
                                    sharded_frozen=False))
    act = activation_bytes(precision)
    micro = batch_split(cfg.batch.size, cfg.batch.micro, nproc)[0]
    seqs = micro * max(cfg.data.k, cfg.data.eval_k or cfg.data.k)
    update = training_activation_bytes(config, seqs * cfg.data.max_length, cfg.gradient_checkpointing, act, lm_head=False)
    sample = kv_cache_bytes(config, cfg.batch.forward, prompt_len + cfg.data.max_new_tokens, act)
    return Plan("rm", launcher, nproc, [model_row(pm, launcher, nproc, mesh) for pm in planned],
                [Phase("sample", sample, f"KV cache of {cfg.batch.forward} x {prompt_len + cfg.data.max_new_tokens} "
                                         "tokens (the SFT model samples the comparisons)"),
                 Phase("update", update, f"activations for {micro} prompts x {cfg.data.k} responses x "
                                         f"{cfg.data.max_length} tokens" + (" (checkpointed)" if cfg.gradient_checkpointing
                                                                           else ""))])


# The keys `python -m pipeline plan` may change to make this stage fit, besides batch.micro (pipeline.memory.cheaper_settings)
MEMORY_KNOBS: dict = {}


def _fit_likelihood(cfg: RMConfig, prep: Prepared, accelerator, model, lm=None) -> tuple[LikelihoodTerm, str]:
    """The frozen parent and the coefficient c that best ranks the calibration comparisons (the
    head's training comparisons when there are none) as head + c·log p_parent(response), the head
    as trained, unnormalized -> (term, which comparisons c was fitted on). `lm`: the parent, if loaded."""
    lm = lm or load_frozen(accelerator, prep.parent.model_dir, prep.tokenizer, cfg.precision, cfg.attention()).eval().requires_grad_(False)
    comps = prep.calibration or prep.train
    spans = [render_span(prep.tokenizer, c.prompt, r, f) for c in comps for r, f in zip(c.responses, c.finished)]
    pad, bs = prep.tokenizer.pad_token_id, cfg.batch.forward
    flat = [ids for ids, _ in spans]
    head = score_ids(model, flat, pad, bs, accelerator)[0]
    log_lik = log_likelihood_ids(lm, flat, [start for _, start in spans], pad, bs, accelerator)
    log_lik = neutralize(log_lik, exempt_mask(cfg.likelihood_exempt, [r for c in comps for r in c.responses]))
    where = (f"{len(comps)} calibration comparisons held out from the head" if prep.calibration
             else "the head's own training comparisons")
    return LikelihoodTerm(lm, fit_on_comparisons(head, log_lik, comps), exempt=cfg.likelihood_exempt), where


def _comparisons(cfg: RMConfig, sr: StageRun, accelerator, parent, tokenizer, resuming: bool, log):
    """(train, held_out, reference): comparisons (`reward_model.comparisons.build_comparisons`), and
    (prompt, response, finished) SFT samples to normalize on."""
    d = cfg.data
    sample = cmp.parent_sampler(accelerator, parent.model_dir, tokenizer, d, cfg.precision, cfg.attention(),
                                cfg.batch.forward)
    train, held_out = cmp.build_comparisons(d, cfg.seed, cfg.world, sample, log, sr.dir if resuming else None)
    if d.source == "files":
        reference = []
        if cfg.normalize.enabled:  # fresh SFT samples: PPO's rewards are normalized on what the policy writes
            prompts = list({str(c.prompt): {"prompt": c.prompt} for c in train}.values())[: cfg.normalize.reference_size]
            reference = [(c.prompt, c.responses[0], c.finished[0]) for c in sample(prompts, 1, seed_for(cfg.seed, "rm/reference"))]
        return train, held_out, reference
    flat = [(c.prompt, r, f) for c in train for r, f in zip(c.responses, c.finished)]
    if len(flat) > cfg.normalize.reference_size:
        flat = random.Random(seed_for(cfg.seed, "rm/reference_subset")).sample(flat, cfg.normalize.reference_size)
    return train, held_out, flat


def _export(cfg: RMConfig, sr: StageRun, accelerator, parent, tokenizer) -> None:
    """Sample K responses per prompt and write them unlabeled; the manifest is left alone, so an
    export never replaces a finished reward model."""
    d = cfg.data
    prompts = (load_prompt_records(d.prompt_files, d.columns, config=d.config, split=d.split) if d.prompt_files
               else World(cfg.world).prompts("rm", d.num_prompts))
    policy = load_frozen(accelerator, parent.model_dir, tokenizer, cfg.precision, cfg.attention())
    comps = cmp.sample_responses(policy, tokenizer, [p["prompt"] for p in prompts], d.k, d.max_new_tokens, d.temperature,
                                 cfg.seed, accelerator, cfg.batch.forward, skills=[p.get("skill") for p in prompts])
    path = sr.dir / "comparisons_unlabeled.jsonl"
    if accelerator.is_main_process:
        cmp.write_jsonl(path, comps)
        print(f"wrote {len(comps)} prompts x {d.k} responses to {path}\n"
              f"fill in each 'ranking' (one rank per response, 0 = best, equal = tie), then run\n"
              f"  python -m stages.rm data.source=files data.files=[{path}]")
    sr.manifest.status = "exported"
    sr.manifest.extra = {"export": str(path)}


def _train_kwise(cfg: RMConfig, sr: StageRun, accelerator, model, tokenizer, train_seqs, train, fingerprint, log,
                 offsets: list | None = None, tracker=None, checkpoints: bool = True, log_from: int = 0):
    """The K-wise loop: each step takes `batch.size` prompts; every response is forwarded
    once and all ranked pairs of a prompt enter one loss term. `offsets`: per comparison, fixed
    [K] terms added to the head's scores in the loss (the likelihood residual). A second training
    in the same stage passes its `tracker`, no `checkpoints` and logs from step `log_from` on.
    Returns (the prepared model, step, finished?, last metrics, tracker)."""
    ranks = [torch.tensor(c.ranking) for c in train]
    total = total_steps(cfg.steps, cfg.epochs, len(train), cfg.batch.size)
    optimizer, scheduler = adamw_warmup_cosine(model, cfg.optim, total)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    micro, accum = batch_split(cfg.batch.size, cfg.batch.micro, accelerator.num_processes)
    configure_deepspeed(accelerator, micro, accum, cfg.optim.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    log(f"{total} steps x {cfg.batch.size} prompts = {micro} micro x {accelerator.num_processes} "
        f"procs x {accum} accum | lr {cfg.optim.lr:g}")
    step, resume_from = 0, sr.latest_checkpoint() if checkpoints else None
    if resume_from:
        state = sr.load_checkpoint(accelerator, resume_from)
        if state.get("data_fingerprint") != fingerprint:
            raise InputError(f"{resume_from} was trained on other comparisons; re-run with resume=false to start afresh")
        step = state["step"]
        log(f"resumed from {resume_from} at step {step}")
    tracker = tracker or sr.tracker(resume_step=step if resume_from else None)
    progress = Progress("rm", total, start=step, every=cfg.log_every, unit="seq", enabled=accelerator.is_main_process)
    pad, last = tokenizer.pad_token_id, {}
    model.train()
    while step < total:
        idx = batch_indices(step, len(train), cfg.batch.size, cfg.seed)
        sums = torch.zeros(4, device=accelerator.device)  # loss, correct pairs, pairs, sequences
        for a in range(accum):
            items = micro_batch(idx, a, micro, accelerator.process_index, accelerator.num_processes)
            sync = no_sync(accelerator, model, sync=a == accum - 1)
            with sync:
                rewards, valid_mask = group_rewards(model, [train_seqs[i] for i in items], pad)
                k_max = rewards.shape[1]
                if offsets is not None:
                    rewards = rewards + torch.stack([torch.nn.functional.pad(offsets[i], (0, k_max - len(offsets[i])))
                                                     for i in items]).to(rewards.device, rewards.dtype)
                batch_ranks = torch.stack([torch.nn.functional.pad(ranks[i], (0, k_max - len(ranks[i])), value=k_max)
                                           for i in items]).to(rewards.device)
                loss, stats = kwise_loss(rewards, batch_ranks, valid_mask, cfg.center_coef)
                backward(accelerator, model, loss / accum, boundary=a == accum - 1)
            sums += torch.stack([loss.detach() / accum, stats["accuracy"] * stats["pairs"], stats["pairs"],
                                 valid_mask.sum().float()]).to(sums.device)
        grad_norm = clip_grad_norm(accelerator, model, cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        g = accelerator.reduce(sums, "sum")
        last = {"loss": g[0].item() / accelerator.num_processes, "accuracy": (g[1] / g[2].clamp(min=1)).item()}
        rate = progress.update(step, g[3].item(), **last)
        if step % cfg.log_every == 0 or step == total:
            tracker.log({"train/loss": last["loss"], "train/accuracy": last["accuracy"], "train/lr": scheduler.get_last_lr()[0],
                         "train/grad_norm": float(grad_norm), "perf/sequences_per_s": rate}, log_from + step)
        if checkpoints and sr.checkpoint(accelerator, step, total, {"step": step, "loss": last["loss"],
                                                                    "data_fingerprint": fingerprint}):
            sr.stopped(step)
            return model, step, False, last, tracker
    return model, step, True, last, tracker


def _for_inference(cfg: RMConfig, accelerator, trained) -> tuple[torch.nn.Module, dict | None]:
    """The trained reward model for what follows training (normalization writes the head,
    evaluation runs rank-local forwards): `inference_copy` -> (model, master). Under fsdp and
    zero3 `master` is the trained state dict gathered on rank 0's CPU (empty elsewhere), which the
    export writes with the normalized head; the trained model and its optimizer are then freed.
    Elsewhere the model is the trained one and `master` None."""
    model = inference_copy(accelerator, trained, trained_numerics(accelerator), resolve_precision(cfg.precision),
                           keep_fp32=("score",))
    if model is accelerator.unwrap_model(trained):
        return model, None
    master = full_state_dict(accelerator, trained)
    accelerator.free_memory()
    return model, master


def main(argv: list[str] | None = None) -> int:
    return stage_main(RMConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
