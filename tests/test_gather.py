"""`shard` deals items round-robin over processes and `gather` puts them back in order, whatever
the count: shares differ by one item when the processes do not divide it (199 test prompts on 2
processes). Every caller gathers one entry per item of its share; the last test runs every
gathering evaluation on 2 processes against one."""
from types import SimpleNamespace

import pytest

from pipeline.evaluation import interleave, shard
from tests.test_ppo import tiny  # noqa: F401  (the shared fixture: a random policy and reward model)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("count", [0, 1, 2, 3, 5, 7, 199])
def test_gather_undoes_shard_for_any_count(world, count):
    items = [f"item{i}" for i in range(count)]
    parts = [shard(items, SimpleNamespace(process_index=r, num_processes=world)) for r in range(world)]
    assert sum(map(len, parts)) == count
    assert interleave(parts) == items


def test_gather_refuses_shares_that_shard_did_not_deal():
    """Several rows per item sent flat (300 + 297 rows for 100 + 99 prompts) cannot be put back."""
    with pytest.raises(RuntimeError, match=r"sizes \[300, 297\]"):
        interleave([list(range(300)), list(range(297))])
    with pytest.raises(RuntimeError, match=r"sizes \[2, 3\]"):
        interleave([[0, 2], [1, 3, 5]])


def test_every_gathering_evaluation_on_two_processes_equals_one(tiny, tmp_path):  # noqa: F811
    """5 cloze items, the SFT test prompts, 5 x 2 rm samples in 3 batches, 5 scored sequences in 3
    batches, PPO's test evaluation on 5 prompts with best-of-2/3: the second process holds one item
    (or batch) less everywhere. Both processes' results, put back in order, are one process's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.runtime import make_accelerator

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tests"))
    from uneven_gather_check import compute

    one = json.loads(json.dumps(compute(tiny.policy, tiny.reward, make_accelerator())))
    out = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--main_process_port", "0", str(root / "tests" / "uneven_gather_check.py"),
           tiny.policy, tiny.reward, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert one.pop("world") == 1 and two.pop("world") == 2
    assert len(one["sft_eval"]) % 2 == 1 and len(one["ppo_test"]["rows"]) == 5     # uneven shares
    assert one["comparisons"] == two["comparisons"] and one["cloze"] == two["cloze"]
    assert one["sft_eval"] == two["sft_eval"]
    assert one["scores"] == pytest.approx(two["scores"], abs=1e-5)
    for a, b in zip(one["ppo_test"]["rows"], two["ppo_test"]["rows"]):
        assert a[:3] == b[:3]                                    # prompt, SFT's and the policy's responses
    assert one["ppo_test"]["metrics"] == pytest.approx(two["ppo_test"]["metrics"], abs=1e-5, nan_ok=True)
    bon = _rounded(one["ppo_test"]["result"]["best_of_n"])
    assert [b["n"] for b in bon] == [1, 2, 3] and bon == _rounded(two["ppo_test"]["result"]["best_of_n"])
    for key in ("baselines", "rm_accuracy", "self_knowledge"):  # rule, best τ, threshold; the RM on samples; the probe
        assert key in one["ppo_test"]["result"]
        a, b = _flat(_rounded(one["ppo_test"]["result"][key])), _flat(_rounded(two["ppo_test"]["result"][key]))
        assert a == b, {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def _rounded(x):
    """Floats rounded to 5 places, inside any nesting of dicts and lists (float noise of batch shapes)."""
    if isinstance(x, float):
        return round(x, 5)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def _flat(x, path=""):
    """{path: leaf} of a nesting of dicts and lists: a failed comparison names what differs."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _flat(val, f"{path}/{key}").items()}
    if isinstance(x, list):
        return {k: v for i, val in enumerate(x) for k, v in _flat(val, f"{path}/{i}").items()}
    return {path: "nan" if x != x else x}  # NaN (a baseline has no RM score) equals itself here
