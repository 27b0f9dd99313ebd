"""The run report: `runs/<run>/report/report.md` with PNG plots of the run's own data.

Reads only what the stages wrote (manifests, metrics.jsonl, samples files), so a report can be
rebuilt at any time: `python -m pipeline report RUN`.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline import registry, runs
from pipeline.plots import plot_bars, plot_hist, plot_lines, plot_overoptimization
from pipeline.stats import fmt_diff, fmt_rate, paired_bootstrap
from pipeline.tracking import stratified
from reward_model.metrics import RM_PAIR_KINDS


def _pct(r: dict | None) -> str:
    return fmt_rate(r) if r else "-"


def _ppo_tables(evaluation: dict, ablation: runs.Manifest | None, ptx_coef: float) -> list[str]:
    """The test-split tables: PPO vs SFT per decoding, per skill, best-of-n, alignment tax."""
    comps = evaluation.get("comparisons", {})
    n_tok = evaluation.get("max_new_tokens")
    out = ["## PPO vs SFT on the test prompts", "",
           f"Same decoding and budget ({n_tok} new tokens) for both sides, on held-out test prompts no setting was "
           "chosen on; the gold labeler judges, a tie counts half; 95% intervals in brackets.", "",
           "| decoding | PPO win rate vs SFT | accuracy PPO | accuracy SFT | finished PPO | finished SFT | gold PPO | gold SFT |",
           "|---|---|---|---|---|---|---|---|"]
    for c in comps.values():
        p, sf = c["policy"], c["sft"]
        out.append(f"| {c['decoding']} | {_pct(c['win_rate'])} | {_pct(p['accuracy'])} | {_pct(sf['accuracy'])} | "
                   f"{_pct(p['finish'])} | {_pct(sf['finish'])} | {p['gold_score']:.3f} | {sf['gold_score']:.3f} |")
    if "greedy" in comps:
        c = comps["greedy"]
        out += ["", "Per skill, greedy:", "", "| skill | prompts | accuracy PPO | accuracy SFT | finished PPO | finished SFT |",
                "|---|---|---|---|---|---|"]
        for skill, v in c["policy"]["skills"].items():
            sv = c["sft"]["skills"][skill]
            out.append(f"| {skill} | {v['accuracy']['n']} | {_pct(v['accuracy'])} | {_pct(sv['accuracy'])} | "
                       f"{_pct(v['finish'])} | {_pct(sv['finish'])} |")
    out += _baseline_table(evaluation)
    other = (ablation.extra.get("evaluation") or {}).get("comparisons", {}) if ablation else {}
    if "greedy" in comps and "greedy" in other:
        other_coef = ablation.config.get("ptx", {}).get("coef", 0.0)
        rows = {ptx_coef: comps, other_coef: other}
        out += ["", "## Alignment tax (PPO-ptx, InstructGPT's γ term)", "",
                "Greedy decoding on the test prompts. PPO-ptx adds γ × the SFT log-likelihood to the PPO objective.", "",
                "| policy | accuracy | finished | gold score | win rate vs SFT |", "|---|---|---|---|---|",
                f"| SFT | {_pct(comps['greedy']['sft']['accuracy'])} | {_pct(comps['greedy']['sft']['finish'])} | "
                f"{comps['greedy']['sft']['gold_score']:.3f} | - |"]
        for coef in sorted(rows):
            c = rows[coef]["greedy"]
            name = "PPO" if coef == 0 else f"PPO-ptx (γ = {coef:g})"
            out.append(f"| {name} | {_pct(c['policy']['accuracy'])} | {_pct(c['policy']['finish'])} | "
                       f"{c['policy']['gold_score']:.3f} | {_pct(c['win_rate'])} |")
    return out + [""]


def _baseline_table(evaluation: dict) -> list[str]:
    """PPO beside the baselines a skeptic tries first, per decoding on the test prompts: SFT, SFT
    plus the post-processing rule, best-of-n of SFT samples (sampled decoding), each against the
    same SFT responses: gold score and its mean difference from SFT's with a paired bootstrap
    interval, win rate, accuracy, KL to SFT."""
    comps, baselines = evaluation.get("comparisons", {}), evaluation.get("baselines", {})
    if not comps:
        return []
    out = ["", "## PPO and the cheap baselines", "",
           "Each row against the same SFT responses on the test prompts, same decoding and budget; Δ gold = mean "
           "gold score minus SFT's, with a 95% paired bootstrap interval over prompts. Sampled rows draw from "
           "their own random streams (never the SFT opponent's). The rule keeps SFT's response up to its first "
           "`Answer: x.`. Best-of-n: n SFT samples, the reward model picks; its KL is estimated on the samples' "
           "empirical distribution (Beirami et al. 2024), the analytic bound log n − (n−1)/n in brackets. "
           "KL is measured on sampled decoding only. Hallucination: share of the fact and addition prompts answered "
           "wrongly rather than abstained on (`Answer: unknown.`).", "",
           "| decoding | policy | gold | Δ gold vs SFT | win rate vs SFT | accuracy | hallucination | abstain | KL to SFT |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, c in comps.items():
        d = c["decoding"]
        out.append(f"| {d} | SFT | {c['sft']['gold_score']:.3f} | - | - | {_pct(c['sft']['accuracy'])} | {_honesty(c['sft'])} | 0 |")
        rule = baselines.get(name, {}).get("sft+rule")
        if rule:
            out.append(f"| {d} | SFT + rule | {rule['policy']['gold_score']:.3f} | {_diff(rule)} | "
                       f"{_pct(rule['win_rate'])} | {_pct(rule['policy']['accuracy'])} | {_honesty(rule['policy'])} | - |")
        sharp = baselines.get(name, {}).get("sft@best-τ")
        if sharp:
            out.append(f"| {d} | SFT at τ={sharp['temperature']:g} (best on valid) | {sharp['policy']['gold_score']:.3f} | "
                       f"{_diff(sharp)} | {_pct(sharp['win_rate'])} | {_pct(sharp['policy']['accuracy'])} | "
                       f"{_honesty(sharp['policy'])} | - |")
        thr = baselines.get(name, {}).get("sft+threshold")
        if thr:
            out.append(f"| {d} | SFT + confidence threshold | {thr['policy']['gold_score']:.3f} | {_diff(thr)} | "
                       f"{_pct(thr['win_rate'])} | {_pct(thr['policy']['accuracy'])} | {_honesty(thr['policy'])} | - |")
        if name == "sampled":
            for b in evaluation.get("best_of_n", []):
                if b["n"] == 1:
                    continue
                bound = f" ({b['kl_bound']:.2f})" if "kl_bound" in b else ""
                out.append(f"| {d} | best-of-{b['n']} | {b['gold_score']:.3f} | {_diff(b)} | {_pct(b['win_rate'])} | "
                           f"{_pct(b['accuracy'])} | {_honesty(b)} | {b['kl']:.2f}{bound} |")
        p = c["policy"]
        kl = f"{p['kl']:.2f}" if p.get("kl") is not None else "-"
        out.append(f"| {d} | PPO | {p['gold_score']:.3f} | {_diff(c)} | {_pct(c['win_rate'])} | {_pct(p['accuracy'])} | "
                   f"{_honesty(p)} | {kl} |")
    thr = baselines.get("greedy", {}).get("sft+threshold")
    if thr:
        points = ", ".join(f"{100 * q['abstain']:.0f}% → {100 * q['hallucination']:.0f}%" for q in thr["curve"])
        out += ["", "SFT + confidence threshold: abstain when the SFT model's lowest log-probability among its answer's "
                f"tokens is below {thr['threshold']:.2f} (chosen on the valid prompts for the best mean gold). Swept over "
                f"thresholds on the test fact and addition prompts, abstain → hallucination: {points}. A policy below "
                "this curve knows better than its own SFT probabilities what it knows."]
    acc = evaluation.get("rm_accuracy")
    if acc:
        out += ["", f"The reward model ranks pairs of PPO's own samples (4 per test prompt, sampled decoding) as the gold "
                f"judge does on {_pct(acc['policy'])} of {acc['policy']['n']} pairs, pairs of SFT's samples on "
                f"{_pct(acc['sft'])} of {acc['sft']['n']}: where PPO took the policy, the reward model judges "
                + ("worse." if acc['policy']['value'] < acc['sft']['low'] else "about as well.")]
    out += _self_knowledge_text(evaluation.get("self_knowledge"))
    return out


def _self_knowledge_text(sk: dict | None) -> list[str]:
    """How well SFT's confidence and a probe on its hidden states tell its right answers from its
    wrong ones (stages/self_knowledge.py), overall and on the facts and sums apart."""
    if not sk:
        return []
    out = ["", f"Does SFT know what it knows? On the test fact and addition prompts it answered ({sk['test_answers']}, "
           f"{100 * sk['test_right']:.0f}% right), its answer confidence tells right from wrong with AUROC "
           f"{sk['confidence_auroc']:.2f}, a logistic probe on its hidden states (fitted on the valid prompts' "
           f"{sk['train_answers']} answers) with AUROC {sk['probe_auroc']:.2f} (0.5 = no better than chance; "
           "stages/self_knowledge.py)."]
    if "confidence_auroc_fact" in sk:
        out[-1] += " Apart: " + "; ".join(
            f"on the {name}, confidence {sk[f'confidence_auroc_{s}']:.2f} and probe {sk[f'probe_auroc_{s}']:.2f}"
            for s, name in (("fact", "facts"), ("add", "sums"))) + "."
    return out


def _honesty(summary: dict) -> str:
    """`hallucination | abstain` cells of a policy summary (`pipeline.stats.policy_summary`)."""
    return f"{_pct(summary.get('hallucination'))} | {_pct(summary.get('abstain'))}"


def _diff(row: dict) -> str:
    return fmt_diff(row["gold_diff"]) if row.get("gold_diff") else "-"


def leading_table(run_dir: Path) -> list[str]:
    """The report's first table: PPO and every baseline and other policy of the run on the same test
    prompts (`pipeline.study.cell_rows`: SFT, its rules and samplers, best-of-n, DPO, rejection
    sampling, the PPO ablations), per decoding: gold with PPO's paired difference and its 95%
    bootstrap interval over prompts, accuracy, hallucination, abstention, KL, the stage's wall
    time; then one sentence on what it shows and what it does not. [] before ppo is complete."""
    from pipeline.study import cell_rows

    try:
        rows = cell_rows(run_dir)
    except ValueError:
        return []
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    out = ["## PPO and every baseline on the test prompts", "",
           "Same held-out test prompts, decoding and token budget for every row; the gold labeler judges. Δ: PPO's "
           "mean gold score minus the row's, with a 95% paired bootstrap interval over prompts. Hallucination: wrong "
           "answers on the fact and addition prompts; KL to SFT on sampled decoding (best-of-n: estimated from its "
           "samples); wall time of the stage that trained the row.", "",
           "| decoding | policy | gold | PPO minus row | accuracy | hallucination | abstain | KL | wall time |",
           "|---|---|---|---|---|---|---|---|---|"]
    best = {}
    for name in sorted(rows, key=lambda r: (r.split("/")[0] != "greedy", -(rows[r]["gold"] or 0))):
        dec, label = name.split("/", 1)
        r, ppo = rows[name], rows.get(f"{dec}/PPO", {})
        a, b = ppo.get("golds"), r.get("golds")
        diff = (fmt_diff(paired_bootstrap([x - y for x, y in zip(a, b)]))
                if a and b and len(a) == len(b) and label != "PPO" else "-")
        kl = "-" if r.get("kl") is None else f"{r['kl']:.2f}"
        wall = "-" if r.get("wall_s") is None else f"{r['wall_s']:.0f} s"
        out.append(f"| {dec} | {label} | {r['gold']:.3f} | {diff} | {pct(r['accuracy'])} | "
                   f"{pct(r['hallucination'])} | {pct(r['abstain'])} | {kl} | {wall} |")
        best.setdefault(dec, []).append((r["gold"], label))
    said = []
    for dec, ranked in best.items():
        top = max(g for g, _ in ranked)
        first = [label for g, label in ranked if g == top]
        line = f"{dec}, {' and '.join(first)} {'score' if len(first) > 1 else 'scores'} highest ({top:.3f})"
        ppo = next((g for g, label in ranked if label == "PPO"), None)
        if ppo is not None and "PPO" not in first:
            tied = sum(g == ppo for g, _ in ranked) > 1
            line += f", PPO ranks {1 + sum(g > ppo for g, _ in ranked)} of {len(ranked)}{' (tied)' if tied else ''}"
        said.append(line)
    return out + ["", "What it shows, by mean gold (the intervals say which differences exceed the noise): "
                  + "; ".join(said) + ". What it does not: one world at one seed on about 200 "
                  "prompts; the spread over seeds and fresh worlds is `make study`'s (docs/results.md).", ""]


def policy_table(run_dir: Path) -> list[str]:
    """Every policy-training stage of the run (`pipeline.registry`: a stage whose manifest holds a
    test evaluation against SFT, `stages.policy_eval`) on the same test prompts, decoding and
    budget, one row per stage and decoding, SFT first."""
    rows, sft = [], {}
    for name in registry.NAMES:
        m = manifest_at(run_dir / name)
        comps = ((m.extra or {}).get("evaluation") or {}).get("comparisons", {}) if m else {}
        for c in comps.values():
            sft.setdefault(c["decoding"], c["sft"])
            p = c["policy"]
            kl = f"{p['kl']:.2f}" if p.get("kl") is not None else "-"
            rows.append(f"| {name} | {c['decoding']} | {_pct(c['win_rate'])} | {_pct(p['accuracy'])} | "
                        f"{_pct(p['finish'])} | {p['gold_score']:.3f} | {kl} | {m.wall_time_s:.0f} s |")
    if not rows:
        return []
    head = [f"| SFT | {d} | - | {_pct(v['accuracy'])} | {_pct(v['finish'])} | {v['gold_score']:.3f} | 0 | - |"
            for d, v in sft.items()]
    return ["## Policies on the test prompts", "",
            "Every policy trained from SFT in this run, against the same SFT responses on the same held-out test "
            "prompts, with the same decoding and budget; the gold labeler judges, a tie counts half; 95% intervals in "
            "brackets; KL to SFT measured on the policy's own samples (sampled decoding only); wall time of the stage.",
            "", "| policy | decoding | win rate vs SFT | accuracy | finished | gold | KL | wall time |",
            "|---|---|---|---|---|---|---|---|", *head, *rows, ""]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _sft_table(evaluation: dict) -> list[str]:
    """SFT on the test prompts, per skill and overall: accuracy and finish rate with 95% intervals."""
    out = [f"{evaluation['split'].capitalize()} split, {evaluation['decoding']}, {evaluation['max_new_tokens']} new "
           f"tokens, {evaluation['prompts']} prompts; 95% intervals in brackets. `fact` asks about people seen only "
           "in pretraining.", "", "| skill | prompts | accuracy | finished |", "|---|---|---|---|"]
    for skill, s in evaluation["skills"].items():
        out.append(f"| {skill} | {s['n']} | {_pct(s['accuracy'])} | {_pct(s['finish'])} |")
    o = evaluation["overall"]
    out.append(f"| **overall** | {evaluation['prompts']} | {_pct(o['accuracy'])} | {_pct(o['finish'])} |")
    out += ["", f"Format rate {_pct(o['format'])}; gold score {o['gold_score']:.3f} (max 5)."]
    if k := evaluation.get("parent_knowledge"):
        out += ["", f"Of the fact and addition prompts, SFT answers {_pct(o['hallucination'])} wrongly. The pretrained "
                f"model completes the corpus sentence that holds the answer (`Bralo lives in` → `Vemora`) for "
                f"{_pct(k['parent_knows'])} of them; SFT is wrong on {_pct(k['hallucination_known'])} of the prompts "
                f"where it does (stored in pretraining, not drawn out by the question) and on "
                f"{_pct(k['hallucination_unknown'])} where it does not."]
    return out + [""]




def _acc(v: dict) -> str:
    """An RM accuracy ({accuracy, low, high}) with its interval; manifests before the intervals have none."""
    if "low" not in v:
        return f"{100 * v['accuracy']:.1f}%"
    return _pct({"value": v["accuracy"], "low": v["low"], "high": v["high"]})


def _rm_text(m: runs.Manifest) -> list[str]:
    """The reward model's held-out accuracy overall and per pair kind."""
    mt, data = m.metrics, m.config.get("data", {})
    overall = {"accuracy": mt.get("eval/pairwise_accuracy", float("nan"))}
    if "eval/pairwise_accuracy_low" in mt:
        overall.update(low=mt["eval/pairwise_accuracy_low"], high=mt["eval/pairwise_accuracy_high"])
    where = (f"comparisons sampled on the test prompts at {data.get('max_new_tokens', '?')} new tokens"
             if data.get("source", "world") == "world" else "held-out comparison files")
    if mt.get("eval/pairs") == 0:  # the accuracy is NaN: nothing to rank
        return [f"Held-out pairwise accuracy undefined: every held-out comparison is a tie ({where}).", ""]
    pairs = f", {mt['eval/pairs']} ranked pairs" if "eval/pairs" in mt else ""
    out = [f"Held-out pairwise accuracy vs the gold labeler: {_acc(overall)} ({where}{pairs}, ties excluded)."]
    by_kind = m.extra.get("eval_accuracy_by_pair_kind", {})
    if not by_kind:
        return out + [""]
    out += ["", "A `different_finish` pair can be ranked by the missing end token alone (a truncation cue); "
            "`correctness_same_finish` pairs differ only in whether the answer is right, so their accuracy shows "
            "whether the RM judges answers. 95% Wilson intervals, which treat the pairs of one prompt as independent.",
            ""]
    parts = m.extra.get("eval_accuracy_of_parts", {})  # a reward model with a likelihood term
    if parts:
        out[-1:] = ["", f"The score is the classifier head plus {mt.get('likelihood/coef', float('nan')):.3g} × the "
                    "log-likelihood of the response under the frozen SFT model (docs/ppo.md §13); each part alone "
                    f"ranks {_acc(parts['head']['overall'])} (head) and {_acc(parts['likelihood']['overall'])} "
                    "(likelihood) of the pairs.", ""]
    out += ["| pair kind | meaning | pairs | accuracy |" + (" head alone | likelihood alone |" if parts else ""),
            "|---|---|---|---|" + ("---|---|" if parts else "")]
    for kind, meaning in RM_PAIR_KINDS.items():
        if kind in by_kind:  # only kinds with pairs are recorded
            row = f"| {kind} | {meaning} | {by_kind[kind]['pairs']} | {_acc(by_kind[kind])} |"
            for name in ("head", "likelihood") if parts else ():
                part = parts[name]["by_kind"].get(kind)  # manifests before the length kinds have none for them
                row += f" {_acc(part) if part else '-'} |"
            out.append(row)
    if "eval/different_finish_fraction" in mt:
        out += ["", f"{mt['eval/different_finish_fraction']:.1%} of held-out pairs differ in finishing."]
    probes = m.extra.get("probes") or {}
    if probes:
        out += ["", "Probes (reward_model/probes.py): on each held-out prompt with an answer, the right answer (in the "
                "last row the abstention) against a variant; the share of prompts on which each prefers the variant.", "",
                "| variant | prompts | RM prefers it | gold judge prefers it |", "|---|---|---|---|"]
        out += [f"| {name} | {v['n']} | {100 * v['rm_prefers']:.1f}% | {100 * v['gold_prefers']:.1f}% |"
                for name, v in probes.items()]
    return out + [""]


def write_report(runs_dir: str | Path, run_name: str) -> Path:
    """Build `runs/<run>/report/report.md` (+ PNGs) from whatever stages the run has."""
    run_dir = Path(runs_dir) / run_name
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    status = runs.run_status(runs_dir, run_name)
    lines = [f"# Run `{run_name}`", "", "| stage | status | wall time | headline |", "|---|---|---|---|"]
    for r in status:
        t = f"{r['wall_time_s']:.0f}s" if r["wall_time_s"] is not None else "-"
        lines.append(f"| {r['stage']} | {r['status']} | {t} | " + ", ".join(f"{k}={_fmt(v)}" for k, v in r["metrics"].items()) + " |")
    lines.append("")
    lines.extend(leading_table(run_dir))

    def manifest(stage):
        p = run_dir / stage / "manifest.json"
        return runs.Manifest.load(p) if p.exists() else None

    def section(title, png, ok, text=""):
        if ok:
            lines.extend([f"## {title}", "", text, f"![{title}]({png})", ""] if text else [f"## {title}", "", f"![{title}]({png})", ""])

    pre = runs.read_metrics(run_dir / "pretrain" / "metrics.jsonl")
    m = manifest("pretrain")
    text = ""
    if m and m.complete:
        held_out = ("text held out in content (no sentence of it seen in training)"
                    if m.config.get("data", {}).get("source", "world") == "world" else "held-out documents")
        text = (f"Perplexity {m.metrics.get('eval/perplexity', float('nan')):.2f} on {held_out}, vs unigram baseline "
                f"{m.metrics.get('eval/unigram_perplexity', float('nan')):.2f}; fact-cloze accuracy "
                f"{m.metrics.get('eval/fact_cloze_accuracy', float('nan')):.1%}.")
    section("Pretraining", "pretrain.png", plot_lines(out / "pretrain.png", "pretrain", pre,
                                                        ["train/loss", "eval/perplexity", "train/lr"]), text)

    m = manifest("sft")
    if m and m.complete:
        groups = {"SFT (pretrained start)": {k.split("acc_")[1]: v for k, v in m.metrics.items() if k.startswith("eval/acc_")}}
        control = manifest_at(Path(runs_dir) / f"{run_name}-control" / "sft")
        if control:
            groups["SFT (random init control)"] = {k.split("acc_")[1]: v for k, v in control.metrics.items()
                                                   if k.startswith("eval/acc_")}
        evaluation = m.extra.get("evaluation")
        text = "" if evaluation else (
            f"Held-out accuracy {m.metrics.get('eval/accuracy', 0):.1%}, format rate "
            f"{m.metrics.get('eval/format_rate', 0):.1%}, pretraining-only facts {m.metrics.get('eval/fact_accuracy', 0):.1%}.")
        title = f"{evaluation['split']}-split accuracy per skill" if evaluation else "held-out accuracy per skill"
        section("SFT accuracy per skill", "sft.png", plot_bars(out / "sft.png", title, groups), text)
        if evaluation:
            lines.extend(_sft_table(evaluation))

    m = manifest("rm")
    if m and m.complete:
        hist = m.extra.get("reward_histogram", {})
        if plot_hist(out / "rm.png", "held-out rewards", hist.get("chosen", []), hist.get("rejected", [])):
            lines.extend(["## Reward model", "", *_rm_text(m), "![Reward model](rm.png)", ""])
        else:  # no histogram (old manifest): the accuracies still belong in the report
            lines.extend(["## Reward model", "", *_rm_text(m)])

    lines.extend(policy_table(run_dir))
    ppo = runs.read_metrics(run_dir / "ppo" / "metrics.jsonl")
    m = manifest("ppo")
    if ppo:
        evaluation = m.extra.get("evaluation") if m and m.complete else None
        text = ""
        if evaluation and "greedy" in evaluation.get("comparisons", {}):
            g = evaluation["comparisons"]["greedy"]
            text = (f"Test prompts, greedy vs greedy: win rate vs SFT {_pct(g['win_rate'])}; accuracy "
                    f"{_pct(g['policy']['accuracy'])} (SFT {_pct(g['sft']['accuracy'])}). Curves below: valid prompts.")
        section("PPO training", "ppo.png", plot_lines(out / "ppo.png", "ppo", ppo, [
            "rollout/score", "ppo/kl", "ppo/beta", "ppo/entropy", "rollout/eos_rate", "rollout/length",
            "eval/win_rate", "eval/accuracy", "eval/gold_score"]), text)
        if evaluation:
            lines.extend(_ppo_tables(evaluation, manifest_at(Path(runs_dir) / ablation_run(run_name) / "ppo"),
                                     m.config.get("ptx", {}).get("coef", 0.0)))
        section("Over-optimization", "overoptimization.png",
                plot_overoptimization(out / "overoptimization.png", ppo, evaluation),
                "RM score and gold score against KL to the SFT policy. A rising RM score with a flat or falling gold "
                "score is reward over-optimization; best-of-n is the baseline at the same KL.")
    samples_file = run_dir / "ppo" / "samples.jsonl"
    if samples_file.exists():
        rows = [json.loads(l) for l in samples_file.read_text().splitlines() if l.strip()]
        rows = stratified(rows, lambda r: r.get("skill", ""), 12)  # every skill, not the head of one
        lines.extend(["## Samples: SFT vs PPO (same test prompts, greedy)", "", "| skill | prompt | SFT | PPO |",
                      "|---|---|---|---|"])
        for r in rows:
            cells = [str(r.get(k, "")).replace("|", "\\|").replace("\n", " ")
                     for k in ("skill", "prompt", "sft", "ppo")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    runs.atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def ablation_run(run_name: str) -> str:
    """The run holding the PPO ablation for the alignment-tax table: the other ptx setting."""
    return f"{run_name}-ptx-ablation"


def likelihood_ablation_run(run_name: str) -> str:
    """The run holding PPO from a reward model without its likelihood term (`pipeline.driver`)."""
    return f"{run_name}-no-likelihood"


def manifest_at(stage_dir: Path) -> runs.Manifest | None:
    p = stage_dir / "manifest.json"
    if not p.exists():
        return None
    m = runs.Manifest.load(p)
    return m if m.complete else None
