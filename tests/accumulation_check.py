"""What gradient accumulation keeps under FSDP2 between micro-batches, measured: the bytes of the
gradients held after the first micro-batch's backward, with `pipeline.distributed.no_sync` (each
micro-batch reduce-scatters: this process's gradient shard) and with accelerate's `no_sync`
(FSDP2 keeps every layer's unsharded gradients until the last micro-batch). tests/test_sharded.py
runs it on 2 processes:
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        tests/accumulation_check.py OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _gradient_bytes() -> int:
    """Bytes of every gradient held by any parameter alive in the process, FSDP2's own unsharded
    parameters included (found through the garbage collector), each storage counted once."""
    import gc

    seen, total = set(), 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or obj.grad is None:
            continue
        grad = obj.grad.to_local() if hasattr(obj.grad, "to_local") else obj.grad
        key = grad.untyped_storage().data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += grad.untyped_storage().nbytes()
    return total


def first_micro_batch(accelerator, ours: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.distributed import no_sync

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=128, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(accelerator.process_index))
    # one whole step first: FSDP2's lazy initialisation and AdamW's state are not what is measured
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    context = no_sync(accelerator, model) if ours else accelerator.no_sync(model)
    with context:
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss / 2)
    held = _gradient_bytes()
    accelerator.free_memory()
    return {"held_after_first_micro_batch": held, "full_gradient_bytes": full}


if __name__ == "__main__":
    torch.set_num_threads(1)
    from pipeline.runtime import make_accelerator

    acc = make_accelerator()
    result = {"ours": first_micro_batch(acc, True), "accelerate_no_sync": first_micro_batch(acc, False),
              "world": acc.num_processes}
    if acc.is_main_process:
        Path(sys.argv[1]).write_text(json.dumps(result))
    acc.wait_for_everyone()
