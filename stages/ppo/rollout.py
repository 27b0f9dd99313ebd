"""Rollouts: sample responses, then teacher-force them through policy, reference, critic and
reward model. Every forward gets explicit position ids (cumsum of the attention mask) and the
attention mask we track ourselves, never one rebuilt from `!= pad` (docs/ppo.md §14, §15, §18).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch

from pipeline.distributed import is_sharded
from pipeline.evaluation import KeyedSampling, generate_ids, generation_config, left_pad
from pipeline.logprobs import entropy_of_slices
from pipeline.tokenizer import chat_ids, end_of_turn_id
from stages.ppo.functional import entropy_from_logits, masked_sum, selective_log_softmax, truncate_at_stop


@dataclass
class Rollout:
    """One rollout batch on this process. B episodes, P prompt slots, T response slots.

    prompts        list[str] (B)  prompt texts
    texts          list[str] (B)  decoded responses (stop token and pads removed)
    query_ids      [B, P] long    chat-template prompt tokens, LEFT-padded with pad
    query_mask     [B, P] bool    True on real prompt tokens
    response_ids   [B, T] long    sampled tokens, pad after the first stop token
    response_mask  [B, T] bool    True up to and including the stop token (all T if none)
    last_index     [B]    long    e_b: index of the last valid response token
    has_stop       [B]    bool    the response ends with the stop token
    logprobs       [B, T] f32     log π_old(token | prefix) of softmax(logits / τ), teacher-forced
    ref_logprobs   [B, T] f32     the same under the frozen reference (also / τ)
    values         [B, T] f32     critic V of the state before token t (hidden at position P-1+t)
    scores         [B]    f32     raw reward-model score of (prompt, response + end of turn), re-rendered
                                  in the reward model's tokenizer and template
    rewards, advantages, returns  [B, T] f32, set by `loop.compute_advantages` (advantages whitened)
    """

    prompts: list
    texts: list
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    last_index: torch.Tensor
    has_stop: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, idx: torch.Tensor) -> "Rollout":
        """The episodes `idx` (a 1-D long tensor) as a new Rollout."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx.to(v.device)]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx.tolist()]
            else:
                out[f.name] = v
        return Rollout(**out)

    def gather(self, accelerator, pad_id: int) -> "Rollout":
        """Every process's episodes, on every process, in the order one process would hold them:
        `pipeline.evaluation.shard` deals episode i to process i % world, so episode j of process r
        is global episode j * world + r. Widths differ per process: responses are right-padded to
        the longest T (pad_id / False / 0.0), queries left-padded to the longest P (pad_id /
        False); both are masked slots. One process: `self`, nothing exchanged."""
        world = accelerator.num_processes
        if world == 1:
            return self
        from accelerate.utils import gather_object

        B, device = len(self), accelerator.device
        sizes = accelerator.gather(torch.tensor([[B, self.query_ids.shape[1], self.response_ids.shape[1]]],
                                                device=device)).tolist()
        if any(s[0] != B for s in sizes):
            raise ValueError(f"processes hold different numbers of episodes {[s[0] for s in sizes]}")
        P, T = max(s[1] for s in sizes), max(s[2] for s in sizes)
        # gathered row r * B + j  ->  global row j * world + r
        order = torch.arange(B * world, device=device).view(world, B).t().reshape(-1)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                if v.dim() == 2:
                    left = f.name.startswith("query")
                    fill = pad_id if v.dtype == torch.long else 0  # ids: pad; bool: False; float: 0.0
                    pad = v.new_full((B, (P if left else T) - v.shape[1]), fill)
                    v = torch.cat([pad, v] if left else [v, pad], dim=1)
                is_bool = v.dtype == torch.bool  # sent as uint8: not every backend gathers bool
                g = accelerator.gather((v.to(torch.uint8) if is_bool else v).to(device).contiguous())
                out[f.name] = (g.bool() if is_bool else g)[order]
            elif isinstance(v, list):
                parts = gather_object([v])  # one list per process
                out[f.name] = [parts[i % world][i // world] for i in range(B * world)]
            else:
                out[f.name] = v
        return Rollout(**out)


def sequence_inputs(query_ids, query_mask, response_ids, response_mask):
    """(input_ids, attention_mask, position_ids), each [B, P+T]: prompt then response."""
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Chat-template token ids ending with the assistant header: `<s><|user|>PROMPT<|assistant|>`."""
    return [chat_ids(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]


def queries(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids [B, P] and their bool mask, on `device`."""
    return left_pad(encode_prompts(tokenizer, prompts), tokenizer.pad_token_id, device)


@torch.no_grad()
def sample(model, tokenizer, query_ids, query_mask, temperature: float, max_new_tokens: int,
           batch_size: int, keys: torch.Tensor) -> torch.Tensor:
    """Sampled continuations [B, max_new_tokens] on `query_ids`' device (pad after a sequence
    finished), with the KV cache: pure temperature sampling, whatever the checkpoint says, stopping
    at the chat template's end-of-turn token. Row b draws from its random key `keys[b]`
    (`pipeline.evaluation.KeyedSampling`), so its tokens do not depend on the batch it shares.
    The queries are moved to the model's device if they are elsewhere. A policy gathered layer by
    layer (`pipeline.distributed.full_parameters(whole=False)`) decodes in lockstep with the other
    processes, which hold as many queries."""
    was_training = model.training
    model.eval()
    config = generation_config(end_of_turn_id(tokenizer), tokenizer.pad_token_id, max_new_tokens)
    device = next(model.parameters()).device
    P = query_ids.shape[1]
    out = torch.full((len(query_ids), max_new_tokens), tokenizer.pad_token_id, dtype=torch.long, device=query_ids.device)
    for i in range(0, len(query_ids), batch_size):
        gen = generate_ids(model, query_ids[i: i + batch_size].to(device), query_mask[i: i + batch_size].to(device),
                           config, KeyedSampling(keys[i: i + batch_size], temperature), lockstep=is_sharded(model))
        new = gen[:, P:]
        out[i: i + len(new), : new.shape[1]] = new
    model.train(was_training)
    return out


class TransformersSampler:
    """Rollout generation: the one way PPO rollouts are sampled, and the seam for an inference
    engine (e.g. vLLM on GPU machines that have it), passed to `loop.make_trainer(sampler=...)`.

    `sample(policy, query_ids, query_mask, keys)` returns continuations [B, max_new_tokens] of the
    left-padded queries on their device, pad after the stop token, drawn by pure temperature
    sampling (docs/ppo.md §16); `keys` [B] int64 are the episodes' random keys (an engine seeds
    each request with its key, as vLLM's per-request `seed` does). `sync(accelerator, policy)`
    runs after every optimizer phase: an engine that keeps its own copy of the weights loads the
    updated policy there (under ZeRO-3 or FSDP inside `pipeline.distributed.full_parameters`).
    Only token ids cross the seam: the old log-probs are teacher-forced afterwards (docs/ppo.md
    §18), so an engine whose kernels or precision differ from training's changes which tokens are
    drawn, never the PPO math.

    This one is transformers' `generate` with the KV cache on the policy module itself, so it has
    no weights to sync."""

    def __init__(self, tokenizer, temperature: float, max_new_tokens: int, batch_size: int):
        self.tokenizer, self.temperature = tokenizer, temperature
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def sample(self, policy, query_ids: torch.Tensor, query_mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return sample(policy, self.tokenizer, query_ids, query_mask, self.temperature, self.max_new_tokens,
                      self.batch_size, keys)

    def sync(self, accelerator, policy) -> None:
        pass


def token_logprobs(model, input_ids, attention_mask, position_ids, response_ids, temperature: float,
                   entropy: str | None = None, plain: bool = False):
    """Log-probs [B, T] of `response_ids` under softmax(logits / τ); with `entropy` also the
    entropy [B, T] of that distribution: "detached" (a diagnostic) or "grad" (an entropy bonus);
    with `plain` (no gradient) also the log-probs [B, T] under softmax(logits) itself, from the
    same forward (the reward model's likelihood term, computed by the reference).

    The one forward used for old, new and reference log-probs, so they match (docs/ppo.md §17, §18)."""
    # The LM head runs on the response window only (`logits_to_keep`: the last T + 1 positions,
    # P-1 .. P+T-1), not on the prompt: less compute, the same logits; sliced before any fp32 work
    # (docs/ppo.md §29).
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False, logits_to_keep=response_ids.shape[1] + 1).logits
    logits = logits[:, :-1]
    logprobs = selective_log_softmax(logits, response_ids, temperature)
    if plain:
        return logprobs, selective_log_softmax(logits, response_ids)
    if entropy is None:
        return logprobs
    if entropy == "grad":
        return logprobs, entropy_from_logits(logits / temperature)
    return logprobs, entropy_of_slices(logits.detach(), temperature)


def token_values(value_model, input_ids, attention_mask, position_ids, T: int) -> torch.Tensor:
    """Critic values [B, T] float32: V at position P-1+t is the value of the state before token t."""
    P = input_ids.shape[1] - T
    return value_model(input_ids, attention_mask, position_ids)[:, P - 1: -1].float()


def reference_context(models):
    """Context in which `reference_model(models)` computes the reference: with LoRA the policy
    with its adapter disabled (= the SFT weights), else nothing special."""
    if models.ref is not None:
        return contextlib.nullcontext()
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(models.policy).disable_adapter()


def reference_model(models):
    """The reference module (unwrapped: it takes no gradients, so no DDP bookkeeping)."""
    if models.ref is not None:
        return models.ref
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(models.policy)


@torch.no_grad()
def score_responses(rm, rm_tokenizer, prompts: list[str], responses: list[str],
                    finished: list[bool] | None = None, known: list | None = None) -> torch.Tensor:
    """Reward-model scores [B] (fp32) of decoded responses, through `reward_model.scoring`: the
    text is re-rendered in the RM's own tokenizer and chat template (it may differ from the
    policy's), right-padded, and read at the last real token (the end-of-turn token of a finished
    response). `known`: the likelihood term's values computed by the reference (`score`)."""
    from reward_model.scoring import score

    return score(rm, rm_tokenizer, prompts, responses, finished=finished, batch_size=max(1, len(prompts)), known=known)


def decode_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Response texts without the stop token and pads (special tokens are not shown to scorers)."""
    return tokenizer.batch_decode([ids[m].tolist() for ids, m in zip(response_ids.cpu(), response_mask.cpu())],
                                  skip_special_tokens=True)


@torch.no_grad()
def build_rollout(models, accelerator, prompts: list[str], query_ids, query_mask, sampled: torch.Tensor,
                  temperature: float, batch_size: int, policy=None, value_model=None) -> Rollout:
    """Truncate sampled tokens at the stop token (the template's end of turn), then teacher-force
    (policy, reference, critic) and score them. All tensors on `accelerator.device`. `policy` and
    `value_model`: what the policy and critic forwards call (default `models.policy` /
    `models.value_model`; the trainer passes its compiled wrappers with `compile`)."""
    policy = models.policy if policy is None else policy
    value_model = models.value_model if value_model is None else value_model
    tok = models.tokenizer
    response_ids, response_mask, last_index, has_stop = truncate_at_stop(sampled, end_of_turn_id(tok), tok.pad_token_id)
    # Drop columns that are padding in every row: less compute, same numbers.
    T = int(last_index.max()) + 1
    response_ids, response_mask = response_ids[:, :T], response_mask[:, :T]
    logprobs, ref_logprobs, values, log_lik = [], [], [], []
    for i in range(0, len(query_ids), batch_size):
        sl = slice(i, i + batch_size)
        inputs = sequence_inputs(query_ids[sl], query_mask[sl], response_ids[sl], response_mask[sl])
        with accelerator.autocast():
            logprobs.append(token_logprobs(policy, *inputs, response_ids[sl], temperature))
            with reference_context(models):
                ref = token_logprobs(reference_model(models), *inputs, response_ids[sl], temperature,
                                     plain=models.likelihood_shared)
            if models.likelihood_shared:  # the reward model's likelihood term, from the same forward
                ref, ref_plain = ref
                log_lik.append(masked_sum(ref_plain, response_mask[sl], dim=1))
            ref_logprobs.append(ref)
            values.append(token_values(value_model, *inputs, T))
    texts = decode_responses(tok, response_ids, response_mask)
    finished = has_stop.tolist()
    known = None
    if models.likelihood_shared:
        known = list(zip([ids[m].tolist() for ids, m in zip(response_ids.cpu(), response_mask.cpu())],
                         torch.cat(log_lik).tolist()))
    scores = torch.cat([score_responses(models.reward, models.reward_tokenizer, prompts[i: i + batch_size],
                                        texts[i: i + batch_size], finished[i: i + batch_size],
                                        None if known is None else known[i: i + batch_size])
                        for i in range(0, len(prompts), batch_size)])
    return Rollout(prompts=list(prompts), texts=texts, query_ids=query_ids, query_mask=query_mask,
                   response_ids=response_ids, response_mask=response_mask, last_index=last_index, has_stop=has_stop,
                   logprobs=torch.cat(logprobs), ref_logprobs=torch.cat(ref_logprobs), values=torch.cat(values),
                   scores=scores.to(query_ids.device, torch.float32))
