"""The rsft stage: the reward model's best finished sample per prompt by hand, a world run from a
complete rm stage trained and judged against SFT as ppo is (with its valid curve), an interrupted
run resumed on the same samples, a row in every tool."""
import json

import pytest

from pipeline.config import load_config
from stages import rsft
from tests.test_rm import WORLD, finished_run, sft  # noqa: F401  (fixtures: tiny sft and rm stages)

FAST = ["threads=1", "wandb.mode=disabled", *WORLD, "data.num_prompts=8", "n=8", "max_new_tokens=40", "epochs=1",
        "batch.size=4", "batch.micro=2", "log_every=1", "save_every=0", "batch.forward=24", "eval.num_prompts=6",
        "eval.max_new_tokens=5"]


def run_rsft(rm_dir, runs_dir, run_name, *extra):
    return rsft.run(load_config(rsft.RSFTConfig, [*FAST, f"parent={rm_dir}", f"runs_dir={runs_dir}",
                                                  f"run_name={run_name}", *extra]))


def test_select_best_keeps_the_top_finished_sample_per_prompt():
    prompts = ["a", "b", "c"]
    responses = ["a0", "a1", "a2", "b0", "b1", "b2", "c0", "c1", "c2"]
    finished = [True, True, False, False, True, True, False, False, False]
    scores = [0.1, 0.5, 9.0, 7.0, 0.2, 0.2, 1.0, 1.0, 1.0]
    out = rsft.select_best(prompts, responses, finished, scores, 3)
    # a: a2 scores highest but never finished; b: b0 likewise, b1 and b2 tie (the first wins); c: nothing finished
    assert [r["messages"][1]["content"] for r in out] == ["a1", "b1"]
    assert [r["messages"][0]["content"] for r in out] == ["a", "b"]
    assert out[0]["rm_score"] == 0.5 and out[0]["mean_rm_score"] == pytest.approx((0.1 + 0.5 + 9.0) / 3)


def test_world_run_trains_on_the_best_samples_and_is_judged_as_ppo(finished_run, tmp_path):  # noqa: F811
    from pipeline.report import policy_table

    rm_dir, _ = finished_run
    m = run_rsft(rm_dir, tmp_path, "w", "eval.every=1")
    assert m.status == "complete" and m.extra["n"] == 8 and 0 < m.extra["examples"] <= 8
    comps = m.extra["evaluation"]["comparisons"]
    assert set(comps) == {"greedy", "sampled"} and comps["sampled"]["policy"]["kl"] >= 0
    saved = [json.loads(r) for r in (tmp_path / "w" / "rsft" / rsft.DATA).read_text().splitlines()]
    assert len(saved) == m.extra["examples"] and all(r["rm_score"] >= r["mean_rm_score"] - 1e-6 for r in saved)
    assert m.metrics["data/selected_rm_score"] >= m.metrics["data/sample_rm_score"] - 1e-6
    curve = [json.loads(r) for r in (tmp_path / "w" / "rsft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if "eval/gold_score" in r] == [0, 1]  # the valid curve: start and end
    rows = [r for r in policy_table(tmp_path / "w") if r.startswith("| rsft |")]
    assert len(rows) == 2  # greedy and sampled, beside SFT's rows
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "w" / "rsft" / "model")


def test_an_interrupted_run_resumes_on_the_same_samples(finished_run, tmp_path, capsys):  # noqa: F811
    rm_dir, _ = finished_run
    args = ["save_every=1", "epochs=2"]
    first = run_rsft(rm_dir, tmp_path, "r", *args, "stop_after=1")
    assert first.status == "running"
    samples = (tmp_path / "r" / "rsft" / rsft.DATA).read_text()
    capsys.readouterr()
    m = run_rsft(rm_dir, tmp_path, "r", *args)
    assert m.status == "complete" and "resuming: " in capsys.readouterr().err
    assert (tmp_path / "r" / "rsft" / rsft.DATA).read_text() == samples


def test_registry_line_makes_it_a_stage_of_every_tool():
    from pipeline import launch, registry
    from pipeline.chat import CHAT_STAGES
    from pipeline.plan import STAGES as PLAN_STAGES

    assert registry.get("rsft").parents == ("rm",) and "rsft" not in registry.CHAIN
    assert "rsft" in CHAT_STAGES and "rsft" in PLAN_STAGES
    assert launch.launch_command("rsft", ["n=4"], nproc=1, accel="cpu")[-2:] == ["stages.rsft", "n=4"]


def test_prompt_files_train_without_a_gold_judge(finished_run, tmp_path):  # noqa: F811
    """Your own prompts (as the ppo stage reads them): sampled, ranked by the reward model, trained
    on; no gold labeler knows them, so no evaluation."""
    rm_dir, _ = finished_run
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?"}) + "\n" for a in range(3) for b in range(3)))
    m = run_rsft(rm_dir, tmp_path, "f", "data.source=files", f"data.files=[{data}]")
    assert m.status == "complete" and "evaluation" not in m.extra and 0 < m.extra["examples"] <= 9
    kept = [json.loads(r) for r in (tmp_path / "f" / "rsft" / rsft.DATA).read_text().splitlines()]
    assert {r["messages"][0]["content"] for r in kept} <= {f"What is {a} + {b}?" for a in range(3) for b in range(3)}
