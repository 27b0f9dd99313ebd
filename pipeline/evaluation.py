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
             batch_size: int = 64, stop_token_id: int | None = None) -> list[tuple[list[int], bool]]:
    """Complete tokenized prompts; returns (response ids without the stop token, finished) each.
    The stop token is the chat template's end of turn (`pipeline.tokenizer.end_of_turn_id`) unless
    `stop_token_id` says otherwise; "finished" means it was produced.

    temperature 0 = greedy; otherwise pure temperature sampling (top_k=0, top_p=1), overriding
    whatever the checkpoint's generation_config says. Uses the KV cache.

    Sampling draws from the global random state of the model's device (HF `generate` calls
    `torch.multinomial` without a generator): seed it with `torch.manual_seed`, which seeds the
    CPU and every CUDA device, inside `torch.random.fork_rng(devices=[...])` to keep it local.
    """
    from pipeline.tokenizer import end_of_turn_id

    stop = end_of_turn_id(tokenizer) if stop_token_id is None else stop_token_id
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[i: i + batch_size], tokenizer.pad_token_id, device)
        gen = generate_ids(model, ids, mask, generation_config(stop, tokenizer.pad_token_id, temperature, max_new_tokens))
        for row in gen[:, ids.shape[1]:].tolist():
            if stop in row:
                out.append((row[: row.index(stop)], True))
            else:
                out.append((row, False))
    model.train(was_training)
    return out


def generation_config(stop_token_id: int, pad_token_id: int, temperature: float, max_new_tokens: int):
    """A fresh GenerationConfig, so the checkpoint's own sampling settings cannot leak in:
    temperature 0 = greedy, else pure temperature sampling (no top-k / top-p truncation), so the
    sampling policy is exactly softmax(z/τ)."""
    from transformers import GenerationConfig

    kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, eos_token_id=stop_token_id,
                  pad_token_id=pad_token_id, use_cache=True)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    return GenerationConfig(**kwargs)


def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config) -> torch.Tensor:
    """The one call into `model.generate` (prompt + new tokens [B, P+N]); every sampler of the
    project goes through it. The model holds its full parameters (`pipeline.distributed.
    full_parameters`), so each process decodes on its own: `synced_gpus=False`, which transformers
    would otherwise switch on under ZeRO-3 and FSDP and deadlock ranks with unequal batch counts."""
    with _without_checkpoint_generation_config(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask.long(), generation_config=config,
                              synced_gpus=False)


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
    return items[accelerator.process_index:: accelerator.num_processes] if accelerator else items


def gather(items: list, accelerator) -> list:
    """Inverse of `shard`: all ranks get the full list back in the original order."""
    if accelerator is None or accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    parts = gather_object([items])
    n = sum(len(p) for p in parts)
    out = [None] * n
    for r, p in enumerate(parts):
        out[r:: accelerator.num_processes] = p
    return out


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
