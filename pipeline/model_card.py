"""The model card (`README.md`) that every stage writes into its model directory, so that the
directory reads like a hub checkpoint: what the model is, where it came from, how well it did and
how to load it with transformers alone. Written once, by `StageRun.finish`, from the manifest."""
from __future__ import annotations

import time
from pathlib import Path

from pipeline import registry, runs


# What each stage's model is, for its card (the EMA copy of the PPO policy has its own line).
PURPOSE = {**{name: s.purpose for name, s in registry.STAGES.items()},
           "ppo-ema": "An exponential moving average of the PPO policy's weights (evaluation and export only)."}


def model_card(m: runs.Manifest, model_dir: Path, parent: runs.Parent | None, ema: bool = False) -> str:
    """`README.md` of a stage's model directory: what the model is, where it came from (stage, run,
    parent, data), its headline metrics and how to load it with transformers alone. The front
    matter is the Hugging Face hub's, so the directory reads like a hub checkpoint."""
    cfg, rm = m.config, registry.get(m.stage).produces == "reward_model"
    where = f"{cfg.get('runs_dir', 'runs')}/{m.run_name}/{m.stage}/{model_dir.name}"
    if parent is not None:
        origin = (f"the `{parent.manifest.stage}` stage of run `{parent.manifest.run_name}`: `{m.parent}` "
                  f"(from the stage directory; manifest sha256 `{m.parent_hash}`)")
    else:
        given = [f"{k} `{cfg[k]['name_or_path']}`" for k in ("model", "policy", "reward")
                 if (cfg.get(k) or {}).get("name_or_path")]
        origin = ", ".join(given) or "none: trained from a random initialisation"
    data = cfg.get("data") or {}
    if data.get("source") == "world":
        world = cfg.get("world") or {}
        source = f"the built-in world (seed {world.get('seed')}, {world.get('num_people')} people)"
    else:
        source = ", ".join(f"`{f}`" for f in data.get("files") or []) or str(data.get("source", "-"))
    if m.data_fingerprint:
        source += f"; fingerprint `{m.data_fingerprint}`"
    purpose = PURPOSE["ppo-ema" if ema else m.stage]
    norm = cfg.get("normalize") or {}
    if rm and (m.extra or {}).get("reward_model"):
        purpose += f" It is a {m.extra['reward_model']}."
    if rm and norm.get("enabled"):
        purpose += (f" Its score is normalised to mean 0{' and std 1' if norm.get('std') else ''} over SFT samples, "
                    "folded into the head.")
    spec = _likelihood_spec(model_dir) if rm else None  # reward_model/likelihood.py
    likelihood = spec is not None
    if likelihood:
        inside = spec["model"] == "likelihood"
        purpose += (" Its score adds a likelihood term: the classifier's logit plus `coef` times the log-likelihood "
                    "of the response under the frozen SFT model "
                    + ("copied into `likelihood/`" if inside else
                       f"at `{spec['model']}` (relative to this directory; `model_abs` if moved apart), not copied")
                    + ", less `center` (`config.reward_likelihood`, with the SFT weights' `fingerprint`).")
        if (m.extra or {}).get("likelihood_residual"):
            purpose += (" The classifier alone is not the reward: it was trained over the likelihood term and offsets "
                        "its preferences.")
    chat = (f"make chat RUN={m.run_name} STAGE={m.stage}{' ARGS=--ema' if ema else ''}" if cfg.get("runs_dir") == "runs"
            else f"python -m pipeline chat {m.run_name} --stage {m.stage} --runs-dir {cfg.get('runs_dir')}"
                 f"{' --ema' if ema else ''}")
    ended = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(m.ended or time.time()))
    lines = ["---", "library_name: transformers", f"pipeline_tag: {'text-classification' if rm else 'text-generation'}",
             f"tags: [alignment-pipeline, {m.stage}]", "---", "",
             f"# {m.run_name} / {m.stage}{' (EMA)' if ema else ''}", "",
             purpose, "",
             "| | |", "|---|---|", f"| stage | `{m.stage}` |", f"| run | `{m.run_name}` |", f"| parent | {origin} |",
             f"| data | {source} |", f"| finished | {ended}, {m.wall_time_s or 0:.0f} s |",
             f"| code | git `{(m.git_commit or 'unknown')[:12]}`, transformers {m.versions.get('transformers', '?')} |",
             "", "## Headline metrics", "", "| metric | value |", "|---|---|",
             *(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
               for k, v in m.extra.get("headline", {}).items()),
             "", "All final metrics are in `../manifest.json`, every logged one in `../metrics.jsonl`.", "",
             "## Load it", "", "```python"]
    # The snippets render like `pipeline.tokenizer.chat_ids` (template text, then ids with no second
    # BOS) and name the template's end-of-turn token, so they work for any template, not only ours.
    eot = _end_of_turn(model_dir) if m.stage != "pretrain" else None
    if rm:
        lines += ["from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                  f'path = "{where}"', "tokenizer = AutoTokenizer.from_pretrained(path)",
                  "model = AutoModelForSequenceClassification.from_pretrained(path)",
                  'messages = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "Answer: 7."}]',
                  "text = tokenizer.apply_chat_template(messages, tokenize=False)",
                  f'text = text[: text.rindex("{eot}") + len("{eot}")]  # the score is read at the end of the turn',
                  'inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")']
        if likelihood:
            lines += ["score = model(**inputs).logits[0, 0].item()",
                      "# the likelihood term: coef * (log p(response | prompt) - center) under the frozen SFT model",
                      "import os", "import torch", "from transformers import AutoModelForCausalLM", "",
                      "term = model.config.reward_likelihood",
                      'lm_dir = os.path.join(path, term["model"])  # relative to the reward model',
                      'if not os.path.isdir(lm_dir):',
                      '    lm_dir = term["model_abs"]',
                      "lm = AutoModelForCausalLM.from_pretrained(lm_dir)",
                      "prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)",
                      'start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])  # first response token',
                      'ids = inputs["input_ids"][0]',
                      "with torch.no_grad():",
                      "    logp = torch.log_softmax(lm(**inputs).logits[0, :-1].float(), -1)",
                      "log_lik = logp.gather(-1, ids[1:, None])[start - 1:].sum().item()",
                      'print(score + term["coef"] * (log_lik - term["center"]))', "```", ""]
        else:
            lines += ["print(model(**inputs).logits[0, 0].item())", "```", ""]
    elif m.stage == "pretrain":
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'path = "{where}"', "tokenizer = AutoTokenizer.from_pretrained(path)",
                  "model = AutoModelForCausalLM.from_pretrained(path)",
                  'inputs = tokenizer("The capital of", return_tensors="pt")',
                  "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))", "```", ""]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'path = "{where}"', "tokenizer = AutoTokenizer.from_pretrained(path)",
                  "model = AutoModelForCausalLM.from_pretrained(path)",
                  'messages = [{"role": "user", "content": "What is 3 + 4?"}]',
                  "text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
                  'inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")',
                  "out = model.generate(**inputs, max_new_tokens=64, do_sample=False,",
                  f'                     eos_token_id=tokenizer.convert_tokens_to_ids("{eot}"))  # end of the turn',
                  'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    if m.stage == "pretrain":
        lines.append("**Chat template.** The tokenizer carries the chat template that later stages train with, but "
                     "pretraining never saw it: prompt this model with plain text.")
    else:
        lines.append("**Chat template.** The tokenizer carries the chat template this model was trained with "
                     f"(`chat_template.jinja`); an assistant turn ends with `{eot}`. "
                     + ("The score is read at that token." if rm else
                        f"Generation stops there. To talk to the model: `{chat}`."))
    return "\n".join(lines) + "\n"


def _likelihood_spec(model_dir: Path) -> dict | None:
    """The reward model's likelihood term as its config records it, or None."""
    import json

    config = model_dir / "config.json"
    return json.loads(config.read_text()).get("reward_likelihood") if config.exists() else None


def _end_of_turn(model_dir: Path) -> str:
    """The token that ends an assistant turn in the saved tokenizer's chat template."""
    from transformers import AutoTokenizer

    from pipeline.tokenizer import end_of_turn_id

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))
