"""Model families other than the project's own: tiny random Llama-3-style, Qwen2-style (ChatML),
Gemma-style (no system role) and GPT-2-style (no chat template, no pad) checkpoints, built offline
with a tokenizer trained here on the family's special tokens and the family's published chat
template WITHOUT `{% generation %}` markers, as such checkpoints ship.

What the chat template decides and must never be assumed: which tokens are the assistant's (the
SFT loss mask), which token ends a turn (stopping, "finished", where the RM reads its score),
whether there is a system role, and whether rendering then tokenizing adds a second BOS."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from pipeline.config import WorldConfig, load_config

WORLD_CFG = dict(num_people=20, corpus_docs=300, sft_examples=64, eval_examples=3)
WORLD = [f"world.{k}={v}" for k, v in WORLD_CFG.items()]
COMMON = ["threads=1", "wandb.mode=disabled", "save_every=0", *WORLD]

# Published templates (Meta-Llama-3-8B-Instruct, Qwen2-7B-Instruct, gemma-2-2b-it), verbatim but
# for whitespace: none has generation markers.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


@dataclass
class Family:
    arch: str
    bos: str | None            # None: the tokenizer has no BOS (Qwen2)
    eos: str
    pad: str | None            # None: no pad token (the stages add a distinct one)
    template: str | None       # None: no chat template (the stages install the project's)
    end_of_turn: str
    add_bos: bool = False      # the tokenizer's post-processor prepends BOS (Llama-3, Gemma)
    extra: list[str] = field(default_factory=list)
    system_role: bool = True
    vocab: int = 400


FAMILIES = {
    "llama3": Family("llama", "<|begin_of_text|>", "<|end_of_text|>", None, LLAMA3, "<|eot_id|>", add_bos=True,
                     extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], vocab=448),
    # a Qwen2 base checkpoint: eos and pad are both <|endoftext|>, the ChatML turn ends with <|im_end|>
    "qwen2": Family("qwen2", None, "<|endoftext|>", "<|endoftext|>", CHATML, "<|im_end|>",
                    extra=["<|im_start|>", "<|im_end|>"]),
    "gemma": Family("gemma", "<bos>", "<eos>", "<pad>", GEMMA, "<end_of_turn>", add_bos=True,
                    extra=["<start_of_turn>", "<end_of_turn>"], system_role=False),
    "gpt2": Family("gpt2", "<|endoftext|>", "<|endoftext|>", None, None, "<|endoftext|>"),
}


def family_tokenizer(fam: Family, texts: list[str]):
    """A byte-level BPE trained on `texts` with the family's special tokens, as its checkpoints ship."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    named = [t for t in (fam.pad, fam.bos, fam.eos) if t]
    specials = list(dict.fromkeys(named + fam.extra))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=fam.vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if fam.add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B", special_tokens=[(fam.bos, tok.token_to_id(fam.bos))])
    kwargs = {"eos_token": fam.eos}
    if fam.bos:
        kwargs["bos_token"] = fam.bos
    if fam.pad:
        kwargs["pad_token"] = fam.pad
    others = [t for t in specials if t not in named]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=others, **kwargs)
    if fam.template:
        fast.chat_template = fam.template
    return fast


def family_model(fam: Family, tok):
    """A tiny random model of the family's architecture for `tok`."""
    import transformers as tf

    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if fam.arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, **ids))
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **ids)
    if fam.arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**sizes))
    if fam.arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**sizes))
    return tf.GemmaForCausalLM(tf.GemmaConfig(head_dim=16, **sizes))


@pytest.fixture(scope="module")
def world():
    from pipeline.world import World

    return World(WorldConfig(**WORLD_CFG))


@pytest.fixture(scope="module")
def checkpoints(world, tmp_path_factory):
    """family name -> directory of a tiny random checkpoint (built on first use)."""
    root = tmp_path_factory.mktemp("families")
    texts = world.corpus() + [m["content"] for ex in world.sft_examples() for m in ex["messages"]]
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            fam = FAMILIES[name]
            tok = family_tokenizer(fam, texts)
            torch.manual_seed(0)
            model = family_model(fam, tok)
            if name == "llama3":  # as Llama-3-Instruct ships: its own sampling settings and two stop ids
                from transformers import GenerationConfig

                model.generation_config = GenerationConfig(
                    do_sample=True, temperature=0.6, top_p=0.9, bos_token_id=tok.bos_token_id,
                    eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids(fam.end_of_turn)])
            model.save_pretrained(root / name)
            tok.save_pretrained(root / name)
            built[name] = root / name
        return built[name]

    return get


def tokenizer_of(checkpoints, name: str):
    from pipeline.models import load_tokenizer

    return load_tokenizer(checkpoints(name))  # what every stage does: pad and template ensured


def bos_count(tok, ids: list[int]) -> int:
    """BOS tokens at the start of `ids` (GPT-2's BOS is also its eos, which may end a sequence)."""
    n = 0
    while tok.bos_token_id is not None and n < len(ids) and ids[n] == tok.bos_token_id:
        n += 1
    return n


# ----------------------------------------------------------------------------- the template
@pytest.mark.parametrize("name", FAMILIES)
def test_end_of_turn_token_comes_from_the_template(checkpoints, name):
    from pipeline.tokenizer import end_of_turn_id

    tok = tokenizer_of(checkpoints, name)
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids(FAMILIES[name].end_of_turn)
    assert tok.pad_token_id not in (None, tok.eos_token_id, end_of_turn_id(tok))


def test_pad_never_hides_the_end_of_turn_token(checkpoints):
    """A checkpoint whose pad token is its end-of-turn token (common in Llama-3 fine-tunes) gets a
    distinct pad: masks and the RM's pooling skip pad tokens."""
    from transformers import AutoTokenizer

    from pipeline.tokenizer import end_of_turn_id, ensure_chat_ready

    tok = AutoTokenizer.from_pretrained(checkpoints("llama3"))
    tok.pad_token = "<|eot_id|>"
    changes = ensure_chat_ready(tok)
    assert tok.pad_token_id not in (tok.eos_token_id, end_of_turn_id(tok)) and "end-of-turn" in changes[-1]


MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
              {"role": "assistant", "content": "Answer: 5."}, {"role": "user", "content": "And 4 + 4?"},
              {"role": "assistant", "content": "Answer: 8."}]


def _segments(ids: list[int], mask: list) -> list[list[int]]:
    """Runs of consecutive masked tokens."""
    out, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("name", FAMILIES)
def test_assistant_mask_is_exactly_the_assistant_turns(checkpoints, name):
    """Each assistant turn's content and end-of-turn token carry loss; nothing else (headers, the
    user's turns, the system prompt, ChatML's newline after <|im_end|>). Gemma has no system
    role: the system message joins the first user turn."""
    from pipeline.tokenizer import supports_system_role
    from stages.sft import sft_features

    tok = tokenizer_of(checkpoints, name)
    eot = FAMILIES[name].end_of_turn
    assert supports_system_role(tok) == FAMILIES[name].system_role
    ex = sft_features(tok, {"messages": MULTI_TURN}, "messages")
    ids, mask = ex["input_ids"], ex["assistant_masks"]
    assert [tok.decode(s) for s in _segments(ids, mask)] == [f"Answer: 5.{eot}", f"Answer: 8.{eot}"]
    assert "Be brief." in tok.decode(ids)
    # prompt/completion (strings) and conversational prompt/completion: loss on the completion only
    pc = sft_features(tok, {"prompt": "What is 2 + 3?", "completion": "Answer: 5."}, "prompt_completion")
    assert [tok.decode(s) for s in _segments(pc["input_ids"], pc["assistant_masks"])] == [f"Answer: 5.{eot}"]
    conv = sft_features(tok, {"prompt": MULTI_TURN[:4], "completion": MULTI_TURN[4:]}, "prompt_completion")
    assert [tok.decode(s) for s in _segments(conv["input_ids"], conv["assistant_masks"])] == [f"Answer: 8.{eot}"]
    # plain text: every token, ended by eos
    text = sft_features(tok, {"text": "Bralo lives in Vemora."}, "text")
    assert all(text["assistant_masks"]) and text["input_ids"][-1] == tok.eos_token_id
    assert bos_count(tok, text["input_ids"]) == (1 if tok.bos_token_id is not None else 0)


@pytest.mark.parametrize("name", FAMILIES)
def test_rendered_and_tokenized_prompt_has_one_bos(checkpoints, name):
    """Every path that renders a chat and tokenizes it: at most one BOS. The naive
    `tokenizer(apply_chat_template(..., tokenize=False))` gives two with the families whose
    tokenizer prepends BOS and whose template writes it too (Llama-3, Gemma)."""
    from pipeline.sft_eval import chat_prompt_ids
    from reward_model.scoring import prompt_ids, render
    from stages.ppo.rollout import encode_prompts
    from stages.sft import sft_features

    tok = tokenizer_of(checkpoints, name)
    user = [{"role": "user", "content": "What is 2 + 3?"}]
    paths = {"sft_eval": chat_prompt_ids(tok, ["What is 2 + 3?"])[0], "rollout": encode_prompts(tok, ["What is 2 + 3?"])[0],
             "rm_sampling": prompt_ids(tok, user), "rm_scoring": render(tok, user, "Answer: 5."),
             "sft": sft_features(tok, {"messages": MULTI_TURN}, "messages")["input_ids"]}
    for path, ids in paths.items():
        assert bos_count(tok, ids) <= 1, path
    naive = tok(tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True))["input_ids"]
    if FAMILIES[name].add_bos:
        assert bos_count(tok, naive) == 2  # the trap the paths above avoid


@pytest.mark.parametrize("name", FAMILIES)
def test_reward_model_reads_the_end_of_turn_token(checkpoints, name):
    """A finished response is scored with its end-of-turn token as the last token (nothing the
    template writes after it); an unfinished one without it."""
    from pipeline.tokenizer import end_of_turn_id
    from reward_model.scoring import render

    tok = tokenizer_of(checkpoints, name)
    done = render(tok, "What is 2 + 3?", "Answer: 5.", finished=True)
    cut = render(tok, "What is 2 + 3?", "Answer: 5.", finished=False)
    assert done[-1] == end_of_turn_id(tok) and tok.decode(done[-4:-1]).endswith("5.")
    assert cut == done[:-1]


def test_ptx_sequences_learn_the_turn_through_its_end(checkpoints, world):
    """PPO-ptx demonstrations carry the SFT mask: the response and its end-of-turn token."""
    from stages.ppo.config import PPOConfig
    from stages.ppo.data import load_ptx

    tok = tokenizer_of(checkpoints, "qwen2")
    cfg = load_config(PPOConfig, [*WORLD, "ptx.coef=0.1"])
    data = load_ptx(cfg, world, tok)
    ids, labels = data.seqs[0]
    learned = tok.decode([t for t in labels if t != -100])
    assert learned.endswith("<|im_end|>") and learned == world.sft_examples()[0]["messages"][1]["content"] + "<|im_end|>"


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_pure_temperature_whatever_the_checkpoint_says(checkpoints, tmp_path):
    """A checkpoint whose generation_config sets repetition_penalty, top_p, top_k, min_p and a list
    of eos ids covering every token but the end of turn: the sampler's per-step distribution is
    exactly softmax(logits / τ) of the teacher-forced forward, and generation stops only at the
    end-of-turn token."""
    from transformers import GenerationConfig

    from pipeline.evaluation import KeyedSampling, generate_ids, generation_config, gumbel_noise, row_keys
    from pipeline.models import load_causal_lm
    from pipeline.tokenizer import end_of_turn_id
    from stages.ppo.functional import truncate_at_stop
    from stages.ppo.rollout import queries, sequence_inputs, token_logprobs

    tok = tokenizer_of(checkpoints, "llama3")
    eot = end_of_turn_id(tok)
    stubborn = GenerationConfig(do_sample=True, temperature=1.3, top_k=5, top_p=0.5, min_p=0.2, repetition_penalty=1.5,
                                eos_token_id=[i for i in range(len(tok)) if i not in (eot, tok.pad_token_id)])
    model = load_causal_lm(checkpoints("llama3"), tok)
    model.generation_config = stubborn
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_causal_lm(tmp_path, tok).eval()
    assert model.generation_config.repetition_penalty == 1.5 and model.generation_config.min_p == 0.2
    prompts = ["What is the last word? red fox", "What is 3 + 4?", "Write in capitals: sun cat", "What is 2 + 2?"] * 4
    q, qm = queries(tok, prompts, "cpu")
    T, tau = 12, 0.7
    config = generation_config(eot, tok.pad_token_id, T)
    config.output_scores, config.return_dict_in_generate = True, True  # scores: after every logits processor
    keys = row_keys("test/families", range(len(prompts)))
    gen = generate_ids(model, q, qm, config, KeyedSampling(keys, tau))
    assert model.generation_config is not None and model.generation_config.min_p == 0.2  # restored after the call
    sampled = gen.sequences[:, q.shape[1]:]
    # the scores are z/τ + Gumbel noise (argmax = the sample); without the noise, what was sampled from
    noise = torch.stack([gumbel_noise(keys, t, s.shape[-1]) for t, s in enumerate(gen.scores)], 1)
    behaviour = torch.log_softmax(torch.stack(gen.scores, 1).float() - noise, -1).gather(-1, sampled[..., None])[..., 0]
    ids, mask, _, has_stop = truncate_at_stop(sampled, eot, tok.pad_token_id)
    with torch.no_grad():
        teacher = token_logprobs(model, *sequence_inputs(q, qm, ids, mask), ids, tau)
    torch.testing.assert_close(behaviour[mask], teacher[mask], atol=1e-4, rtol=1e-4)
    # stops only at the end of turn: the checkpoint's eos list would have ended every row at once
    assert sampled.shape[1] == T and not has_stop.all()
    for row, stopped in zip(sampled.tolist(), has_stop.tolist()):
        if stopped:
            assert all(t == tok.pad_token_id for t in row[row.index(eot) + 1:])


# ----------------------------------------------------------------------------- the four stages
def run_chain(checkpoints, name: str, runs_dir: Path) -> dict:
    """Continued pretraining -> sft -> rm -> ppo from the family's checkpoint, a few steps each.
    Returns {stage: (manifest, seconds)}."""
    from stages import pretrain, rm, sft
    from stages.ppo import config as ppo_config
    from stages.ppo import run as ppo_run

    base = [*COMMON, f"runs_dir={runs_dir}", f"run_name={name}"]
    plan = [
        ("pretrain", pretrain.PretrainConfig, pretrain.run,
         [f"model.name_or_path={checkpoints(name)}", "model.seq_len=64", "steps=2", "batch.micro=8",
          "batch.size=8", "eval.every=0", "eval.blocks=4"]),
        ("sft", sft.SFTConfig, sft.run,
         ["steps=3", "batch.size=8", "batch.micro=8", "data.max_length=64",
          "eval.max_new_tokens=6"]),
        ("rm", rm.RMConfig, rm.run,
         ["data.num_prompts=8", "data.k=2", "data.eval_k=2", "data.max_new_tokens=6", "epochs=1",
          "batch.size=4", "batch.micro=4", "normalize.reference_size=16"]),
        ("ppo", ppo_config.PPOConfig, ppo_run,
         ["steps=1", "batch.rollout=4", "batch.size=4", "batch.micro=4", "epochs=1",
          "data.num_prompts=8", "rollout.max_new_tokens=6", "eval.max_new_tokens=6", "eval.num_prompts=4"]),
    ]
    out = {}
    for stage, schema, run, extra in plan:
        t0 = time.perf_counter()
        manifest = run(load_config(schema, [*base, *extra]))
        out[stage] = (manifest, time.perf_counter() - t0)
        assert manifest.complete, (name, stage, manifest.status)
    return out


@pytest.fixture(scope="module")
def chains(checkpoints, tmp_path_factory):
    """family name -> (runs dir, {stage: (manifest, seconds)}), each chain run once on first use."""
    root = tmp_path_factory.mktemp("chains")
    done = {}

    def get(name: str):
        if name not in done:
            done[name] = (root, run_chain(checkpoints, name, root))
            print(f"\n{name}: " + ", ".join(f"{s} {t:.1f}s" for s, (_, t) in done[name][1].items()))
        return done[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_four_stages_run_on_the_family(chains, name):
    """Continued pretraining, SFT, RM and PPO complete on the family (about 3 s per family)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.tokenizer import end_of_turn_id

    root, stages = chains(name)
    assert [s for s in stages] == ["pretrain", "sft", "rm", "ppo"]
    sft_dir = root / name / "sft" / "model"
    # the handoff loads with plain transformers and keeps the family's template and end of turn
    tok = AutoTokenizer.from_pretrained(sft_dir)
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids(FAMILIES[name].end_of_turn)
    assert type(AutoModelForCausalLM.from_pretrained(sft_dir)).__name__.lower().startswith(FAMILIES[name].arch)
    assert 0.0 <= stages["sft"][0].metrics["eval/format_rate"] <= 1.0
    rm = stages["rm"][0].metrics
    assert rm["eval/pairs"] > 0 and math.isfinite(rm["eval/pairwise_accuracy"]) and 0 <= rm["eval/pairwise_accuracy"] <= 1
    assert "eval/win_rate" in stages["ppo"][0].metrics or "eval/gold_score" in stages["ppo"][0].metrics


# ----------------------------------------------------------------------------- RM of another family
def test_ppo_with_a_reward_model_of_another_family(chains, tmp_path):
    """Policy: the Llama-3-style SFT model; reward model: the Qwen2-style one. The RM scores the
    decoded response re-rendered in its own template and tokenizer, read at <|im_end|>; the critic
    reads the policy's ids, so it is the policy's backbone (embeddings of the policy's size)."""
    from pipeline.runtime import make_accelerator
    from stages.ppo import run
    from stages.ppo.config import PPOConfig
    from stages.ppo.models import load_models, resolve_sources
    from stages.ppo.rollout import build_rollout, queries

    root, _ = chains("llama3")
    chains("qwen2")
    policy_dir, reward_dir = root / "llama3" / "sft" / "model", root / "qwen2" / "rm" / "model"
    cfg = load_config(PPOConfig, [*COMMON, f"runs_dir={tmp_path}", f"policy.name_or_path={policy_dir}",
                                  f"reward.name_or_path={reward_dir}", "steps=1", "batch.rollout=4",
                                  "batch.size=4", "batch.micro=4", "epochs=1", "data.num_prompts=8",
                                  "rollout.max_new_tokens=6", "eval.max_new_tokens=6", "eval.num_prompts=4"])
    models = load_models(cfg, resolve_sources(cfg), torch.device("cpu"))
    tok, rm_tok = models.tokenizer, models.reward_tokenizer
    assert len(tok) != len(rm_tok)
    critic = models.value_model.critic
    assert critic.get_input_embeddings().weight.shape[0] == len(tok)
    assert models.critic_source.startswith("policy") and type(critic).__name__.startswith("Llama")
    # fixed responses: the end of turn at varied places, one never stops
    prompts = ["What is the last word? red fox", "What is 3 + 4?", "Write in capitals: sun cat", "What is 2 + 2?"]
    g = torch.Generator().manual_seed(5)
    sampled = torch.randint(10, len(tok) - 10, (4, 6), generator=g)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    for row, at in enumerate([2, 5, None, 0]):
        if at is not None:
            sampled[row, at] = eot
    q, qm = queries(tok, prompts, "cpu")
    r = build_rollout(models, make_accelerator(), prompts, q, qm, sampled, cfg.rollout.temperature, 64)
    assert r.has_stop.tolist() == [True, True, False, True]
    expected = []
    for p, text, done in zip(prompts, r.texts, r.has_stop.tolist()):
        rendered = rm_tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": text}],
                                              tokenize=False)
        end = rendered.rindex("<|im_end|>") + (len("<|im_end|>") if done else 0)
        ids = torch.tensor([rm_tok(rendered[:end], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            expected.append(models.reward(input_ids=ids).logits[0, 0].item())
    torch.testing.assert_close(r.scores, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    # and the whole stage completes
    assert run(cfg).complete
