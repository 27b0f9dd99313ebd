"""A finished run as a user gets it, on one tiny pretrain -> sft -> rm -> ppo chain: model
directories that behave like hub checkpoints (use_cache, a model card), a run directory that can
be copied, moved or renamed, and `python -m pipeline chat`."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import runs
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent
WORLD = ["world.num_people=20", "world.corpus_docs=300", "world.sft_examples=64", "world.eval_examples=2"]
COMMON = ["threads=1", "wandb.mode=disabled", "save_every=0", *WORLD]
PPO = ["data.num_prompts=16", "batch.rollout=4", "batch.size=4", "batch.micro=4", "epochs=1",
       "steps=1", "rollout.max_new_tokens=4", "eval.max_new_tokens=4", "eval.num_prompts=4", "eval.every=0",
       "ema.enabled=true"]
MODEL_DIRS = ("pretrain/model", "sft/model", "rm/model", "ppo/model", "ppo/model_ema")


def run_ppo(runs_dir, run_name):
    from stages.ppo import runner
    from stages.ppo.config import PPOConfig

    return runner.run(load_config(PPOConfig, [f"runs_dir={runs_dir}", f"run_name={run_name}", *COMMON, *PPO]))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """runs/orig/{pretrain,sft,rm,ppo}: every stage for a step or two (seconds in all)."""
    from stages import pretrain, rm, sft

    runs_dir = tmp_path_factory.mktemp("runs")
    common = [f"runs_dir={runs_dir}", "run_name=orig", *COMMON]
    pretrain.run(load_config(pretrain.PretrainConfig, [*common, "model.seq_len=64", "batch.micro=8",
                                                       "batch.size=8", "steps=2", "eval.every=0"]))
    sft.run(load_config(sft.SFTConfig, [*common, "steps=2", "batch.size=8",
                                        "batch.micro=8", "data.max_length=64", "eval.max_new_tokens=4"]))
    rm.run(load_config(rm.RMConfig, [*common, "data.num_prompts=8", "data.k=2", "data.max_new_tokens=4", "epochs=1",
                                     "batch.size=4", "batch.micro=4", "batch.forward=48",
                                     "batch.forward=48", "normalize.reference_size=16"]))
    run_ppo(runs_dir, "orig")
    return runs_dir / "orig"


# ----------------------------------------------------------------------------- hub-like model dirs
def test_every_model_config_keeps_use_cache(chain):
    for d in MODEL_DIRS:
        assert json.loads((chain / d / "config.json").read_text())["use_cache"] is True, d


def test_every_model_dir_has_a_card_naming_stage_parent_and_metrics(chain):
    for d in MODEL_DIRS:
        stage = d.split("/")[0]
        m = runs.Manifest.load(chain / stage / "manifest.json")
        card = (chain / d / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers\n") and f"| stage | `{stage}` |" in card, d
        assert "| run | `orig` |" in card and m.data_fingerprint in card
        parent = {"pretrain": None, "sft": "pretrain", "rm": "sft", "ppo": "rm"}[stage]
        if parent:
            assert f"the `{parent}` stage of run `orig`: `../{parent}/manifest.json`" in card, d
            assert m.parent_hash in card
        else:
            assert "| parent | none" in card
        assert m.extra["headline"] and all(f"| {k} |" in card for k in m.extra["headline"]), d
        loader = "AutoModelForSequenceClassification" if stage == "rm" else "AutoModelForCausalLM"
        assert f"{loader}.from_pretrained(path)" in card and "Chat template" in card
    assert "(EMA)" in (chain / "ppo/model_ema/README.md").read_text()


def test_card_snippets_run_and_agree_with_the_project(chain, monkeypatch):
    """The card's code, run as written: the policy's greedy reply and the reward model's score are
    the ones the project's own sampler and scorer give."""
    import contextlib
    import io
    import re

    from pipeline.evaluation import generate
    from pipeline.models import load_causal_lm, load_tokenizer
    from reward_model.model import load_reward_model
    from reward_model.scoring import forward_rewards, prompt_ids, render_span

    from pipeline.tokenizer import end_of_turn_id

    monkeypatch.chdir(chain.parent.parent)  # the snippets name the model by <runs_dir>/<run>/...
    printed, names = {}, {}
    for d in MODEL_DIRS:
        code = re.search(r"```python\n(.*?)```", (chain / d / "README.md").read_text(), re.S).group(1)
        out, names[d] = io.StringIO(), {}
        with contextlib.redirect_stdout(out):
            exec(code, names[d])
        printed[d] = out.getvalue().strip()
    tok = load_tokenizer(chain / "rm" / "model")
    rm = load_reward_model(chain / "rm" / "model", tok)
    ids, start = render_span(tok, "What is 3 + 4?", "Answer: 7.")
    expected = forward_rewards(rm, [ids], tok.pad_token_id, [start]).item()
    assert float(printed["rm/model"]) == pytest.approx(expected, abs=1e-5)
    for d in ("sft/model", "ppo/model", "ppo/model_ema"):
        tok = load_tokenizer(chain / d)
        prompt = prompt_ids(tok, "What is 3 + 4?")
        assert names[d]["inputs"]["input_ids"][0].tolist() == prompt, d
        eot = tok.convert_ids_to_tokens(end_of_turn_id(tok))
        assert f'eos_token_id=tokenizer.convert_tokens_to_ids("{eot}")' in (chain / d / "README.md").read_text()
        [(ids, _)] = generate(load_causal_lm(chain / d, tok), tok, [prompt], 64)
        assert printed[d] == tok.decode(ids, skip_special_tokens=True).strip(), d
    assert printed["pretrain/model"]


# ----------------------------------------------------------------------------- run directories move
@pytest.mark.parametrize("move", ["to another runs dir", "renamed"])
def test_a_copied_run_hands_off_from_its_own_stages(chain, tmp_path, move):
    """ppo from a copy of the run, with the original gone, so a stale absolute path cannot pass."""
    from stages.ppo.config import PPOConfig
    from stages.ppo.models import resolve_sources

    runs_dir, name = (tmp_path / "elsewhere", "orig") if move == "to another runs dir" else (chain.parent, "renamed")
    copy = runs_dir / name
    shutil.copytree(chain, copy)
    shutil.rmtree(copy / "ppo")
    away = chain.with_name(".orig-away")
    os.rename(chain, away)  # the original is gone while the copy runs; back afterwards for the other tests
    try:
        m = run_ppo(runs_dir, name)
        assert m.complete and m.parent == "../rm/manifest.json"
        assert m.extra["sft_manifest"] == str((copy / "sft" / "manifest.json").resolve())
        assert not chain.exists()
        # the hash check still holds on the relative path: an sft stage changed after rm is refused
        sft = runs.Manifest.load(copy / "sft" / "manifest.json")
        sft.metrics["changed"] = 1
        sft.save(copy / "sft")
        with pytest.raises(runs.HandoffError, match="re-run rm"):
            resolve_sources(load_config(PPOConfig, [f"runs_dir={runs_dir}", f"run_name={name}", *WORLD]))
    finally:
        os.rename(away, chain)
        shutil.rmtree(copy, ignore_errors=True)


# ----------------------------------------------------------------------------- chat
def test_chat_prompts_carry_the_history_until_reset(chain, monkeypatch):
    """What the model is asked each turn: the whole conversation in its template; after /reset, or
    past the context length (oldest exchange first), less of it."""
    import pipeline.evaluation
    from pipeline.chat import Chat
    from pipeline.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(chain / "ppo" / "model")
    asked = []

    def generate(model, tokenizer, prompts, max_new_tokens, temperature, **kw):
        asked.append(tokenizer.decode(prompts[0]))
        return [(tokenizer("Answer: ok.", add_special_tokens=False)["input_ids"], True)]

    monkeypatch.setattr(pipeline.evaluation, "generate", generate)
    chat = Chat(load_causal_lm(chain / "ppo" / "model", tok), tok, max_new_tokens=3)
    def conversation(*turns):  # user, assistant, user, ... in the template, ending with the assistant header
        roles = ("user", "assistant") * len(turns)
        return tok.decode(chat.prompt_ids([{"role": r, "content": t} for r, t in zip(roles, turns)]))

    assert chat.reply("one") == ("Answer: ok.", True)
    chat.reply("two")
    assert asked[1] == conversation("one", "Answer: ok.", "two") and "one" in asked[1]
    chat.reset()
    chat.reply("two")
    assert asked[2] == conversation("two")
    chat.reply("three")
    chat.context = len(chat.prompt_ids(chat.history + [{"role": "user", "content": "four"}]))  # one exchange too long
    chat.reply("four")
    assert asked[4] == conversation("three", "Answer: ok.", "four")
    assert [m["content"] for m in chat.history] == ["three", "Answer: ok.", "four", "Answer: ok."]


def test_chat_command_replies_resets_and_quits(chain):
    from pipeline.chat import Chat
    from pipeline.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(chain / "ppo" / "model")
    model = load_causal_lm(chain / "ppo" / "model", tok)
    # after /reset, "hi" is answered as the first message of a fresh conversation
    expected = [Chat(model, tok, max_new_tokens=6).reply(text)[0] for text in ("hello", "hi")]
    proc = subprocess.run([sys.executable, "-m", "pipeline", "chat", "orig", "--stage", "ppo", "--runs-dir",
                           str(chain.parent), "--max-new-tokens", "6"], input="hello\n/reset\nhi\n/quit\nnot read\n",
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [f"assistant> {e}" for e in expected]
    assert "(history cleared)" in proc.stderr


def test_chat_ends_at_end_of_input():
    from pipeline.chat import repl

    class Echo:
        max_new_tokens = 8

        def reply(self, text):
            return text.upper(), True

    lines, out = iter(["hello", "", "again"]), []

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert repl(Echo(), read, out.append, out.append) == 0
    assert out == ["assistant> HELLO", "assistant> AGAIN"]


def test_chat_refuses_the_reward_model(chain, capsys):
    from pipeline.__main__ import main

    assert main(["chat", "orig", "--stage", "rm", "--runs-dir", str(chain.parent)]) == 1
    assert "reward model" in capsys.readouterr().err
