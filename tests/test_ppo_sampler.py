"""The rollout sampler seam (`rollout.TransformersSampler`, `loop.make_trainer(sampler=...)`): an
inference engine plugs in without touching the PPO math. Only token ids cross the seam (the old
log-probs are teacher-forced, docs/ppo.md §18), and the sampler is told after every optimizer
phase to load the updated policy."""
import copy

import torch

from pipeline.config import load_config
from pipeline.evaluation import row_keys
from pipeline.runtime import make_accelerator
from pipeline.tokenizer import end_of_turn_id
from pipeline.world import World
from stages.ppo import bench as ppo_bench
from stages.ppo.config import PPOConfig
from stages.ppo.data import load_prompts
from stages.ppo.loop import iteration_step, make_trainer
from stages.ppo.models import load_models, resolve_sources
from stages.ppo.rollout import TransformersSampler, sequence_inputs, token_logprobs


def random_ppo(tmp_path, *overrides):
    """(cfg, accelerator, models, 4 prompts) for PPO on random one-layer models built on the fly."""
    cfg = load_config(PPOConfig, ["wandb.mode=disabled", "threads=1", "batch.rollout=4", "batch.size=4",
                                  "batch.micro=4", "epochs=1", "rollout.max_new_tokens=6", "data.num_prompts=8",
                                  "optim.policy_lr=1e-2", *overrides])
    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64)
    world = World(cfg.world)
    cfg.policy.name_or_path, cfg.reward.name_or_path = ppo_bench.random_models(tmp_path, world, "tiny", shape,
                                                                               vocab_size=300)
    accelerator = make_accelerator()
    models = load_models(cfg, resolve_sources(cfg), accelerator.device)
    return cfg, accelerator, models, load_prompts(cfg, world)[:4]


class ScriptedSampler:
    """Writes the same two tokens and the stop token for every query, as an engine would hand back
    ids; records what PPO asks of it."""

    def __init__(self, tokens, width, pad_id):
        self.tokens, self.width, self.pad_id = tokens, width, pad_id
        self.calls, self.synced = [], []

    def sample(self, policy, query_ids, query_mask, keys):
        self.calls.append(query_ids.clone())
        self.keys = keys.clone()
        out = torch.full((len(query_ids), self.width), self.pad_id, dtype=torch.long)
        out[:, : len(self.tokens)] = torch.tensor(self.tokens)
        return out

    def sync(self, accelerator, policy):
        self.synced.append({k: v.detach().clone() for k, v in accelerator.unwrap_model(policy).state_dict().items()})


def test_an_engine_plugs_in_through_the_sampler_and_only_its_token_ids_reach_ppo(tmp_path):
    cfg, accelerator, models, prompts = random_ppo(tmp_path)
    tok = models.tokenizer
    stop = end_of_turn_id(tok)
    assert not {40, 41} & set(tok.all_special_ids)
    scripted = ScriptedSampler([40, 41, stop], cfg.rollout.max_new_tokens, tok.pad_token_id)
    trainer = make_trainer(cfg, models, accelerator, sampler=scripted)
    before = copy.deepcopy(trainer.policy).eval()
    start = {k: v.detach().clone() for k, v in before.state_dict().items()}

    _, rollout = iteration_step(trainer, 0, prompts)

    assert len(scripted.calls) == 1 and torch.equal(scripted.calls[0], rollout.query_ids)
    # each episode's random key, named by (seed, iteration, place in the batch)
    assert torch.equal(scripted.keys, row_keys(f"{cfg.seed}/ppo/rollout/0", range(4)))
    # the engine's tokens, truncated after its stop token, are the episodes
    assert rollout.response_ids.tolist() == [[40, 41, stop]] * 4
    assert rollout.has_stop.all() and rollout.response_mask.all()
    # old log-probs are the policy's own, teacher-forced: nothing of the engine's but the ids
    with torch.no_grad():
        inputs = sequence_inputs(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask)
        expected = token_logprobs(before, *inputs, rollout.response_ids, cfg.rollout.temperature)
    torch.testing.assert_close(rollout.logprobs, expected, rtol=1e-5, atol=1e-5)
    # told once, after the update, with the updated weights
    assert len(scripted.synced) == 1
    assert any(not torch.equal(start[k], v) for k, v in scripted.synced[0].items())
    iteration_step(trainer, 1, prompts)
    assert len(scripted.calls) == 2 and len(scripted.synced) == 2


def test_the_default_sampler_is_transformers_generate_with_the_rollout_settings(tmp_path):
    cfg, accelerator, models, prompts = random_ppo(tmp_path)
    trainer = make_trainer(cfg, models, accelerator)
    assert isinstance(trainer.sampler, TransformersSampler)
    assert (trainer.sampler.temperature, trainer.sampler.max_new_tokens, trainer.sampler.batch_size) == (
        cfg.rollout.temperature, cfg.rollout.max_new_tokens, cfg.batch.forward)
    torch.manual_seed(3)
    _, rollout = iteration_step(trainer, 0, prompts)
    assert rollout.response_ids.shape[1] <= cfg.rollout.max_new_tokens and rollout.response_mask.any()
