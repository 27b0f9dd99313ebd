"""Tests run in one process with one torch thread: with two threads, any other busy process makes
each step 10-30x slower. wandb is off unless a test turns it on."""
import os
import sys
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_world():
    """A small world so data generation and training stay fast."""
    from pipeline.config import WorldConfig

    return WorldConfig(num_people=20, corpus_docs=600, sft_examples=300, eval_examples=8)
