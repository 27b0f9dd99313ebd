"""Generation and evaluation helpers shared by the stages (greedy evals, sampling)."""
from __future__ import annotations

import contextlib

import torch


def left_pad(seqs: list[list[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `[B, P]` ids and a boolean attention mask, on `device`. Built on
    the CPU (one small copy per row) and moved in one transfer."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(seqs), width), dtype=torch.bool, device="cpu")
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long, device="cpu")
        mask[i, width - len(s):] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             batch_size: int = 64, stop_token_id: int | None = None, stream: str | None = None,
             rows: list[int] | None = None, lockstep: bool = False) -> list[tuple[list[int], bool]]:
    """Complete tokenized prompts; returns (response ids without the stop token, finished) each.
    The stop token is the chat template's end of turn (`pipeline.tokenizer.end_of_turn_id`) unless
    `stop_token_id` says otherwise; "finished" means it was produced.

    temperature 0 = greedy; otherwise pure temperature sampling (`KeyedSampling`) from the named
    random `stream`, prompt i drawing as row `rows[i]` of it (default: i). A row's draw depends on
    its key alone, not on the batch it shares or the process it runs on. Uses the KV cache.
    `lockstep`: the model is sharded over the processes, which all call this with as many
    prompts: each decoding step runs on every process until all are done (transformers'
    `synced_gpus`).
    """
    from pipeline.tokenizer import end_of_turn_id

    if temperature > 0 and stream is None:
        raise ValueError("sampling needs a named random stream (stream=...)")
    rows = list(range(len(prompts))) if rows is None else rows
    stop = end_of_turn_id(tokenizer) if stop_token_id is None else stop_token_id
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    config = generation_config(stop, tokenizer.pad_token_id, max_new_tokens)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[i: i + batch_size], tokenizer.pad_token_id, device)
        sampling = KeyedSampling(row_keys(stream, rows[i: i + batch_size]), temperature) if temperature > 0 else None
        gen = generate_ids(model, ids, mask, config, sampling, lockstep)
        for row in gen[:, ids.shape[1]:].tolist():
            if stop in row:
                out.append((row[: row.index(stop)], True))
            else:
                out.append((row, False))
    model.train(was_training)
    return out


def generation_config(stop_token_id: int, pad_token_id: int, max_new_tokens: int):
    """A fresh GenerationConfig, so the checkpoint's own sampling settings cannot leak in: the
    decoding rule is argmax over the scores, which `KeyedSampling` turns into pure temperature
    sampling (no top-k / top-p truncation), so the sampling policy is exactly softmax(z/τ)."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_token_id,
                            pad_token_id=pad_token_id, use_cache=True)


def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config,
                 sampling: "KeyedSampling | None" = None, lockstep: bool = False) -> torch.Tensor:
    """The one call into `model.generate` (prompt + new tokens [B, P+N]); every sampler of the
    project goes through it. Greedy, or sampling with `sampling`'s keyed noise. A model that holds
    its full parameters (`pipeline.distributed.full_parameters`) decodes on each process on its
    own: `synced_gpus=False`, which transformers would otherwise switch on under ZeRO-3 and FSDP
    and deadlock ranks with unequal batch counts; a sharded frozen model decodes in `lockstep`."""
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList([sampling] if sampling is not None else [])
    with _without_checkpoint_generation_config(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask.long(), generation_config=config,
                              logits_processor=processors, synced_gpus=lockstep)


# ------------------------------------------------------------------------------ keyed sampling
# splitmix64 (Steele et al. 2014) on int64 tensors, whose arithmetic wraps like uint64's.
_GOLDEN, _MUL1, _MUL2 = -7046029254386353131, -4658895280553007687, -7723592293110705685


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    return (x >> k) & ((1 << (64 - k)) - 1)  # logical, not arithmetic, shift


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection of int64 whose outputs look independent."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MUL1
    x = (x ^ _shift_right(x, 27)) * _MUL2
    return x ^ _shift_right(x, 31)


def stream_key(name: str) -> int:
    """The 63-bit key of a named random stream: names say what a stream is for
    (`"1234/ppo/rollout/7"`), so two purposes never share draws by accident."""
    import hashlib

    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


def row_keys(stream: str, rows) -> torch.Tensor:
    """[B] int64 keys of rows `rows` (ints) of the named `stream`."""
    return _mix(torch.as_tensor(list(rows), dtype=torch.long, device="cpu") + stream_key(stream))


class KeyedSampling:
    """A logits processor that turns greedy decoding into pure temperature sampling by the
    Gumbel-max trick: argmax_v(z_v / τ + G_v) with G_v ~ Gumbel(0, 1) is a draw from softmax(z/τ)
    (Gumbel 1954; Maddison et al. 2014). The noise of row b at step t for token v is a hash of
    (key_b, t, v), so a row's sample depends only on its key and its own logits: the same episode
    draws the same tokens in any batch, on any number of processes, on CPU or GPU, and a named
    stream's rows are independent of every other stream's."""

    def __init__(self, keys: torch.Tensor, temperature: float):
        self.keys, self.temperature, self.start = keys, temperature, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:  # the first call sees the (padded) prompt only
            self.start, self.keys = input_ids.shape[1], self.keys.to(scores.device)
        return scores.float() / self.temperature + gumbel_noise(self.keys, input_ids.shape[1] - self.start,
                                                                 scores.shape[-1])


def gumbel_noise(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """[B, vocab] float32 Gumbel(0, 1) noise, a pure function of (keys [B], step, token id)."""
    step_keys = _mix(keys ^ _mix(torch.tensor(step, dtype=torch.long, device=keys.device)))
    bits = _mix(step_keys[:, None] + torch.arange(vocab, device=keys.device)[None])
    u = (_shift_right(bits, 40).float() + 0.5) * 2.0**-24  # 24 random bits, strictly inside (0, 1)
    return -torch.log(-torch.log(u))


@contextlib.contextmanager
def _without_checkpoint_generation_config(model):
    """`generate` fills every field our config leaves unset (None) from the model's own
    `generation_config`: a checkpoint's min_p, repetition_penalty or typical_p would reshape the
    sampling distribution (transformers#42762). A blank one stands in for the call, so only our
    settings and transformers' neutral defaults apply. peft wrappers copy theirs onto the base
    model inside `generate`, so both are swapped."""
    from transformers import GenerationConfig

    owners = [model] + ([model.get_base_model()] if hasattr(model, "get_base_model") else [])
    owners = [m for m in owners if getattr(m, "generation_config", None) is not None]
    saved = [m.generation_config for m in owners]
    for m in owners:
        m.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for m, g in zip(owners, saved):
            m.generation_config = g


def shard(items: list, accelerator) -> list:
    """This process's share of `items`: item i goes to process i % world. Shares differ by one
    item when the count does not divide by the process count; `gather` undoes it either way."""
    return items[accelerator.process_index:: accelerator.num_processes] if accelerator else items


def shard_even(items: list, accelerator) -> tuple[list, int]:
    """(this process's share, padded to the longest share by repeating an item; how many of it
    are real): every process then makes the same number of forward calls, as models sharded over
    the processes need (`pipeline.distributed.is_sharded`). Gather the real entries only."""
    mine = shard(items, accelerator)
    if accelerator is None or accelerator.num_processes == 1 or not items:
        return mine, len(mine)
    longest = -(-len(items) // accelerator.num_processes)
    return mine + (mine[:1] or items[:1]) * (longest - len(mine)), len(mine)


def gather(items: list, accelerator) -> list:
    """Inverse of `shard`: every process gets the full list back in the original order. `items`
    holds one entry per item of this process's share (a result with several parts per item goes
    as one list per item), so process r's j-th entry is item j * world + r, whatever the count."""
    if accelerator is None or accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    parts = gather_object([items])
    return interleave(parts)


def interleave(parts: list[list]) -> list:
    """The original order of items dealt round-robin into `parts` (part r holds items r, r + n, ...):
    shares may differ by one item; any larger difference means they were not dealt by `shard`."""
    n = len(parts)
    longest = max((len(p) for p in parts), default=0)
    if any(len(p) not in (longest, longest - 1) for p in parts) or any(
            len(parts[r]) > len(parts[r - 1]) for r in range(1, n)):
        raise RuntimeError(f"gather: shares of sizes {[len(p) for p in parts]} were not dealt by shard()")
    return [parts[r][j] for j in range(longest) for r in range(n) if j < len(parts[r])]


def fact_cloze_accuracy(model, tokenizer, cloze: list[tuple[str, str]], accelerator=None):
    """Greedy accuracy on `prefix -> answer` prompts; returns (accuracy, sample rows)."""
    mine = shard(cloze, accelerator)
    prompts = [tokenizer(p)["input_ids"] for p, _ in mine]
    results = generate(model, tokenizer, prompts, max_new_tokens=8) if prompts else []
    rows = []
    for (prefix, answer), (ids, _) in zip(mine, results):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ok = text.strip().startswith(answer) and not text.strip()[len(answer):][:1].isalnum()
        rows.append([prefix, answer, text, ok])
    rows = gather(rows, accelerator)
    return sum(r[3] for r in rows) / max(1, len(rows)), rows


def parent_knowledge(model, tokenizer, world, questions: list[str], accelerator=None) -> dict[str, bool]:
    """Whether `model` (the pretrained parent) completes the corpus sentence that holds each fact
    or sum question's answer, greedily (`World.cloze`): what pretraining stored, whatever SFT makes
    of it. Feeds refusal-aware demonstrations (`world.abstain_demos`) and the SFT evaluation's
    split of hallucinations into facts the parent knew and facts it did not."""
    questions = sorted(set(questions))
    _, rows = fact_cloze_accuracy(model, tokenizer, [world.cloze(q) for q in questions], accelerator)
    return {q: bool(row[3]) for q, row in zip(questions, rows)}
