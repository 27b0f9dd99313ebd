"""A byte-level BPE tokenizer trained from scratch, wrapped as a `PreTrainedTokenizerFast`.

Special tokens: `<s>` (bos), `</s>` (eos, the stop token), `<pad>` (distinct from eos: with
pad == eos, masks built from `!= pad` hide the stop token and sequence-classification pooling
reads the reward one token early), and role markers for the chat template.
"""
from __future__ import annotations

import weakref
from typing import Iterable

from pipeline.config import InputError

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# The assistant turn is wrapped in {% generation %} for tools that read the markers (transformers'
# return_assistant_tokens_mask); the SFT stage finds assistant tokens in any template
# (`assistant_token_mask`). The turn ends with eos, so eos is this template's end-of-turn token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE on `texts` and return a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # Plain `tokenizer(text)` prepends bos, like Llama tokenizers; chat templates add their own.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, additional_special_tokens=list(ROLE_TOKENS))
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    fast.model_max_length = 1_000_000
    return fast


def ensure_chat_ready(tokenizer):
    """Make a user-supplied tokenizer usable by every stage: a chat template and a pad token
    distinct from eos and from the template's end-of-turn token. Returns the list of changes made
    (for the log)."""
    changes = []
    if tokenizer.eos_token is None:
        raise InputError("the tokenizer has no eos token; the stages need one to stop generation")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD})
        changes.append(f"added pad token {PAD!r} distinct from eos")
    if not tokenizer.chat_template:
        tokenizer.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
        tokenizer.chat_template = CHAT_TEMPLATE if tokenizer.bos_token else CHAT_TEMPLATE.replace("{{ bos_token }}", "")
        changes.append("installed the project chat template")
    if tokenizer.pad_token_id == end_of_turn_id(tokenizer):
        # as with pad == eos: masks and the RM's pooling would skip the token that ends the turn
        tokenizer.add_special_tokens({"pad_token": PAD})
        changes.append(f"added pad token {PAD!r} distinct from the end-of-turn token")
    return changes


# ---------------------------------------------------------------------------------------------
# What the chat template says: rendering, the end-of-turn token, the assistant's tokens
# ---------------------------------------------------------------------------------------------
def special_ids(tokenizer) -> set[int]:
    """Ids of every special token: the named ones (bos, eos, pad, ...) and added tokens marked special."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return ids


_FACTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _template_fact(tokenizer, name: str, compute):
    """`compute(tokenizer)` once per tokenizer, template and vocabulary: the facts read from a chat
    template are asked for per rendered response (RM scoring, SFT masks), and reading one means
    rendering and tokenizing a probe conversation."""
    key = (tokenizer.chat_template, len(tokenizer), tuple(tokenizer.all_special_ids))
    facts = _FACTS.setdefault(tokenizer, {})
    if facts.get("key") != key:
        facts.clear()
        facts["key"] = key
    if name not in facts:
        facts[name] = compute(tokenizer)
    return facts[name]


def supports_system_role(tokenizer) -> bool:
    """Whether the chat template renders a system message (Gemma's and Mistral's raise or drop it)."""
    return _template_fact(tokenizer, "system_role", _supports_system_role)


def _supports_system_role(tokenizer) -> bool:
    probe = "Zq system probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": probe}, {"role": "user", "content": "Hi"}],
                                             tokenize=False)
    except Exception:  # noqa: BLE001 - templates reject roles with raise_exception (jinja TemplateError)
        return False
    return probe in text


def fit_roles(tokenizer, messages: list[dict]) -> list[dict]:
    """`messages` in roles the template has: a leading system message becomes the start of the first
    user message when the template has no system role (as Gemma's documentation advises)."""
    if not messages or messages[0]["role"] != "system" or supports_system_role(tokenizer):
        return list(messages)
    system, rest = messages[0]["content"], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` in the chat template: the template writes every special token
    (its own BOS included), so the text is tokenized with `add_special_tokens=False`; calling
    `tokenizer(rendered)` instead would add a second BOS with tokenizers whose post-processor adds one.
    The one place the project renders a conversation into ids."""
    text = tokenizer.apply_chat_template(fit_roles(tokenizer, messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def document_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Plain documents as language-modelling sequences `bos text eos` (bos where the tokenizer has
    one), as pretraining packs them: SFT `text` records and PPO-ptx pretraining documents."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: the first special token the chat template writes after
    the assistant's content (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`; eos in the project's own
    template). Generation stops at it, "finished" means it was produced, and the reward model reads
    its score there. Falls back to eos for a template that writes no special token after a turn."""
    return _template_fact(tokenizer, "end_of_turn", _end_of_turn_id)


def _end_of_turn_id(tokenizer) -> int:
    content = "Zq"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}],
                                         tokenize=False)
    after = text[text.rindex(content) + len(content):]
    specials = special_ids(tokenizer)
    for i in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if i in specials:
            return i
    return tokenizer.eos_token_id


def assistant_token_mask(tokenizer, messages: list[dict], first: int = 0) -> tuple[list[int], list[bool]]:
    """(ids, mask) of a conversation in the chat template; mask True on the tokens of every assistant
    message from index `first` on: its content through its end-of-turn token. Any template works,
    with or without `{% generation %}` markers: the conversation is rendered prefix by prefix, and
    an assistant message owns the tokens between `messages[:i]` + generation prompt and
    `messages[:i+1]`, cut after the end-of-turn token (ChatML's trailing newline is not the
    assistant's). Raises ValueError for a template that renders earlier turns differently once
    later ones follow: its mask would be wrong."""
    fitted = fit_roles(tokenizer, messages)
    first -= len(messages) - len(fitted)  # a system message folded into the first user turn
    ids = chat_ids(tokenizer, fitted)
    mask = [False] * len(ids)
    eot = end_of_turn_id(tokenizer)
    for i, m in enumerate(fitted):
        if m["role"] != "assistant" or i < first:
            continue
        head = chat_ids(tokenizer, fitted[:i], add_generation_prompt=True)
        turn = ids if i == len(fitted) - 1 else chat_ids(tokenizer, fitted[: i + 1])
        if turn[: len(head)] != head or ids[: len(turn)] != turn:
            raise InputError(f"the chat template does not render message {i} as a prefix of the conversation "
                             f"(roles {[x['role'] for x in fitted]}), so its assistant tokens cannot be located; "
                             f"use a template that renders earlier turns the same way whatever follows")
        own = turn[len(head):]
        end = len(head) + (own.index(eot) + 1 if eot in own else len(own))
        mask[len(head): end] = [True] * (end - len(head))
    return ids, mask
