"""Process setup shared by all stages: threads, seeds, the accelerator."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import torch

from pipeline.config import InputError


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def quiet_libraries() -> None:
    """Progress bars of dataset maps and shard writes drown the stage's own progress lines."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def configure_threads(threads: int = 0) -> int:
    """Set torch's thread count. 0 = all cores for a lone process; with several CPU processes one
    each: with two OpenMP threads per process, any other busy process makes each step 10-30x
    slower (threads spin-wait for a descheduled sibling). On a GPU node the cores are shared out
    among its processes: the CPU work (tokenisation, fp64 statistics) runs on them."""
    if threads <= 0:
        cores, world = max(1, os.cpu_count() or 1), world_size_from_env()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        # on a GPU node the cores are shared out (tokenisation, statistics run on them); on CPUs
        # several processes spin-wait on each other's threads unless each has one
        if torch.cuda.is_available():
            threads = max(1, cores // local)
        else:
            threads = 1 if world > 1 else cores
    torch.set_num_threads(threads)
    quiet_libraries()
    return threads


# Named seed streams of a run's `seed`: each random choice a stage makes draws from its own
# stream, so a new draw in one never moves another. Offsets are fixed once given (changing one
# changes that stream's draws); every process r adds PROCESS_STRIDE * r for its own samples.
SEED_STREAMS = {
    "train": 0,                # data order, initialisation, the training comparisons' samples
    "held_out": 1,             # samples of the held-out comparisons (rm, dpo)
    "rm/reference": 2,         # SFT samples the reward scores are normalised on
    "rm/reference_subset": 3,  # the subset of training responses used as that reference
    "rm/calibration": 4,       # comparisons held out to fit the likelihood term's weight
    "ptx": 7,                  # order of the PPO-ptx batches
    "abstentions": 8,          # the comparisons that get an abstention (data.abstentions)
}
PROCESS_STRIDE = 100003


def seed_for(seed: int, stream: str, rank: int = 0) -> int:
    """The seed of the named `stream` (`SEED_STREAMS`) of a run's `seed`, on process `rank`."""
    return seed + SEED_STREAMS[stream] + PROCESS_STRIDE * rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def stage_accelerator(cfg):
    """The accelerator of a stage: its precision, its collective timeout (`dist_timeout_min`), its
    gradient reduction dtype (`reduce_fp32`) and, on GPUs, TF32 for fp32 matmuls unless `tf32=false`; on several nodes, checked to see one
    `runs_dir` everywhere (`pipeline.distributed.check_shared_filesystem`)."""
    from pipeline.distributed import check_shared_filesystem, configure_reduction

    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    accelerator = make_accelerator(mixed_precision=resolve_precision(cfg.precision), timeout_min=cfg.dist_timeout_min)
    configure_reduction(accelerator, cfg.reduce_fp32)
    check_shared_filesystem(accelerator, cfg.runs_dir)
    return accelerator


def make_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str | None = None,
                     timeout_min: float = 120.0):
    """An `Accelerator` that works the same on CPU (gloo) and GPU (nccl) launches, FSDP2 included.

    A launched stage is its own process, but tests and notebooks run several stages in one, whose
    mixed precision may differ: accelerate keeps it in a process-wide state that refuses a second
    value, so each stage's accelerator starts from a fresh one (the process group is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)

    # accelerate drops DeepSpeed when told cpu=True; without a GPU DeepSpeed picks its own CPU backend.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    cpu = not torch.cuda.is_available() and not deepspeed
    kwargs = {"cpu": cpu, "gradient_accumulation_steps": gradient_accumulation_steps}
    if mixed_precision:
        kwargs["mixed_precision"] = mixed_precision
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    # A collective waits `timeout_min` (torch's default, 10 minutes, is shorter than rank 0 alone
    # training a tokenizer on large files or writing a full checkpoint); gloo named explicitly for
    # DeepSpeed on CPUs: with no backend accelerate would count a single process.
    group = {"timeout": timedelta(minutes=timeout_min)}
    if deepspeed and not torch.cuda.is_available():
        group["backend"] = "gloo"
    kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(**group)]
    fsdp_on_cpu = cpu and world_size_from_env() > 1 and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if fsdp_on_cpu:
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin()  # read from the launcher's FSDP_* variables
    accelerator = Accelerator(**kwargs)
    if fsdp_on_cpu:
        _promote_to_fsdp(accelerator, kwargs["fsdp_plugin"])
    return accelerator


def _promote_to_fsdp(accelerator, plugin) -> None:
    """accelerate enables FSDP only on accelerator devices, but torch's `fully_shard` runs on gloo
    CPU processes too: switch the (shared) state to FSDP so that every stage runs its FSDP code
    path on CPU exactly as on GPUs. Both shared states must agree: a later `AcceleratorState()`
    (e.g. the Trainer's own Accelerator) copies the process state over its own."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if plugin.fsdp_version != 2:
        raise InputError("FSDP on CPU processes needs fsdp_version: 2 in the launcher file (configs/accelerate/fsdp.yaml)")
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 on a GPU that supports it, else fp32 ('no'). Mixed precision: weights,
    optimizer state and the PPO math stay fp32, matmuls run in bf16 (docs/ppo.md §30).

    On CPUs that multiply bf16 in hardware (Intel AMX), `bf16` can be asked for by hand: a
    training step of 256 hidden x 6 layers takes 0.68 s instead of 1.37 s on one thread. auto
    stays fp32 on CPUs: decoding does not gain (the tiny pipeline took 417 s instead of 466 s),
    and the tiny models do not come out equal (SFT accuracy 48% instead of 80% at one seed of
    three; docs/distributed.md)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """torch AdamW (`params`: tensors or param-group dicts), with the fused kernel wherever every
    parameter lives on a device that has it (CPU, CUDA): one kernel per tensor instead of about
    ten ops, the same update. A step of the tiny model's 1.2M parameters takes 1.2 ms instead of
    4.1 ms on one CPU thread (8.5 vs 31 ms at 256 hidden x 6 layers). transformers' Trainer (SFT,
    TRL's RewardTrainer) already defaults to it."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def adamw_warmup_cosine(model: torch.nn.Module, optim, total: int):
    """(AdamW, its schedule) for a stage's own loop: weight decay on matrices only (not on norms,
    biases or other vectors), warm-up then cosine decay to `optim.min_lr_ratio` over `total` steps
    (`warmup_cosine`). `optim`: the stage's `optim` section (lr, weight_decay, betas, warmup_steps,
    min_lr_ratio). The schedule is not to be `prepare`d: accelerate would step it once per process."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = adamw([{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                      lr=optim.lr, betas=tuple(optim.betas))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total, optim.warmup_steps, optim.min_lr_ratio))
    return optimizer, schedule


# ------------------------------------------------------------------------------ data order
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    # a CPU generator drives a CPU permutation (same order on every process and device type)
    g = torch.Generator(device="cpu").manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g, device="cpu").tolist()


def batch_indices(step: int, n: int, size: int, seed: int) -> list[int]:
    """Global indices of batch `step`: consecutive slices of a seeded permutation per epoch, the
    same on every process, so a resumed run reproduces the data position exactly."""
    start, out = step * size, []
    while len(out) < size:
        epoch, offset = divmod(start + len(out), n)
        out.extend(epoch_order(n, seed, epoch)[offset: offset + size - len(out)])
    return out


def in_step_order(dataset, steps: int, batch: int, seed: int):
    """A `datasets.Dataset` laid out in the stage's data order for an HF Trainer that reads it
    sequentially (`train_sampling_strategy="sequential"`, `max_steps=steps`): global batch k holds
    the items of `batch_indices(k)`. The Trainer's own shuffle pads the last batch of an epoch
    under DDP and reshuffles per epoch, so 1 and 2 processes drifted apart; in this order they see
    the same micro-batches (the test: tests/test_sft.py)."""
    return dataset.select([i for step in range(steps) for i in batch_indices(step, len(dataset), batch, seed)])


def batch_split(global_batch: int, micro_max: int, world_size: int, what: str = "batch.size") -> tuple[int, int]:
    """(micro, accumulation) with global = micro x processes x accumulation. `micro` is the largest
    size <= micro_max that divides the per-process batch, so the default configs run unchanged on
    any process count that divides the global batch. Derived here only, never configured."""
    if global_batch % world_size:
        raise InputError(f"{what}={global_batch} is not divisible by {world_size} processes; "
                         f"use a multiple of {world_size}")
    per_process = global_batch // world_size
    micro = max(m for m in range(1, min(micro_max, per_process) + 1) if per_process % m == 0)
    return micro, per_process // micro


def total_steps(steps: int, epochs: float, n: int, batch: int) -> int:
    """Optimizer steps of a stage whose length is `steps`, or with steps = -1, `epochs` passes over
    `n` items in batches of `batch` (the last one wrapping into the next pass)."""
    return steps if steps > 0 else max(1, math.ceil(epochs * n / batch))


def micro_batch(batch: list[int], a: int, micro: int, rank: int, world: int) -> list[int]:
    """Micro-batch `a` of process `rank` of a global batch split by `batch_split`: the
    (a * world + rank)-th run of `micro` consecutive items. Any process count with the same micro
    size forms the same micro-batches, so 1 process with accumulation 2 and 2 processes without
    compute the same gradients (bitwise under DDP: docs/distributed.md)."""
    lo = (a * world + rank) * micro
    return batch[lo: lo + micro]


def warmup_cosine(step: int, total: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning-rate factor of optimizer step `step` (0-based): linear warm-up over `warmup_steps`,
    then cosine decay to `min_ratio` at step `total`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def machine() -> str:
    """The CPU model and core count, for figures that say where they ran (fp32 kernels differ between CPUs)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"
