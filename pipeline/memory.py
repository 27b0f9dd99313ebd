"""Memory: what a stage will hold per GPU (the plan), and what code really allocates (the probe).

The plan (`Plan`, built by each stage's `memory_plan` and printed by `python -m pipeline plan`)
builds the stage's models on the meta device, shards them as the launcher will (FSDP2 for real
over torch's fake process group; the formulas of DeepSpeed's estimators for ZeRO) and adds the
activations, KV cache and gathered parameters of the stage's largest phase. docs/memory.md has
the formulas.

`TensorProbe` watches every tensor an operator creates inside its block (a `TorchDispatchMode`):
the peak of the bytes they hold at once, and the largest float32 tensor among them. The
project's rule, no `[batch, length, vocab]` float32 tensor (docs/memory.md), is checked with it in
the tests, and `make bench` prints its peaks. It counts what operators allocate (activations,
logits, temporaries), not weights that already existed, and a tensor's bytes until the tensor
object is gone (a view that outlives its base is not counted).
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorProbe(TorchDispatchMode):
    """`with TensorProbe() as probe: ...`, then `probe.peak_bytes`, `probe.largest_float32`
    (elements) and `probe.largest_float32_shape`."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak_bytes = 0
        self.largest_float32 = 0
        self.largest_float32_shape: tuple = ()
        self._held: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        if t.dtype == torch.float32 and t.numel() > self.largest_float32:
            self.largest_float32, self.largest_float32_shape = t.numel(), tuple(t.shape)
        key = t.untyped_storage().data_ptr()
        if key == 0 or key in self._held:  # a view, or an in-place result
            return
        nbytes = t.untyped_storage().nbytes()
        self._held[key] = nbytes
        self.live += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live)
        weakref.finalize(t, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._held.pop(key, 0)


# ------------------------------------------------------------------------------------------
# The memory plan: what each GPU holds for a stage, before anything is loaded (docs/memory.md)
# ------------------------------------------------------------------------------------------
GiB = 2**30


@dataclass
class PlannedModel:
    """One model a stage holds, as the stage loads it. `config`: its transformers config; trained
    models are fp32, frozen ones stored as `numerics` says (`pipeline.models.frozen_numerics`);
    `lora`: the LoRA section when adapters train on a frozen base; `shared_with`: the role whose
    weights compute it (held once, nothing of its own); `sharded_frozen`: whether the stage
    shards it when frozen under fsdp/zero3."""

    role: str
    config: Any
    classifier: bool = False
    numerics: str = "fp32"
    trained: bool = False
    lora: Any = None
    shared_with: str | None = None
    sharded_frozen: bool = True


@dataclass
class Row:
    role: str
    params: int
    weights: int
    grads: int
    optimizer: int
    trained: bool
    sharded: bool
    note: str = ""
    shared: bool = False

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


@dataclass
class Phase:
    """Memory a phase of the stage needs on top of the models' states (activations, KV cache,
    gathered parameters), per process."""

    name: str
    bytes: int
    note: str


@dataclass
class Plan:
    stage: str
    launcher: str
    nproc: int
    rows: list[Row]
    phases: list[Phase]
    gpu_mem_gib: float | None = None

    @property
    def static(self) -> int:
        return sum(r.total for r in self.rows)

    @property
    def peak(self) -> int:
        return self.static + max((p.bytes for p in self.phases), default=0)

    def fits(self) -> bool:
        return self.gpu_mem_gib is None or self.peak <= self.gpu_mem_gib * GiB

    def table(self) -> str:
        """The plan as the `plan` command prints it (GiB, or MiB for a plan under 1 GiB)."""
        unit, size = ("GiB", GiB) if self.peak >= GiB else ("MiB", 2**20)
        g = lambda b: f"{b / size:8.2f}"  # noqa: E731
        lines = [f"memory plan: {self.stage} on {self.nproc} process{'es' if self.nproc > 1 else ''} under "
                 f"{self.launcher} ({unit} per process)",
                 f"  {'model':<16}{'params':>9} {'weights':>8} {'grads':>8} {'optim':>8} {'total':>8}  how",
                 *(f"  {r.role:<16}{_count(r.params):>9} {g(r.weights)} {g(r.grads)} {g(r.optimizer)} {g(r.total)}  "
                   f"{'trained' if r.trained else 'frozen'}, "
                   f"{'shared' if r.shared else 'sharded' if r.sharded else 'whole'}"
                   + (f"; {r.note}" if r.note else "") for r in self.rows),
                 f"  {'models':<16}{'':>9} {'':>8} {'':>8} {'':>8} {g(self.static)}",
                 *(f"  + {p.name:<14}{'':>9} {'':>8} {'':>8} {'':>8} {g(p.bytes)}  {p.note}" for p in self.phases),
                 f"  {'peak':<16}{'':>9} {'':>8} {'':>8} {'':>8} {g(self.peak)}  = models + the largest phase"]
        if self.gpu_mem_gib is not None:
            verdict = "fits" if self.fits() else "does NOT fit"
            lines.append(f"  {verdict} in {self.gpu_mem_gib:g} GiB per GPU ({self.peak / GiB:.1f} GiB planned)")
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def planned_precision(cfg, device) -> str:
    """The precision a stage will run at on `device`: `resolve_precision`, but a plan for a GPU
    made on a CPU machine takes `auto` as the GPU would (bf16)."""
    from pipeline.runtime import resolve_precision

    if cfg.precision == "auto" and device.type == "cuda":
        return "bf16"
    return resolve_precision(cfg.precision)


def activation_bytes(precision: str) -> int:
    """Bytes per activation value: 2 under bf16/fp16 autocast, 4 in fp32."""
    return 2 if precision in ("bf16", "fp16") else 4


def build_plan(memory_plan, cfg, launcher: str, nproc: int, device, prompt_len: int, gpu_mem_gib: float | None) -> Plan:
    """A stage's plan (its `memory_plan`) for `nproc` processes under `launcher` (plain, ddp,
    fsdp, zero2, zero3), FSDP2 sharding over a process group of `nproc`, checked against
    `gpu_mem_gib` per GPU."""
    with fake_process_group(nproc if launcher == "fsdp" else 1) as mesh:
        plan = memory_plan(cfg, launcher, nproc, device, prompt_len, mesh)
    plan.gpu_mem_gib = gpu_mem_gib
    return plan


def plan_launcher(accelerator) -> str:
    """The running launcher as plans name it: plain, ddp, fsdp, zero2, zero3."""
    from pipeline.distributed import launcher_kind

    n = accelerator.num_processes
    return {"fsdp2": "fsdp", "zero2": "zero2", "zero3": "zero3"}.get(launcher_kind(accelerator), "ddp" if n > 1 else "plain")


def gpu_memory_gib(accelerator) -> float | None:
    """This process's GPU memory in GiB; None on a CPU (no limit to plan against)."""
    if accelerator.device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(accelerator.device).total_memory / GiB


def check_fits(cfg, accelerator, memory_plan, prompt_len: int = 256) -> None:
    """On a GPU, stop before loading anything large when the stage's plan (`memory_plan`, as
    `python -m pipeline plan` prints it) does not fit the GPU's memory; `memory_check=false` goes
    ahead anyway. Every process computes the same plan and stops alike."""
    if accelerator.device.type != "cuda" or not cfg.memory_check:
        return
    from pipeline.config import InputError

    plan = build_plan(memory_plan, cfg, plan_launcher(accelerator), accelerator.num_processes, accelerator.device,
                      prompt_len, gpu_memory_gib(accelerator))
    if not plan.fits():
        raise InputError(f"this run does not fit in GPU memory:\n{plan.table()}\n`python -m pipeline plan "
                         f"{cfg.stage} ...` names the cheapest change that fits; memory_check=false goes ahead anyway")


def meta_model(pm: PlannedModel) -> torch.nn.Module:
    """`pm` built on the meta device (shapes, no memory), LoRA adapters included."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if pm.classifier:
            config = copy.deepcopy(pm.config)
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_config(pm.config, dtype=torch.float32)
        if pm.lora is not None:
            import warnings

            from peft import LoraConfig, get_peft_model

            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            targets = "all-linear" if list(pm.lora.target_modules) == ["all-linear"] else list(pm.lora.target_modules)
            model = get_peft_model(model, LoraConfig(r=pm.lora.r, lora_alpha=pm.lora.alpha, target_modules=targets,
                                                     task_type="SEQ_CLS" if pm.classifier else "CAUSAL_LM"))
    if pm.lora is None:
        model.requires_grad_(pm.trained)
    if not pm.trained:
        from pipeline.models import as_frozen

        as_frozen(model, pm.numerics)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (its `_no_split_modules` classes): the units FSDP shards one by
    one, as accelerate's TRANSFORMER_BASED_WRAP does."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def fully_shard_model(model: torch.nn.Module, mesh, **kwargs) -> torch.nn.Module:
    """FSDP2 over `mesh`: each decoder layer a unit, then the root (the stages' frozen models, and
    the plan's measure of what accelerate does to trained ones)."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def _local_bytes(params) -> tuple[int, int]:
    """(elements, bytes) this process holds of `params` (DTensor shards or plain tensors)."""
    n = b = 0
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        n += local.numel()
        b += local.numel() * local.element_size()
    return n, b


def model_row(pm: PlannedModel, launcher: str, nproc: int, mesh=None) -> Row:
    """What one process holds of `pm` under `launcher`: weights as loaded (trained ones stay in
    their dtype, fp32, and are computed in bf16 under autocast), float32 gradients and AdamW's two
    float32 moments for trainable parameters. fsdp: sharded by FSDP2 over `mesh` (a real or fake
    process group of `nproc`), the figures read off the shards; zero2/zero3: the formulas of
    DeepSpeed's estimators (`estimate_zero{2,3}_model_states_mem_needs`) for trained models,
    frozen ones sharded by ZeRO-3's inference engine."""
    model = meta_model(pm)
    params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad] if pm.trained else []
    n_train = sum(p.numel() for p in trainable)
    if pm.shared_with:
        return Row(pm.role, params, 0, 0, 0, False, False, f"computed by the {pm.shared_with}: no copy", shared=True)
    whole_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not pm.trained:
        if nproc == 1 or launcher not in ("fsdp", "zero3") or not pm.sharded_frozen:
            return Row(pm.role, params, whole_bytes, 0, 0, False, False)
        if launcher == "fsdp":
            _, local = _local_bytes(fully_shard_model(model, mesh).parameters())
            return Row(pm.role, params, local, 0, 0, False, True)
        return Row(pm.role, params, -(-whole_bytes // nproc), 0, 0, False, True, "ZeRO-3 inference engine")
    if launcher == "fsdp" and nproc > 1:
        fully_shard_model(model, mesh)
        _, local = _local_bytes(model.parameters())
        n_local, _ = _local_bytes(p for p in model.parameters() if p.requires_grad)
        return Row(pm.role, params, local, 4 * n_local, 8 * n_local, True, True)
    if launcher in ("zero2", "zero3") and nproc > 1:
        # DeepSpeed's estimators: 16-bit params 2 bytes (whole under ZeRO-2, sharded under ZeRO-3),
        # + 18 bytes per parameter over the GPUs: fp32 master 4, 16-bit and fp32 grads 2 + 4, Adam 8.
        shard = lambda x: -(-x // nproc)  # noqa: E731
        frozen_bytes = whole_bytes - sum(p.numel() * p.element_size() for p in trainable)
        weights = (2 * n_train if launcher == "zero2" else shard(2 * n_train)) + shard(4 * n_train) + frozen_bytes
        note = ""
        if launcher == "zero3":
            largest = max((sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)), default=0)
            weights += 4 * largest
            note = "incl. one gathered layer"
        return Row(pm.role, params, weights, shard(6 * n_train), shard(8 * n_train), True, True, note)
    return Row(pm.role, params, whole_bytes, 4 * n_train, 8 * n_train, True, False,
               "LoRA: adapters trained" if pm.lora is not None else "")


# --------------------------------------------------------------------- activations and caches
def _dims(config) -> tuple[int, int, int, int, int]:
    """(hidden, intermediate, key/value width, layers, vocab) of a decoder config."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(config, "intermediate_size", None) or 4 * h
    return h, inter, kv, config.num_hidden_layers, config.vocab_size


def training_activation_bytes(config, tokens: int, checkpointing: bool, act_bytes: int, logits_tokens: int | None = None,
                              lm_head: bool = True) -> int:
    """Activations kept for the backward pass of one micro-batch of `tokens` tokens: per layer and
    token 10·h + 2·kv + 4·intermediate values (norm inputs, q/k/v, attention output, MLP inputs
    and products; the attention matrix is not stored by sdpa/flash kernels; after Korthikanti et
    al. 2022); with activation checkpointing each layer keeps its input only and one layer is
    recomputed at a time. Plus the LM head's logits over `logits_tokens` and their gradient."""
    h, inter, kv, layers, vocab = _dims(config)
    layer = tokens * act_bytes * (10 * h + 2 * kv + 4 * inter)
    body = layers * tokens * act_bytes * h + layer if checkpointing else layers * layer
    head = 2 * (tokens if logits_tokens is None else logits_tokens) * vocab * act_bytes if lm_head else 0
    return body + head


def kv_cache_bytes(config, sequences: int, length: int, act_bytes: int) -> int:
    """Keys and values of every layer for `sequences` sequences of `length` tokens."""
    _, _, kv, layers, _ = _dims(config)
    return 2 * layers * kv * length * sequences * act_bytes


def gathered_bytes(pm: PlannedModel, dtype_bytes: int, whole: bool = True) -> int:
    """`pm`'s parameters gathered for generation at `dtype_bytes` each: the whole model, or
    (`whole=False`, a gather per layer) what FSDP2 holds at once: the parameters outside the
    decoder layers (embeddings, final norm, LM head: the root unit, which stays gathered) and two
    layers (the one computing and the next, prefetched)."""
    model = meta_model(pm)
    total = sum(p.numel() for p in model.parameters())
    if whole:
        return total * dtype_bytes
    layers = [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]
    return (total - sum(layers) + 2 * max(layers, default=0)) * dtype_bytes


# ------------------------------------------------------------------------------ process groups
@contextlib.contextmanager
def fake_process_group(nproc: int):
    """A mesh of `nproc` processes on torch's fake process group (no communication), so FSDP2
    shards meta models exactly as on `nproc` GPUs; the real group where one is running."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if nproc <= 1:
        yield None
        return
    if dist.is_initialized():
        if dist.get_world_size() != nproc:
            raise ValueError(f"a process group of {dist.get_world_size()} is running; cannot plan for {nproc}")
        yield init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (nproc,))
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=nproc)
    try:
        yield init_device_mesh("cpu", (nproc,))
    finally:
        dist.destroy_process_group()


def cheaper_settings(cfg, launcher: str, nproc: int, knobs: dict) -> list[tuple[str, list[str], str, int]]:
    """Changes that lower a stage's plan, cheapest first: (what, key=value overrides, launcher,
    processes). `knobs`: if the stage has LoRA, the switches that turn it on ("lora"), and the key
    of a per-layer generation gather ("gather"); every stage's micro batch is `batch.micro`."""
    def get(key):
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        return value

    out, ckpt, micro_key = [], ["gradient_checkpointing=true"], "batch.micro"
    if "gather" in knobs and launcher in ("fsdp", "zero3") and nproc > 1 and get(knobs["gather"]) != "layer":
        out.append((f"{knobs['gather']}=layer (generation gathers one layer at a time; slower)",
                    [f"{knobs['gather']}=layer"], launcher, nproc))
    if not cfg.gradient_checkpointing:
        out.append(("gradient_checkpointing=true", ckpt, launcher, nproc))
    micro = get(micro_key)
    while micro > 1:
        micro //= 2
        out.append((f"{micro_key}={micro} with gradient checkpointing", [f"{micro_key}={micro}", *ckpt], launcher, nproc))
    for other in ("fsdp", "zero3"):
        if launcher != other:
            out.append((f"ACCEL={other} with gradient checkpointing and {micro_key}=1",
                        [*ckpt, f"{micro_key}=1"], other, nproc))
    if "lora" in knobs and not get(knobs["lora"][0]):
        keys = [f"{k}=true" for k in knobs["lora"]]
        out.append((f"LoRA ({', '.join(keys)}) under ACCEL=ddp", [*keys, *ckpt, f"{micro_key}=1"], "ddp", nproc))
    for more in (2, 4, 8):
        out.append((f"{nproc * more} GPUs under ACCEL=fsdp", [*ckpt, f"{micro_key}=1"], "fsdp", nproc * more))
    return out
