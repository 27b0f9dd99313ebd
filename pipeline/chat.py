"""`python -m pipeline chat RUN --stage ppo` (`make chat RUN=... STAGE=ppo`): talk to a stage's model.

Every turn the whole conversation is rendered in the model's own chat template by the project's
one renderer (`pipeline.tokenizer.chat_ids`), so the model sees the history as it saw its training
dialogues. `/reset` clears the history, `/quit` or end of input (Ctrl-D) ends. Greedy unless
`--temperature` > 0; replies come from the project's one sampler (`pipeline.evaluation.generate`),
which stops at the template's end of turn (`pipeline.tokenizer.end_of_turn_id`).

`transformers chat` is not used: in transformers 5 it is a client of a `transformers serve` HTTP
server (fastapi, uvicorn and openai, which the project does not install), and it samples by default.
"""
from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Callable

from pipeline import registry, runs

CHAT_STAGES = registry.chat_stages()


def model_dir_of(runs_dir: str | Path, run_name: str, stage: str, ema: bool = False) -> Path:
    """The model directory of a complete stage, from its manifest (`model_ema/` with `ema`)."""
    if stage not in CHAT_STAGES:
        raise runs.HandoffError(f"the {stage} stage's model is a reward model (a sequence classifier), not a chat model; "
                                f"chat with one of: {', '.join(CHAT_STAGES)}")
    path = runs.stage_dir(runs_dir, run_name, stage) / "manifest.json"
    m = runs.Manifest.load(path)
    if not m.complete:
        raise runs.HandoffError(f"{path}: the {stage} stage is {m.status}, not complete")
    name = m.extra.get("ema_model_dir") if ema else m.model_dir
    if not name:
        raise runs.HandoffError(f"{path}: the {stage} stage has no {'EMA model (ema.enabled was off)' if ema else 'model'}")
    return path.parent / name


class Chat:
    """A conversation with one causal LM: the history, and the reply to each new user message."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 128, temperature: float = 0.0, system: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.system = max_new_tokens, temperature, system
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.history: list[dict] = []
        self.stream, self.turns = f"chat/{secrets.token_hex(8)}", 0  # a fresh random stream per session

    def reset(self) -> None:
        self.history = []

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation so far in the chat template, ending with the assistant header."""
        from pipeline.tokenizer import chat_ids

        head = [{"role": "system", "content": self.system}] if self.system else []
        return chat_ids(self.tokenizer, head + messages, add_generation_prompt=True)

    def reply(self, text: str) -> tuple[str, bool]:
        """The model's answer to user message `text` (and whether it ended its turn); both join the history."""
        from pipeline.evaluation import generate

        messages = self.history + [{"role": "user", "content": text}]
        ids = self.prompt_ids(messages)
        # Past the model's context the oldest exchanges go first; the new message always stays.
        while self.context and len(ids) + self.max_new_tokens > self.context and len(messages) > 1:
            messages = messages[2:]
            ids = self.prompt_ids(messages)
        [(out, finished)] = generate(self.model, self.tokenizer, [ids], self.max_new_tokens, self.temperature,
                                     stream=self.stream, rows=[self.turns])
        self.turns += 1
        answer = self.tokenizer.decode(out, skip_special_tokens=True).strip()
        self.history = messages + [{"role": "assistant", "content": answer}]
        return answer, finished


def repl(chat: Chat, read: Callable[[str], str], write: Callable[[str], None], note: Callable[[str], None]) -> int:
    """Read user lines until `/quit` or end of input; `write` the replies, `note` everything else."""
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            return 0
        if line == "/quit":
            return 0
        if line == "/reset":
            chat.reset()
            note("(history cleared)")
            continue
        if not line:
            continue
        answer, finished = chat.reply(line)
        write(f"assistant> {answer}")
        if not finished:
            note(f"(cut at {chat.max_new_tokens} new tokens; --max-new-tokens raises the limit)")


def main(args) -> int:
    """The `chat` sub-command of `python -m pipeline`."""
    model_dir = model_dir_of(args.runs_dir, args.run, args.stage, args.ema)  # before the slow imports
    import torch
    from transformers.utils import logging as hf_logging

    from pipeline.models import frozen_dtype, load_causal_lm, load_tokenizer

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of a conversation
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tokenizer, frozen_dtype(device)).to(device).eval()
    torch.manual_seed(args.seed)
    chat = Chat(model, tokenizer, args.max_new_tokens, args.temperature, args.system)

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    mode = f"temperature {args.temperature}" if args.temperature > 0 else "greedy"
    note(f"chatting with {model_dir} ({mode}, at most {args.max_new_tokens} new tokens); /reset clears the history, "
         f"/quit or Ctrl-D ends")
    if args.stage == "pretrain":
        note("(the pretrain model never saw the chat template: expect continuations, not answers)")
    # A prompt only on a terminal: piped input gets the replies alone on stdout.
    read = input if sys.stdin.isatty() else (lambda _prompt: input())
    return repl(chat, read, lambda text: print(text, flush=True), note)
