"""The dpo stage: TRL's DPOTrainer on the rm stage's comparisons (world) or on preference files,
pairs rendered as the reward model sees them, evaluated against SFT as ppo is, stopped and resumed,
LoRA merged, one clear error for bad data, a row in the report's policy table."""
import json

import pytest

from pipeline.config import load_config
from pipeline.stage import DataError
from stages import dpo
from tests.test_rm import WORLD, sft  # noqa: F401  (the fixture: a tiny complete sft stage)

FAST = ["threads=1", "wandb.mode=disabled", *WORLD, "data.num_prompts=12", "data.k=3", "data.max_new_tokens=5",
        "epochs=1", "batch.size=8", "batch.micro=4", "log_every=1", "save_every=0",
        "batch.forward=48", "batch.forward=48", "eval.num_prompts=6", "eval.max_new_tokens=5", "eval.every=2"]


def run_dpo(sft, runs_dir, run_name, *extra):  # noqa: F811
    return dpo.run(load_config(dpo.DPOConfig, [*FAST, f"parent={sft}", f"runs_dir={runs_dir}", f"run_name={run_name}",
                                               *extra]))


def test_pairs_are_every_ranked_pair_better_first_rendered_as_the_reward_model_sees_them(sft):  # noqa: F811
    from pipeline.models import load_tokenizer
    from pipeline.records import Comparison
    from reward_model.scoring import render_span

    tok = load_tokenizer(sft / "model")
    c = Comparison("What is 2 + 3?", ["Answer: 5.", "Answer: 6.", "Answer: 7."], [1, 0, 1], [True, True, False])
    pairs = dpo._pairs(tok, [c], max_length=512)
    assert len(pairs) == 2  # response 1 beats 0 and 2; the tie between 0 and 2 is no pair
    better, start = render_span(tok, c.prompt, "Answer: 6.", True)
    worse, other = render_span(tok, c.prompt, "Answer: 7.", False)  # cut off: no end-of-turn token
    assert pairs[1] == {"prompt_ids": better[:start], "chosen_ids": better[start:], "rejected_ids": worse[other:]}
    assert all(p["chosen_ids"] == better[start:] for p in pairs)
    assert dpo._pairs(tok, [c], max_length=len(better) - 1) == []  # too long: dropped


def test_world_run_trains_evaluates_against_sft_and_reports(sft, tmp_path):  # noqa: F811
    from pipeline.report import policy_table

    m = run_dpo(sft, tmp_path, "w")
    assert m.status == "complete"
    comps = m.extra["evaluation"]["comparisons"]
    assert set(comps) == {"greedy", "sampled"} and comps["sampled"]["policy"]["kl"] >= 0
    assert m.extra["pairs"] > 0 and m.metrics["train/loss"] == m.metrics["train/loss"]
    # the same comparisons the rm stage learns from at this seed
    from reward_model.comparisons import SAVED
    from tests.test_rm import run_rm

    rm = run_rm(sft, tmp_path, "w", "epochs=1")
    assert rm.status == "complete"
    for name in SAVED:
        assert (tmp_path / "w" / "dpo" / name).read_text() == (tmp_path / "w" / "rm" / name).read_text(), name
    rows = [r for r in policy_table(tmp_path / "w") if r.startswith("| dpo |")]
    assert len(rows) == 2  # greedy and sampled, beside SFT's rows
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "w" / "dpo" / "model")  # a plain directory
    assert "DPO" in (tmp_path / "w" / "dpo" / "model" / "README.md").read_text()


def test_policy_moves_from_sft_towards_the_preferred_responses(sft, tmp_path):  # noqa: F811
    """On its own training pairs the trained policy ranks the chosen response above the rejected
    one (relative to SFT) more often than not: DPO's implicit reward accuracy."""
    m = run_dpo(sft, tmp_path, "learn", "epochs=4", "optim.lr=3e-3", "eval.every=0")
    rows = [r for r in (tmp_path / "learn" / "dpo" / "metrics.jsonl").read_text().splitlines() if r]
    accuracies = [json.loads(r)["train/rewards/accuracies"] for r in rows if "train/rewards/accuracies" in r]
    assert accuracies and max(accuracies[len(accuracies) // 2:]) > 0.5, accuracies
    assert m.metrics["train/loss"] < 0.6931  # below log 2, the loss of the reference itself


def test_the_valid_curve_does_not_change_the_training(sft, tmp_path):  # noqa: F811
    """Evaluating every step (sampling and forwards of the policy in training) changes nothing of
    the training: the same losses as a run that never evaluates during training."""
    def losses(run):
        rows = [json.loads(r) for r in (tmp_path / run / "dpo" / "metrics.jsonl").read_text().splitlines() if r]
        return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]

    run_dpo(sft, tmp_path, "every", "epochs=2", "eval.every=1")
    run_dpo(sft, tmp_path, "never", "epochs=2", "eval.every=0")
    assert losses("every") == losses("never") and len(losses("never")) >= 4


def test_preference_files_lora_and_resume(sft, tmp_path, capsys):  # noqa: F811
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": f"Answer: {a + b}.", "rejected": f"Answer: {a + b + 1}."}
            for a in range(4) for b in range(4)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["data.source=files", f"data.files=[{data}]", "lora.enabled=true", "lora.r=4", "steps=4",
            "batch.size=4", "batch.micro=2", "save_every=2"]
    first = run_dpo(sft, tmp_path, "f", *args, "stop_after=2")
    assert first.status == "running" and (tmp_path / "f" / "dpo" / "checkpoints" / "checkpoint-2").exists()
    capsys.readouterr()
    m = run_dpo(sft, tmp_path, "f", *args)
    assert "resuming from" in capsys.readouterr().err
    assert m.status == "complete" and m.extra["lora"] and "evaluation" not in m.extra  # no gold judge for user data
    steps = [json.loads(r).get("step") for r in (tmp_path / "f" / "dpo" / "metrics.jsonl").read_text().splitlines() if r]
    assert max(s for s in steps if s is not None) == 4
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "f" / "dpo" / "model").state_dict()
    assert not any("lora" in k for k in merged)  # the adapter is merged into plain weights


def test_a_bad_record_is_one_clear_error_and_nothing_written(sft, tmp_path):  # noqa: F811
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 2"):
        run_dpo(sft, tmp_path, "bad", "data.source=files", f"data.files=[{data}]")
    assert not (tmp_path / "bad" / "dpo" / "manifest.json").exists()


def test_registry_line_makes_it_a_stage_of_every_tool():
    from pipeline import launch, registry
    from pipeline.chat import CHAT_STAGES
    from pipeline.plan import STAGES as PLAN_STAGES

    assert registry.get("dpo").parents == ("sft",) and "dpo" not in registry.CHAIN
    assert "dpo" in CHAT_STAGES and "dpo" in PLAN_STAGES
    assert launch.launch_command("dpo", ["beta=0.2"], nproc=1, accel="cpu")[-2:] == ["stages.dpo", "beta=0.2"]
