import pytest


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from pipeline.config import WorldConfig
    from pipeline.tokenizer import train_tokenizer
    from pipeline.world import World

    return train_tokenizer(World(WorldConfig(corpus_docs=500)).corpus(), vocab_size=600)


def test_special_tokens(tok):
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token_id is not None and tok.eos_token_id is not None


def test_round_trip(tok):
    text = "Bralo lives in Vemora. A sign said RED FOX. Ünïcode 42!"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_chat_template_marks_assistant_turns(tok, tmp_path):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the words: red fox"},
                {"role": "assistant", "content": "Answer: fox red."}]
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)  # plain transformers, no project code
    out = tok2.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assistant = [i for i, m in zip(ids, mask) if m]
    assert tok2.decode(assistant) == "Answer: fox red.</s>"
    assert ids[-1] == tok2.eos_token_id and mask[-1] == 1
    prompt = tok2.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>")
    with pytest.raises(Exception, match="unknown role"):
        tok2.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
