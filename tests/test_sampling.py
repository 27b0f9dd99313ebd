"""Keyed sampling (`pipeline.evaluation.KeyedSampling`): pure temperature sampling whose draws
belong to the row (its random key), not to the batch, the process or the device. Rollouts and
evaluation samples are then the same on any number of processes, and every side of an
evaluation draws from a stream of its own."""
import pytest
import torch

from pipeline.evaluation import KeyedSampling, generate, gumbel_noise, row_keys, stream_key


def test_draws_follow_softmax_of_logits_over_temperature():
    """One step for 40,000 rows with the same logits: token frequencies match softmax(z/τ)."""
    z = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    tau, n = 0.7, 40_000
    sampler = KeyedSampling(row_keys("test/softmax", range(n)), tau)
    picks = sampler(torch.zeros(n, 3, dtype=torch.long), z.expand(n, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=len(z)).double() / n
    p = torch.softmax(z.double() / tau, -1)
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * sigma + 1e-12).all(), (freq, p)


def test_noise_is_a_function_of_key_step_and_token():
    keys = row_keys("s", [0, 1, 2])
    a = gumbel_noise(keys, 3, 50)
    assert torch.equal(a, gumbel_noise(keys, 3, 50))                    # reproducible
    assert torch.equal(a[1:], gumbel_noise(keys[1:], 3, 50))            # a row's noise ignores its batch
    assert not torch.equal(a, gumbel_noise(keys, 4, 50))                # fresh at every step
    assert not torch.equal(a[0], a[1])                                  # and for every row
    assert not torch.equal(row_keys("s", [0]), row_keys("t", [0]))      # streams are distinct
    assert stream_key("1234/ppo/rollout/7") == stream_key("1234/ppo/rollout/7") < 2**63


@pytest.fixture(scope="module")
def lm():
    from pipeline.config import WorldConfig
    from pipeline.models import llama_from_preset
    from pipeline.tokenizer import train_tokenizer
    from pipeline.world import World

    world = World(WorldConfig(num_people=20, corpus_docs=300, sft_examples=50, eval_examples=4))
    tok = train_tokenizer(world.corpus(), vocab_size=300)
    torch.manual_seed(0)
    return llama_from_preset("tiny", tok, max_position_embeddings=128).eval(), tok


def test_a_rows_sample_does_not_depend_on_its_batch(lm):
    """Eight prompts of different lengths sampled together, one by one, and as the two shards
    two processes would hold: each prompt draws the same tokens every time."""
    model, tok = lm
    prompts = [tok("The favourite colour of" + " x" * i)["input_ids"] for i in range(8)]
    together = generate(model, tok, prompts, 10, temperature=1.0, stream="test/batch")
    alone = generate(model, tok, prompts, 10, temperature=1.0, batch_size=1, stream="test/batch")
    shards = [generate(model, tok, prompts[r::2], 10, temperature=1.0, stream="test/batch", rows=list(range(8))[r::2])
              for r in range(2)]
    assert together == alone
    assert [shards[i % 2][i // 2] for i in range(8)] == together
    other = generate(model, tok, prompts, 10, temperature=1.0, stream="test/other")
    assert other != together                                            # another stream, other draws


def test_sampling_without_a_stream_is_refused(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="named random stream"):
        generate(model, tok, [tok("a")["input_ids"]], 2, temperature=0.7)
