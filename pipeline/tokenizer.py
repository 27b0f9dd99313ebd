"""A byte-level BPE tokenizer trained from scratch, wrapped as a `PreTrainedTokenizerFast`.

Special tokens: `<s>` (bos), `</s>` (eos, the stop token), `<pad>` (distinct from eos: with
pad == eos, masks built from `!= pad` hide the stop token and sequence-classification pooling
reads the reward one token early), and role markers for the chat template.
"""
from __future__ import annotations

from typing import Iterable

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# The assistant turn is wrapped in {% generation %} so TRL can train on assistant tokens only;
# the turn ends with eos and nothing follows it, so the last token of a scored dialogue is eos.
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
    """Make a user-supplied tokenizer usable by every stage: a pad token distinct from eos and a
    chat template. Returns the list of changes made (for the log)."""
    changes = []
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token; the stages need one to stop generation")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD})
        changes.append(f"added pad token {PAD!r} distinct from eos")
    if not tokenizer.chat_template:
        tokenizer.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
        tokenizer.chat_template = CHAT_TEMPLATE if tokenizer.bos_token else CHAT_TEMPLATE.replace("{{ bos_token }}", "")
        changes.append("installed the project chat template")
    return changes
