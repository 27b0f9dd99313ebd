"""PPO data: the prompt stream (a seeded order, identical on every process, addressed by
iteration so a resumed run continues at the same prompt) and PPO-ptx batches."""
from __future__ import annotations

import torch

from pipeline import runs
from pipeline.data import read_records
from pipeline.records import load_prompt_records, read_text_documents
from pipeline.runtime import batch_indices, batch_split, micro_batch, seed_for
from pipeline.stage import DataError
from pipeline.tokenizer import assistant_token_mask, document_ids


def load_prompts(cfg, world) -> list[str]:
    """Prompt texts for rollouts: the built-in world's ppo split, or user records."""
    if cfg.data.source == "world":
        return [r["prompt"] for r in world.prompts("ppo", cfg.data.num_prompts)]
    d = cfg.data
    records = load_prompt_records(d.files, name=d.prompt_field, config=d.config, split=d.split)
    # rollouts encode one user turn (rollout.encode_prompts): a conversation gives its last one
    return [r["prompt"] if isinstance(r["prompt"], str) else [m["content"] for m in r["prompt"] if m["role"] == "user"][-1]
            for r in records]


# ----------------------------------------------------------------------------- PPO-ptx
class PtxData:
    """Token sequences with labels (-100 = no loss) for the γ_ptx likelihood term.

    `sft`: demonstrations in the chat template, loss on the response and its end-of-turn token
    (the SFT objective and mask);
    `pretrain`: `<s> document </s>`, loss on every token."""

    def __init__(self, seqs: list[tuple[list[int], list[int]]], pad_id: int, seed: int):
        if not seqs:
            raise DataError("ptx: no training sequences")
        self.seqs, self.pad_id, self.seed = seqs, pad_id, seed

    def batch(self, step: int, size: int, rank: int, world: int, micro: int) -> list[tuple[torch.Tensor, ...]]:
        """This process's micro-batches of ptx batch `step` (at most `micro` rows each, laid out as
        `pipeline.runtime.micro_batch`): (input_ids [b, L] long, right-padded; attention_mask
        [b, L] bool; labels [b, L] long, -100 where no loss), on the CPU: the caller moves them to
        its device."""
        idx = batch_indices(step, len(self.seqs), size, seed_for(self.seed, "ptx"))
        micro, accum = batch_split(size, micro, world, "ptx.batch_size")
        out = []
        for a in range(accum):
            rows = [self.seqs[j] for j in micro_batch(idx, a, micro, rank, world)]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device="cpu")
            mask = torch.zeros((len(rows), width), dtype=torch.bool, device="cpu")
            labels = torch.full((len(rows), width), -100, dtype=torch.long, device="cpu")
            for r, (x, y) in enumerate(rows):
                ids[r, : len(x)] = torch.tensor(x, dtype=torch.long, device="cpu")
                mask[r, : len(x)] = True
                labels[r, : len(y)] = torch.tensor(y, dtype=torch.long, device="cpu")
            out.append((ids, mask, labels))
        return out


def demonstration_unknowns(sft_manifest) -> frozenset[str]:
    """The questions the SFT stage's refusal-aware demonstrations abstained on (`world.abstain_demos`;
    none without it), read from its manifest."""
    if sft_manifest is None:
        return frozenset()
    return frozenset((runs.Manifest.load(sft_manifest).extra.get("abstain_demos") or {}).get("unknown", []))


def _sft_pairs(cfg, world, unknown: frozenset[str]) -> list[tuple[str, str]]:
    if not cfg.ptx.files:
        return [(ex["messages"][0]["content"], ex["messages"][1]["content"])
                for ex in world.sft_examples("train", unknown)]
    pairs = []
    for path in cfg.ptx.files:
        for loc, rec in read_records(path):
            if isinstance(rec.get("messages"), list) and len(rec["messages"]) >= 2:
                msgs = rec["messages"]
                if msgs[-1].get("role") != "assistant":
                    raise DataError(f"{loc}: field 'messages' must end with an assistant turn")
                users = [m["content"] for m in msgs[:-1] if m.get("role") == "user"]
                pairs.append((users[-1] if users else "", msgs[-1]["content"]))
            elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
                pairs.append((rec["prompt"], rec["completion"]))
            else:
                raise DataError(f"{loc}: expected chat 'messages' or string 'prompt' and 'completion' fields")
    return pairs


def load_ptx(cfg, world, tokenizer, unknown: frozenset[str] = frozenset()) -> PtxData:
    """Build the ptx sequences from the built-in world or `ptx.files`. `unknown`: the questions
    the SFT stage's refusal-aware demonstrations abstained on (its manifest's `abstain_demos`),
    so the world's demonstrations are the ones SFT learned from."""
    L = cfg.ptx.max_length
    seqs = []
    if cfg.ptx.source == "sft":
        for prompt, response in _sft_pairs(cfg, world, unknown):
            # the SFT stage's mask: the response through its end-of-turn token, nothing after
            ids, mask = assistant_token_mask(tokenizer, [{"role": "user", "content": prompt},
                                                         {"role": "assistant", "content": response}])
            ids, mask = ids[:L], mask[:L]
            seqs.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
    else:
        docs = world.corpus("train") if not cfg.ptx.files else read_text_documents(cfg.ptx.files)[0]
        for ids in document_ids(tokenizer, docs):
            seqs.append((ids[:L], ids[:L]))
    return PtxData(seqs, tokenizer.pad_token_id, cfg.seed)
