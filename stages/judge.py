"""The gold evaluation of a policy stage with its own training loop or Trainer (dpo, rsft):
`stages.policy_eval` against the frozen SFT policy it trains from, as ppo is judged."""
from __future__ import annotations

from types import SimpleNamespace

from pipeline.distributed import full_parameters, load_frozen, shard_frozen
from pipeline.tracking import stratified
from stages.policy_eval import SKILL, TABLE_COLUMNS, EvalSettings, evaluate, make_eval_set, test_evaluation


class Judge:
    """The gold evaluation of `stages.policy_eval` for a policy stage that trains from the SFT
    model in `sft_dir` (dpo, rsft), against that frozen SFT policy: curve points during training
    (`eval.curve_split`), the reported test figures at the end. `cfg` has an `eval` section
    (`PolicyEvalConfig`) and `batch.forward`."""

    def __init__(self, cfg, accelerator, sft_dir, tokenizer, world, tracker, log):
        ref = shard_frozen(accelerator, load_frozen(accelerator, sft_dir, tokenizer, cfg.precision, cfg.attention()))
        self.models = SimpleNamespace(tokenizer=tokenizer, ref=ref, policy=None, reward=None, reward_tokenizer=None)
        self.settings = EvalSettings.of(cfg.eval, cfg.batch.forward, cfg.eval.temperature)
        self.cfg, self.accelerator, self.world, self.tracker, self.log = cfg, accelerator, world, tracker, log
        self.valid = None

    def curve(self, trained, model, step: int) -> None:
        if self.valid is None:
            self.valid = make_eval_set(self.models, self.world, self.settings, self.accelerator,
                                       self.cfg.eval.curve_split)
        with trained.autocast(), full_parameters(trained, model) as policy:
            metrics, rows = evaluate(policy, self.models, self.valid, self.world, self.settings, self.accelerator)
        self.tracker.log(metrics, step)
        self.tracker.table("eval/samples", TABLE_COLUMNS, stratified(rows, SKILL, self.cfg.eval.samples), step)
        self.log(f"eval @ {step}: gold {metrics['eval/gold_score']:.3f} (SFT {metrics['eval/sft_gold_score']:.3f}) "
                 f"| win rate {metrics['eval/win_rate']:.3f} | kl {metrics.get('eval/kl', float('nan')):.3f}")

    def test(self, trained, model, step: int) -> tuple[dict, dict, list]:
        with trained.autocast(), full_parameters(trained, model) as policy:
            metrics, evaluation, rows = test_evaluation(policy, self.models, self.world, self.settings, self.accelerator)
        self.tracker.table("test/samples", TABLE_COLUMNS, stratified(rows, SKILL, self.cfg.eval.samples), step)
        return metrics, evaluation, rows

    def final(self, trained, model, step: int) -> tuple[dict, dict]:
        """The trained policy's last valid curve point (where settings are chosen; with
        `eval.every`), then its test figures -> (test metrics, the evaluation for the manifest)."""
        if self.cfg.eval.every:
            self.curve(trained, model, step)
        metrics, evaluation, _ = self.test(trained, model, step)
        return metrics, evaluation


def hand_off(sr, tracker, trained, model, tokenizer, metrics: dict, extra: dict, step: int, what: str):
    """A judged policy stage's end: its metrics logged and summarized, `model` saved as a plain
    directory, the manifest finished with the greedy win rate and accuracy as headline, and its
    closing lines (`print_report`, `what` it trained on) -> the manifest."""
    from pipeline.distributed import save_model

    tracker.log(metrics, step)
    tracker.summary(metrics)
    model_dir = sr.dir / "model"
    save_model(trained, model, tokenizer, model_dir)
    headline = {k.replace("/", "_"): metrics[f"test/{k}"] for k in ("greedy/win_rate", "greedy/accuracy")
                if f"test/{k}" in metrics}
    manifest = sr.finish(model_dir, metrics, headline, extra=extra)
    tracker.finish()
    if sr.accelerator.is_main_process:
        print_report(manifest, extra.get("evaluation"), what)
    return manifest


def print_report(manifest, evaluation: dict | None, what: str) -> None:
    """A judged policy stage's closing lines: its time, `what` it trained on, and per decoding its
    win rate, accuracy and gold score against SFT's on the test prompts, KL where sampled."""
    from pathlib import Path

    from pipeline.stats import fmt_rate

    print(f"\n{manifest.stage} done in {manifest.wall_time_s:.0f}s: {what}")
    for c in (evaluation or {}).get("comparisons", {}).values():
        p, s = c["policy"], c["sft"]
        kl = f", KL {p['kl']:.3f}" if p.get("kl") is not None else ""
        print(f"  {c['decoding']:<8} win rate vs SFT {fmt_rate(c['win_rate'])} | accuracy {fmt_rate(p['accuracy'])} "
              f"(SFT {fmt_rate(s['accuracy'])}) | gold {p['gold_score']:.3f} (SFT {s['gold_score']:.3f}){kl}")
    print(f"  model: {Path(manifest.config['runs_dir']) / manifest.run_name / manifest.stage / manifest.model_dir}")
