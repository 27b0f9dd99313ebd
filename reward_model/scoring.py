"""Scoring text with a reward model, always through the RM's own tokenizer and chat template.

PPO decodes its samples and calls `score` here, which re-encodes them exactly as the RM saw its
training data, so a policy whose tokenizer differs from the RM's still gets correct rewards (the
peers force one shared tokenizer, TRL #1674/#3595). Training renders text the same way, so the
token boundaries at training and at PPO time agree (TRL #1702).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.config import InputError
from pipeline.evaluation import gather, shard
from pipeline.tokenizer import assistant_token_mask, chat_ids, end_of_turn_id
from reward_model.likelihood import exempt_mask, response_log_likelihoods, term_of


def as_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt string is one user turn; a messages list is used as is."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Chat-template ids of a prompt ending with the assistant header, ready for generation."""
    return chat_ids(tokenizer, as_messages(prompt), add_generation_prompt=True)


def render(tokenizer, prompt: str | list[dict], response: str, finished: bool = True) -> list[int]:
    """Token ids of `prompt` + assistant `response` in the chat template, ending with the
    template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...; eos in the project's own): the
    RM reads its score there. Whatever the template writes after the turn (ChatML's newline) is cut.

    An unfinished response (cut off at the length limit) keeps no end-of-turn token, so the RM sees
    the same evidence the labeler saw: the score is then read at its last real token.
    """
    return render_span(tokenizer, prompt, response, finished)[0]


def render_span(tokenizer, prompt: str | list[dict], response: str, finished: bool = True) -> tuple[list[int], int]:
    """`render`'s ids and the index of the response's first token (where the assistant's
    content starts): the likelihood term (reward_model.likelihood) sums over the tokens from there."""
    messages = as_messages(prompt) + [{"role": "assistant", "content": response}]
    ids, mask = assistant_token_mask(tokenizer, messages, first=len(messages) - 1)
    end = max((i + 1 for i, m in enumerate(mask) if m), default=len(ids))
    if not finished and end > 0 and ids[end - 1] == end_of_turn_id(tokenizer):
        end -= 1
    start = next((i for i, m in enumerate(mask) if m), end)
    return ids[:end], max(1, min(start, end))


def right_pad(seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Right-pad token lists into `[B, L]` ids and a boolean attention mask (True = real), on
    `device`. Built on the CPU (one small copy per row) and moved in one transfer."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(seqs), width), dtype=torch.bool, device="cpu")
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long, device="cpu")
        mask[i, : len(s)] = True
    return ids.to(device), mask.to(device)


def forward_rewards(model, seqs: list[list[int]], pad_id: int, starts: list[int] | None = None,
                    log_likelihoods: list[float | None] | None = None) -> Tensor:
    """One forward of a right-padded batch -> rewards [B] float32 on the model's device (with grad
    if enabled), whatever the model's dtype. A reward model with a likelihood term
    (reward_model.likelihood) adds it, which needs each sequence's response start (`render_span`);
    `log_likelihoods` gives the term's log-likelihood of the rows already computed elsewhere
    (None: compute it here)."""
    ids, mask = right_pad(seqs, pad_id, next(model.parameters()).device)
    rewards = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 0].float()
    term = term_of(model)
    if term is not None:
        if starts is None or len(starts) != len(seqs):
            raise ValueError("this reward model has a likelihood term: pass each sequence's response start "
                             "(reward_model.scoring.render_span)")
        known = log_likelihoods or [None] * len(seqs)
        log_lik = torch.tensor([float("nan") if v is None else v for v in known], dtype=torch.float32, device="cpu")
        todo = [i for i, v in enumerate(known) if v is None]
        rows = todo or ([0] if term.lockstep else [])  # a sharded model forwards on every process, needed or not
        if rows:
            with torch.no_grad():
                device = next(term.model.parameters()).device
                part = torch.tensor(rows, device=ids.device)
                values = response_log_likelihoods(term.model, ids[part].to(device), mask[part].to(device),
                                                  torch.tensor([starts[i] for i in rows], device=device)).cpu()
            if todo:
                log_lik[todo] = values
        rewards = rewards + term(log_lik.to(rewards.device))
    return rewards


def group_rewards(model, groups: list[list[list[int]]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Rewards of N prompts' responses in ONE forward, each response exactly once.

    groups: N lists of rendered responses (K_n >= 1 each) -> (rewards [N, K_max] with 0 in
    padding slots, valid_mask [N, K_max] bool). Grouping by prompt is what lets the K-wise loss
    use all C(K,2) pairs for the cost of K forwards (InstructGPT §3.5).
    """
    k_max = max(len(g) for g in groups)
    flat = [s for g in groups for s in g]
    rewards = forward_rewards(model, flat, pad_id)
    lengths = torch.tensor([len(g) for g in groups], device=rewards.device)
    valid_mask = torch.arange(k_max, device=rewards.device) < lengths[:, None]
    out = torch.zeros(len(groups), k_max, dtype=rewards.dtype, device=rewards.device)
    out = out.masked_scatter(valid_mask, rewards)
    return out, valid_mask


def _in_length_batches(seqs: list[list[int]], batch_size: int, accelerator, fn) -> tuple[list[list[int]], list]:
    """Run `fn(indices)` over length-sorted batches of `seqs` (less padding), the batches split
    over ranks -> (batches, results): every rank gets every batch's result, in `batches`' order."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return batches, gather([fn(idx) for idx in shard(batches, accelerator)], accelerator)


@torch.no_grad()
def log_likelihood_ids(lm, seqs: list[list[int]], starts: list[int], pad_id: int, batch_size: int = 64,
                       accelerator=None) -> Tensor:
    """Sum of the response tokens' log-probabilities under the causal LM `lm`, for rendered
    sequences and their response starts (`render_span`) -> [N] float32 on the CPU."""
    device = next(lm.parameters()).device

    def one(idx: list[int]):
        ids, mask = right_pad([seqs[i] for i in idx], pad_id, device)
        return response_log_likelihoods(lm, ids, mask, torch.tensor([starts[i] for i in idx], device=device)).cpu()

    out = torch.empty(len(seqs), device="cpu")
    for idx, values in zip(*_in_length_batches(seqs, batch_size, accelerator, one)):
        out[idx] = values
    return out


@torch.no_grad()
def score_ids(model, seqs: list[list[int]], pad_id: int, batch_size: int = 64, accelerator=None,
              with_hidden: bool = False, starts: list[int] | None = None,
              log_likelihoods: list[float | None] | None = None) -> tuple[Tensor, Tensor | None]:
    """Rewards [N] of rendered sequences (and the final hidden state at the scored token,
    [N, d], when `with_hidden`), both float32 on the CPU whatever the model's device and dtype.
    `starts`: each sequence's response start, needed by a reward model with a likelihood term;
    `log_likelihoods`: the term's values already known (`forward_rewards`).
    Batches are length-sorted to cut padding; with an accelerator the batches are split over
    ranks and every rank gets all results, in input order."""
    if model.config.pad_token_id != pad_id:
        raise InputError(f"model.config.pad_token_id={model.config.pad_token_id} but the tokenizer pads with {pad_id}; "
                         "the score would be read at the wrong token")
    if not seqs:
        return (torch.zeros(0, device="cpu"),
                torch.zeros(0, model.score.in_features, device="cpu") if with_hidden else None)
    was_training = model.training
    model.eval()
    captured: list[Tensor] = []
    hook = model.score.register_forward_hook(lambda m, inp, out: captured.append(inp[0])) if with_hidden else None

    def one(idx: list[int]):
        batch = [seqs[i] for i in idx]
        rewards = forward_rewards(model, batch, pad_id, None if starts is None else [starts[i] for i in idx],
                                  None if log_likelihoods is None else [log_likelihoods[i] for i in idx]).cpu()
        hidden = None
        if with_hidden:
            # the same token transformers pools: the last one that is not pad
            h = captured.pop()
            last = torch.tensor([len(s) - 1 for s in batch], device=h.device)
            hidden = h[torch.arange(len(batch), device=h.device), last].float().cpu()
        return rewards, hidden

    try:
        batches, results = _in_length_batches(seqs, batch_size, accelerator, one)
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    scores = torch.empty(len(seqs), device="cpu")
    hidden_all = torch.empty(len(seqs), model.score.in_features, device="cpu") if with_hidden else None
    for idx, (rewards, hidden) in zip(batches, results):
        scores[idx] = rewards
        if with_hidden:
            hidden_all[idx] = hidden
    return scores, hidden_all


def score(model, tokenizer, prompts: list, responses: list[str], finished: list[bool] | None = None,
          batch_size: int = 64, accelerator=None, known: list[tuple[list[int], float]] | None = None) -> Tensor:
    """Rewards [N] (float32, on the CPU) for `(prompt, response)` pairs, rendered with the RM's
    own `tokenizer`; `model` is a plain (unwrapped) reward model.

    prompts: strings (one user turn) or messages lists; responses: plain text (decoded, without
    special tokens); finished: False for responses cut off before their stop token. `known`: per
    pair, (response token ids, their log-likelihood under the likelihood term's model), computed
    by the caller; used where the rendered response is exactly those ids, else computed here.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
    finished = finished if finished is not None else [True] * len(responses)
    spans = [render_span(tokenizer, p, r, f) for p, r, f in zip(prompts, responses, finished)]
    log_likelihoods = None
    if known is not None:
        log_likelihoods = [value if ids[start:] == response else None
                           for (ids, start), (response, value) in zip(spans, known)]
    term = term_of(model)
    if term is not None and term.exempt:  # responses the term does not judge: their value is its centre
        mask = exempt_mask(term.exempt, responses)
        if any(mask):
            log_likelihoods = [term.center if m else v
                               for m, v in zip(mask, log_likelihoods or [None] * len(responses))]
    return score_ids(model, [ids for ids, _ in spans], tokenizer.pad_token_id, batch_size, accelerator,
                     starts=[start for _, start in spans], log_likelihoods=log_likelihoods)[0]
