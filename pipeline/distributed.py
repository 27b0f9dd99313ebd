"""What a sharded launcher (FSDP2, DeepSpeed ZeRO) changes for a stage, in one place:

- `full_state_dict`: the whole model's weights gathered for export (a collective: every rank calls it);
- `save_model`: a plain `save_pretrained` directory written by rank 0 from those weights;
- `full_parameters`: full parameters held for a generation loop or an evaluation, so ranks that
  stop sampling at different steps, or hold different numbers of examples, never wait on each
  other's all-gathers;
- `inference_copy`: an unsharded copy of a trained model on every rank, for the work after
  training (normalization, evaluation) that writes weights or runs rank-local forwards, filled
  one gathered parameter at a time.

With DDP or one process each is the plain operation on the unwrapped model.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

import torch

from pipeline import runs
from pipeline.models import fp32_attention, whole_on_every_rank


def launcher_kind(accelerator) -> str:
    """'fsdp2', 'zero3', 'zero2' (any other ZeRO stage too), or 'plain' (one process or DDP)."""
    from accelerate.utils import DistributedType

    if getattr(accelerator, "is_fsdp2", False):
        return "fsdp2"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
        return "zero3" if stage == 3 else "zero2"
    return "plain"


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def model_kind(accelerator, model: torch.nn.Module) -> str:
    """`launcher_kind`, or 'plain' for a model that was not prepared (frozen models, copies)."""
    kind = launcher_kind(accelerator)
    if kind == "fsdp2" and not _fsdp_modules(model):
        return "plain"
    if kind.startswith("zero") and not hasattr(model, "zero_optimization_stage"):
        return "plain"
    return kind


def check_shared_filesystem(accelerator, directory: str | Path) -> None:
    """On several nodes rank 0 alone writes tokenizers, checkpoints, exports and manifests, which
    the other nodes then read: every node must see rank 0's `directory` (a shared filesystem).
    Checked at a stage's start with a file rank 0 writes; one node missing it stops the run."""
    import os
    import socket
    import uuid

    from accelerate import utils

    from pipeline.config import InputError

    world = accelerator.num_processes
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) >= world:
        return  # one node
    token = [f".shared-check-{uuid.uuid4().hex}" if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / token[0]).write_text("")
    token = utils.broadcast_object_list(token)
    accelerator.wait_for_everyone()
    seen = utils.gather_object([(socket.gethostname(), (Path(directory) / token[0]).exists())])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (Path(directory) / token[0]).unlink(missing_ok=True)
    blind = sorted({host for host, ok in seen if not ok})
    if blind:
        raise InputError(f"runs_dir={directory} is not shared: {', '.join(blind)} cannot see what rank 0 writes there. "
                         "A run on several nodes needs a filesystem every node mounts at the same path (NFS, Lustre, ...)"
                         "; pass runs_dir=<that path>")


def _sixteen_bit_parameters(accelerator) -> bool:
    """Whether the launcher computes from 16-bit parameters: FSDP2 with a 16-bit `param_dtype`,
    DeepSpeed's bf16/fp16 engines."""
    kind = launcher_kind(accelerator)
    if kind == "fsdp2":
        policy = getattr(accelerator.state.fsdp_plugin, "mixed_precision_policy", None)
        return getattr(policy, "param_dtype", None) in (torch.bfloat16, torch.float16)
    if kind.startswith("zero"):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        return any((ds.get(k) or {}).get("enabled") for k in ("bf16", "fp16"))
    return False


def configure_reduction(accelerator, fp32: bool = True) -> None:
    """Gradients summed across processes in fp32 (`fp32`) or in the 16-bit compute dtype, under
    the launchers that reduce 16-bit gradients by default: FSDP2's mixed-precision policy
    (`reduce_dtype`, read when a model is prepared) and DeepSpeed's `communication_data_type`
    (read when an engine is built: call it before `prepare`, or on an HF Trainer's accelerator
    before `train`). DDP reduces the fp32 gradients of fp32 parameters already."""
    if not _sixteen_bit_parameters(accelerator):
        return
    if launcher_kind(accelerator) == "fsdp2":
        import dataclasses

        plugin = accelerator.state.fsdp_plugin
        policy = plugin.mixed_precision_policy
        plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=torch.float32 if fp32 else policy.param_dtype)
    elif fp32:
        accelerator.state.deepspeed_plugin.deepspeed_config["communication_data_type"] = "fp32"
    else:
        accelerator.state.deepspeed_plugin.deepspeed_config.pop("communication_data_type", None)


def trained_numerics(accelerator) -> str:
    """How this run's trained models compute, for frozen models to store their weights alike
    (`pipeline.models.frozen_numerics`, `as_frozen`): 'fp32' without mixed precision; 'bf16' when
    the launcher computes from 16-bit parameters (FSDP2 with a 16-bit `param_dtype`, DeepSpeed's
    bf16/fp16 engines); else 'autocast' (fp32 weights under autocast)."""
    if accelerator.mixed_precision not in ("bf16", "fp16"):
        return "fp32"
    return "bf16" if _sixteen_bit_parameters(accelerator) else "autocast"


def load_frozen(accelerator, path, tokenizer, precision: str, attn: str = "auto") -> torch.nn.Module:
    """A causal LM (the parent SFT policy) for inference only, on this process's device, stored as
    the trained models compute (`trained_numerics`, `pipeline.models.as_frozen`): what samples a
    preference stage's comparisons and scores the likelihood term, with the values PPO's reference
    computes. `precision` as the stage's key (`auto` resolved here)."""
    from pipeline.models import as_frozen, load_causal_lm
    from pipeline.runtime import resolve_precision

    model = load_causal_lm(path, tokenizer, attn=attn).eval().requires_grad_(False)
    return as_frozen(model, trained_numerics(accelerator), resolve_precision(precision)).to(accelerator.device)


def shard_frozen(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen (inference-only) model sharded over the processes like the trained ones, so its
    memory per GPU divides by the process count: FSDP2 `fully_shard` per decoder layer under fsdp,
    a ZeRO-3 inference engine under zero3 (TRL's `prepare_deepspeed`; the module is returned, its
    hooks gather each layer in its forward). Elsewhere the model stays whole. A sharded model's
    forwards are collectives: every process must make the same calls (`lockstep`)."""
    kind = launcher_kind(accelerator)
    if accelerator.num_processes == 1 or kind not in ("fsdp2", "zero3"):
        return model
    if kind == "fsdp2":
        from pipeline.memory import fully_shard_model

        # reshard_after_forward given (not None): the root reshards too, which FSDP2 skips by default
        # for a trained root whose backward follows at once; a frozen one has no backward.
        return fully_shard_model(model, None, reshard_after_forward=True)
    from trl.models.utils import prepare_deepspeed

    engine = prepare_deepspeed(model, accelerator)
    engine.module.__dict__["_inference_engine"] = engine  # keep the engine (and its hooks) alive
    return engine.module


_WHOLE = "_full_parameters_held"


def is_sharded(model) -> bool:
    """Whether `model`'s parameters are split over processes (FSDP2 units or ZeRO-3 partitions):
    its forwards are then collectives, which every process must call alike."""
    if not isinstance(model, torch.nn.Module):
        model = getattr(model, "policy", model)  # an adapter-disabled view of a policy
    if model.__dict__.get(_WHOLE):  # inside `full_parameters`: gathered, each process on its own
        return False
    if _fsdp_modules(model):
        return True
    return any(hasattr(p, "ds_id") for p in model.parameters())


def full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a prepared model, complete on rank 0 and on the CPU (other
    ranks may get an empty dict; under FSDP2 each tensor moves to rank 0's CPU as it is gathered).
    Call it on every rank: under FSDP2 and ZeRO-3 it all-gathers."""
    kind = model_kind(accelerator, model)
    if kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if kind.startswith("zero"):
        return accelerator.get_state_dict(model)
    return {k: v.detach().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()}


def inference_copy(accelerator, model: torch.nn.Module, numerics: str = "fp32", precision: str = "no",
                   keep_fp32: tuple[str, ...] = ()) -> torch.nn.Module:
    """The trained model as a plain module on every rank, for the work after training that runs
    rank-local forwards or writes weights (the reward model's normalization and evaluation).

    Under DDP, ZeRO-2 or one process: the unwrapped model itself. Under FSDP2 and ZeRO-3: a copy
    built on the meta device (no random init, which takes minutes at 8B) and stored as the trained
    models compute (`numerics`, `pipeline.models.as_frozen`; the submodules named in `keep_fp32`
    stay fp32 and take their input in fp32), then filled one parameter at a time, each gathered
    from its shards, cast and copied: no rank holds a full fp32 state dict or a full fp32 model
    beside its shards (docs/memory.md). Call it on every rank (the gathers are collectives)."""
    kind = model_kind(accelerator, model)
    unwrapped = accelerator.unwrap_model(model)
    if kind in ("plain", "zero2"):
        return unwrapped
    from torch.distributed.fsdp import FSDPModule

    from pipeline.models import as_frozen

    cls = type(unwrapped).__mro__[FSDPModule._orig_cls_mro_index] if isinstance(unwrapped, FSDPModule) else type(unwrapped)
    with torch.device("meta"), whole_on_every_rank():
        copy = cls(unwrapped.config)
    as_frozen(copy, numerics, precision)  # dtypes only: nothing is allocated yet
    for name in keep_fp32:
        module = copy.get_submodule(name)
        module.float()
        module.register_forward_pre_hook(lambda m, args: tuple(a.float() if torch.is_tensor(a) else a for a in args))
    copy.to_empty(device=accelerator.device)
    targets = dict(copy.named_parameters(remove_duplicate=False))
    for name, p in unwrapped.named_parameters():  # the same order on every rank
        with _one_gathered(kind, p) as full:
            targets[name].data.copy_(full)
    targets = dict(copy.named_buffers())
    for name, b in unwrapped.named_buffers():  # replicated, not sharded (rotary frequencies)
        targets[name].copy_(b)
    copy.tie_weights()
    if numerics == "fp32":
        fp32_attention(copy)
    return copy.requires_grad_(False).train(unwrapped.training)


@contextlib.contextmanager
def _one_gathered(kind: str, param: torch.nn.Parameter) -> Iterator[torch.Tensor]:
    """One parameter whole, gathered from its shards for the time of the block."""
    if kind == "fsdp2":
        yield param.full_tensor() if hasattr(param, "full_tensor") else param.data
    else:
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            yield param.data


def save_model(accelerator, model: torch.nn.Module, tokenizer, out_dir: Path, state_dict: dict | None = None,
               copies: dict[str, Path] | None = None) -> None:
    """Write `out_dir` as a plain `save_pretrained` directory (safetensors + tokenizer), atomically,
    from rank 0, whatever the launcher. The saved config keeps `use_cache: true` so that a user's
    `generate` uses the KV cache. `copies`: subdirectory name -> a directory copied into it whole,
    in the same atomic write. Every rank must call this (the gather is a collective)."""
    if state_dict is None and (accelerator.is_main_process or model_kind(accelerator, model) != "plain"):
        state_dict = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        config = getattr(unwrapped, "config", None)
        if config is not None:
            config.use_cache = True
        with runs.atomic_dir(out_dir) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            for name, source in (copies or {}).items():
                shutil.copytree(source, Path(tmp) / name)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def full_parameters(accelerator, model: torch.nn.Module, whole: bool = True) -> Iterator[torch.nn.Module]:
    """Yield the unwrapped model with its full parameters present for a whole generation loop or
    evaluation (no backward inside).

    FSDP2: every FSDP unit is all-gathered once and kept (no reshard after each forward), so a
    rank whose samples all stopped early does not leave the others waiting in an all-gather.
    ZeRO-3: the parameters are gathered and the engine's hooks removed meanwhile, the way TRL's
    `unwrap_model_for_generation` does.
    Otherwise nothing is gathered.

    `whole=False` (a policy whose full weights do not fit next to everything else; PPO's
    `rollout.gather=layer`): nothing is gathered up front; each forward gathers one layer at a time
    and frees it again, as in training, so every decoding step is a collective and the model
    decodes in lockstep (`is_sharded` stays true: transformers' `synced_gpus`). Slower: each step
    all-gathers every layer, where the whole gather does it once per loop."""
    kind = model_kind(accelerator, model)
    unwrapped = accelerator.unwrap_model(model)
    if not whole and kind in ("fsdp2", "zero3"):
        yield unwrapped
        return
    if kind in ("fsdp2", "zero3"):
        unwrapped.__dict__[_WHOLE] = True
    try:
        with _gathered(accelerator, model, unwrapped, kind) as full:
            yield full
    finally:
        unwrapped.__dict__.pop(_WHOLE, None)


@contextlib.contextmanager
def _gathered(accelerator, model: torch.nn.Module, unwrapped: torch.nn.Module, kind: str) -> Iterator[torch.nn.Module]:
    if kind == "fsdp2":
        # torch's public FSDP2 API only: every unit gathered once and kept (no reshard after each
        # forward) for the loop, then resharded. The root unit never reshards after forward (FSDP2
        # leaves it gathered for the backward that follows); the others get back the launcher's
        # setting (`fsdp_reshard_after_forward`).
        units = [m for m in _fsdp_modules(unwrapped) if m is not unwrapped]
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        after = getattr(plugin, "reshard_after_forward", True)
        after = after if isinstance(after, bool) else True
        for m in _fsdp_modules(unwrapped):
            m.unshard()
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield unwrapped
        finally:
            for m in units:
                m.set_reshard_after_forward(after, recurse=False)
            for m in _fsdp_modules(unwrapped):
                m.reshard()
    elif kind == "zero3":
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        # With its hooks in place the engine runs collectives around every forward (parameter
        # fetches; the root module's pre-hook checks the step count across ranks), one per decoding
        # step, so ranks whose samples stop at different lengths would call different collectives.
        # Without them each rank decodes on its own.
        offload = getattr(model.optimizer, "parameter_offload", model.optimizer)
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            remove_hooks(model)
            offload.fwd_pre_hook.remove()
            try:
                yield unwrapped
            finally:
                add_hooks(model)
                # the root pre-hook as DeepSpeed's setup_zero_stage3_hooks registers it
                offload.fwd_pre_hook = offload.module.register_forward_pre_hook(
                    lambda module, *args: offload.get_param_coordinator().reset_step())
    else:
        yield unwrapped


# ------------------------------------------------------------------------------------------
# Our own training loops (pretrain, rm, ppo) under DeepSpeed: each trained model is its own
# engine; the loops keep their own accumulation and loss scaling.
# ------------------------------------------------------------------------------------------
def configure_deepspeed(accelerator, micro: int, accum: int, max_grad_norm: float) -> None:
    """Batch sizes and clipping that ZeRO engines are built with (before `prepare`): the engine
    steps once per `accum` backward calls and clips at `max_grad_norm`. No-op elsewhere."""
    if not launcher_kind(accelerator).startswith("zero"):
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * accum * accelerator.num_processes
    ds["gradient_clipping"] = max_grad_norm
    accelerator.gradient_accumulation_steps = accum  # what accelerate compares the engine's value with


def no_sync(accelerator, model: torch.nn.Module, sync: bool = False):
    """The context for a backward that is not the last micro-batch of an optimizer step (`sync`
    False): under DDP gradients accumulate locally and all-reduce at the last one. Under FSDP2
    every micro-batch reduce-scatters at once (docs/memory.md): deferring it would keep every
    layer's unsharded gradients until the last micro-batch (a whole model's gradients per GPU),
    while reducing each time keeps only this process's shard, for one reduce-scatter per
    micro-batch instead of per step. ZeRO engines accumulate in their partitions themselves."""
    if sync or model_kind(accelerator, model) != "plain":
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def backward(accelerator, model: torch.nn.Module, loss: torch.Tensor, boundary: bool = True) -> None:
    """Backpropagate `loss` into `model` (a prepared model). Our losses are already scaled for
    accumulation, so a ZeRO engine must not divide by its accumulation steps again; it steps (clip,
    update, zero) itself at the last micro-batch (`boundary`). Elsewhere: `accelerator.backward`."""
    if model_kind(accelerator, model).startswith("zero"):
        model.set_gradient_accumulation_boundary(boundary)
        model.backward(loss, scale_wrt_gas=False)
        if boundary:
            model.step()
    else:
        accelerator.backward(loss)


def clip_grad_norm(accelerator, model: torch.nn.Module, max_norm: float) -> float:
    """Clip the trainable parameters' gradients of `model`; returns the pre-clip global norm.
    A ZeRO engine clipped inside its own step: report the norm it measured."""
    if model_kind(accelerator, model).startswith("zero"):
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
    params = [p for p in model.parameters() if p.requires_grad]
    return float(accelerator.clip_grad_norm_(params, max_norm))


def trainer_launch_args(accelerator, timeout_min: float = 120.0, accumulation: int = 1,
                        max_grad_norm: float = 1.0) -> dict:
    """The TrainingArguments (TRL configs) fields that make an HF Trainer run under the stage's
    launcher. It shares the stage's accelerator state (the launcher; FSDP on CPU processes) rather
    than rebuilding its own, except under DeepSpeed: accelerate takes the DeepSpeed plugin only
    from the first Accelerator, so the trainer builds the state, on gloo when there is no GPU,
    from the launcher's variables, whose accumulation and clipping are set here to the stage's
    (the launcher file's would disagree with the Trainer's arguments and stop it at
    `deepspeed_init`)."""
    deepspeed = launcher_kind(accelerator).startswith("zero")
    if deepspeed:
        import os

        os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(accumulation)
        os.environ["ACCELERATE_GRADIENT_CLIPPING"] = str(max_grad_norm)
    cpu = accelerator.device.type == "cpu"
    # FSDP2: reduce-scatter every micro-batch, never unsharded gradients of every layer (`no_sync`)
    accumulation_kwargs = {"sync_each_batch": True} if launcher_kind(accelerator) == "fsdp2" else None
    return {"accelerator_config": {"use_configured_state": not deepspeed,
                                   "gradient_accumulation_kwargs": accumulation_kwargs}, "use_cpu": cpu and not deepspeed,
            "ddp_backend": "gloo" if deepspeed and cpu else None, "ddp_timeout": int(timeout_min * 60)}
