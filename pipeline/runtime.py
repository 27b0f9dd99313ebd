"""Process setup shared by all stages: threads, seeds, the accelerator."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import torch


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
    """Set torch's thread count. 0 = all cores for a lone process, 1 when several processes run.

    With two OpenMP threads per process, any other busy process makes each step 10-30x slower
    (threads spin-wait for a descheduled sibling), so multi-process runs use one thread each.
    """
    if threads <= 0:
        threads = 1 if world_size_from_env() > 1 else max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    quiet_libraries()
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str | None = None):
    """An `Accelerator` that works the same on CPU (gloo) and GPU (nccl) launches."""
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available()
    kwargs = {"cpu": cpu, "gradient_accumulation_steps": gradient_accumulation_steps}
    if mixed_precision:
        kwargs["mixed_precision"] = mixed_precision
    return Accelerator(**kwargs)


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 on a GPU that supports it, else fp32 ('no'); bf16 is slower on CPU."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def warmup_cosine(step: int, total: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning-rate factor of optimizer step `step` (0-based): linear warm-up over `warmup_steps`,
    then cosine decay to `min_ratio` at step `total`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
