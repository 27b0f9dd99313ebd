"""Model construction and loading: size presets for from-scratch Llama models, and helpers
that every stage uses to load a parent's model directory."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from pipeline.config import InputError

# Llama-architecture presets. `tiny` trains on 2 CPU cores in minutes; the rest are for GPUs.
PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=512),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=1536),
    "base": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=2816),
    "large": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                  intermediate_size=5632),
}


def attn_implementation(name: str = "auto", precision: str = "no") -> str:
    """The attention kernel to load models with, for a stage running at (resolved) `precision`:
    `auto` = flash_attention_2 where it can run: a CUDA GPU, 16-bit compute (the kernel refuses
    fp32 tensors) and a flash-attn package that transformers' own check accepts (one built for
    another torch would break every load); eager for bf16 on a CPU, where the backward of
    PyTorch's CPU flash-attention kernel in bf16 costs more than the matmuls bf16 saves (a training
    step of the tiny preset on one AMX thread: fp32 sdpa 0.32 s, bf16 sdpa 0.35 s, bf16 eager
    0.22 s); else PyTorch's sdpa. A flash kernel asked for by name needs 16-bit compute too."""
    flash = name.startswith("flash_attention")
    if flash and precision not in ("bf16", "fp16"):
        raise InputError(f"attn_implementation={name} runs on 16-bit tensors only, and precision={precision} computes in "
                         "fp32: use precision=bf16, or attn_implementation=sdpa")
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "flash_attention_2" if precision in ("bf16", "fp16") and flash_attention_available() else "sdpa"
    return "eager" if precision == "bf16" else "sdpa"


def flash_attention_available() -> bool:
    """transformers' own check that the flash-attn package imports and fits this torch."""
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def fp32_attention(model: torch.nn.Module) -> torch.nn.Module:
    """A model that will run in fp32 without autocast (a gathered copy, a merged LoRA) off
    flash-attention, which refuses fp32 tensors: PyTorch's sdpa instead."""
    config = getattr(model, "config", None)
    if config is not None and str(getattr(config, "_attn_implementation", "")).startswith("flash_attention"):
        model.set_attn_implementation("sdpa")
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Activation recomputation in the backward pass; non-reentrant, so it composes with DDP,
    FSDP2 and frozen inputs (LoRA)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False  # the cache is useless while recomputing; generation passes use_cache itself
    return model


def frozen_numerics(precision: str, launcher: str = "plain") -> str:
    """How an inference-only model stores its weights so that it computes exactly as a trained
    model of the same weights does, for the same weights must give the same log-probabilities
    (PPO's first KL is 0; docs/ppo.md §30):

    - 'fp32' without mixed precision: everything fp32;
    - 'autocast' for bf16 autocast over fp32 weights (one process, DDP): the matrices of linear
      layers in bf16, which autocast rounds them to anyway, embeddings and norms fp32 as the
      trained model has them (about half of fp32's memory);
    - 'bf16' where the trained models compute from bf16 parameters (FSDP2's mixed-precision
      policy, DeepSpeed's bf16 engines): every parameter bf16, buffers (rotary frequencies) fp32.
    `precision` as `pipeline.runtime.resolve_precision` gives it; `launcher` as
    `pipeline.distributed.launcher_kind` or the memory plan names it ('fsdp'). This is the rule the
    memory plan assumes for GPUs; a running stage asks its accelerator
    (`pipeline.distributed.trained_numerics`)."""
    if precision not in ("bf16", "fp16"):
        return "fp32"
    return "bf16" if launcher in ("fsdp", "fsdp2", "zero2", "zero3") else "autocast"


def as_frozen(model: torch.nn.Module, numerics: str, precision: str = "bf16") -> torch.nn.Module:
    """`model` (loaded in fp32) stored as `frozen_numerics` says; fp16 in place of bf16 when the
    run's precision is fp16. Tied embeddings stay as the embedding is. An 'autocast' model always
    computes under autocast, whoever calls it, as the trained model's forward does."""
    half = torch.float16 if precision == "fp16" else torch.bfloat16
    if numerics == "bf16":  # parameters only: buffers (rotary frequencies) stay fp32, as the engines keep them
        for p in model.parameters():
            p.data = p.data.to(half)
        return model
    if numerics == "autocast":
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and id(m.weight) not in embeddings:
                m.to(half)
        forward = model.forward

        def autocast_forward(*args, **kwargs):
            device = next(model.parameters()).device.type
            with torch.autocast(device_type=device, dtype=half):
                return forward(*args, **kwargs)

        model.forward = autocast_forward
    return model


def frozen_dtype(device: torch.device) -> torch.dtype:
    """Inference-only models (PPO's reference and reward model, the policy that samples RM data):
    bf16 on GPUs that support it, where it halves memory and time; fp32 on CPUs, where bf16 is slower."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def llama_from_preset(preset: str, tokenizer, max_position_embeddings: int, dropout: float = 0.0,
                      attn: str = "auto"):
    """A randomly initialised `LlamaForCausalLM` sized by `preset`, matching `tokenizer`'s ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise InputError(f"model.preset={preset!r} is not a preset; choose one of {', '.join(PRESETS)}")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         attention_dropout=dropout, **PRESETS[preset])
    config._attn_implementation = attn_implementation(attn)
    return LlamaForCausalLM(config)


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off: with it, PPO ratios are not 1 at step 0 and KL estimates are noise. Llama-style
    attention keeps its dropout as a float attribute, not an nn.Dropout module: zero that too."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "attention_dropout", None), float):
        config.attention_dropout = 0.0
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    from pipeline.tokenizer import ensure_chat_ready

    tok = AutoTokenizer.from_pretrained(str(path))
    ensure_chat_ready(tok)
    return tok


@contextlib.contextmanager
def whole_on_every_rank() -> Iterator[None]:
    """Load models whole on every process. Under a ZeRO-3 launcher transformers would partition
    them while loading; our loaders then read real shapes (embedding size), frozen models stay
    whole, and `accelerator.prepare` partitions the trained ones itself."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_causal_lm(path: str | Path, tokenizer=None, dtype: torch.dtype = torch.float32, attn: str = "auto"):
    """Load a causal LM; grow its embeddings if the tokenizer gained tokens (e.g. a pad token)."""
    from transformers import AutoModelForCausalLM

    with whole_on_every_rank():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn_implementation(attn))
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
