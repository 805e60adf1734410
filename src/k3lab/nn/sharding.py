"""Sharded training helpers: the FSDP unit policy for the U-Net and a meta-device memory plan.

``trainer=fsdp`` wraps every residual block and attention block of the U-Net as its own FSDP unit (and checkpoints
activations by the same policy), so only one block's full parameters are gathered at a time. ``memory_plan`` says what
that costs per GPU without allocating anything: the model is built on the meta device, its parameters counted, and one
forward pass at the target latent size measures the activations autograd keeps (per block, to price checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from k3lab.nn.unet import KandinskyUNet
from k3lab.nn.unet_blocks import AttentionBlock, ResidualBlock

GIB = 1024**3

# bytes per trained parameter under FSDP with bf16 compute and fp32 master weights, sharded over the ranks:
# fp32 parameter + fp32 gradient + AdamW's two fp32 moments (the EMA copy, where a stage keeps one, is counted apart)
WEIGHT_BYTES, GRAD_BYTES, ADAMW_BYTES, EMA_BYTES = 4, 4, 8, 4
SHARDED_BYTES_PER_PARAM = WEIGHT_BYTES + GRAD_BYTES + ADAMW_BYTES
EMA_PLACEMENTS = ("sharded", "replicated", "cpu", "none")


@dataclass(frozen=True)
class TrainingState:
    """Bytes of training state one GPU holds, by kind: fp32 weights, fp32 gradients, AdamW's two fp32 moments, and
    the fp32 EMA copy of the trained weights."""

    weights: float
    grads: float
    optimizer: float
    ema: float

    @property
    def total(self) -> float:
        """All of it."""
        return self.weights + self.grads + self.optimizer + self.ema


def training_state_bytes(trainable: int, gpus: int = 1, ema: str = "sharded") -> TrainingState:
    """The training state of ``trainable`` parameters on each of ``gpus`` FSDP ranks (every kind sharded 1/N); the
    EMA copy ``sharded`` like the rest, ``replicated`` whole on every GPU, kept on the ``cpu`` or ``none`` (no EMA).
    The memory model of :func:`memory_plan`, ``benchmarks/fsdp_memory.py`` and ``benchmarks/gpu_check.sh``'s
    sizing; ``tests/test_distributed.py`` checks it against the tensors a real stage allocates."""
    if ema not in EMA_PLACEMENTS:
        raise ValueError(f"ema={ema!r}: use one of {list(EMA_PLACEMENTS)}")
    if gpus < 1:
        raise ValueError(f"gpus={gpus}: at least one")
    shard = trainable / gpus
    ema_bytes = {"sharded": EMA_BYTES * shard, "replicated": float(EMA_BYTES * trainable), "cpu": 0.0, "none": 0.0}[ema]
    return TrainingState(WEIGHT_BYTES * shard, GRAD_BYTES * shard, ADAMW_BYTES * shard, ema_bytes)


def block_classes() -> set[type[nn.Module]]:
    """The U-Net's FSDP units and activation-checkpointing units: every residual block (BigGAN-deep or ResBlock) and
    every attention block."""
    return {ResidualBlock, AttentionBlock, *ResidualBlock.__subclasses__()}


def mixed_precision(param: str = "bfloat16", reduce: str = "float32", buffer: str = "float32") -> Any:
    """FSDP's mixed-precision policy by dtype names (bf16 compute, fp32 gradient reduction by default)."""
    from torch.distributed.fsdp import MixedPrecision

    def dtype(name: str) -> torch.dtype:
        value = getattr(torch, name, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"FSDP mixed precision: {name!r} is not a torch dtype (e.g. bfloat16, float32)")
        return value

    return MixedPrecision(param_dtype=dtype(param), reduce_dtype=dtype(reduce), buffer_dtype=dtype(buffer))


def units(model: nn.Module) -> Iterator[nn.Module]:
    """The outermost modules of ``model`` that :func:`block_classes` makes FSDP units."""
    classes = tuple(block_classes())
    stack = list(model.children())
    while stack:
        module = stack.pop()
        if isinstance(module, classes):
            yield module
        else:
            stack.extend(module.children())


def compile_blocks(model: nn.Module, mode: str | None = None) -> int:
    """Regional ``torch.compile``: every :func:`units` block compiled in place on its own (short compiles; identical
    blocks share one graph; the state dict keeps its names). Returns how many were compiled."""
    blocks = list(units(model))
    for block in blocks:
        block.compile(mode=mode)
    return len(blocks)


@dataclass
class Activations:
    """Bytes autograd keeps for one sample's forward: all of it, and with every unit checkpointed."""

    full: int
    checkpointed: int


def activation_bytes(
    unet: KandinskyUNet, latent: int, context_tokens: int, dtype: torch.dtype = torch.bfloat16
) -> Activations:
    """One sample's saved activations, measured by one forward pass on ``unet``'s device (the meta device: nothing
    allocated; a real device gives the same count).

    Checkpointed: everything saved outside the units, plus each unit's input, plus the largest unit's own saved
    tensors (recomputed one unit at a time in backward)."""
    unet = unet.to(dtype)
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # ids stay unique while the tensors live

    params = {id(p) for p in unet.parameters()}  # trained or frozen (a LoRA fine-tune's base): weights, not activations

    def weight(t: torch.Tensor) -> bool:  # a parameter or a view of one (a linear layer saves weight.t())
        return id(t) in params or (t._base is not None and id(t._base) in params)

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not weight(t) and id(t) not in seen:
            seen[id(t)] = t.numel() * t.element_size()
            keep.append(t)
        return t

    per_unit: list[tuple[int, int]] = []  # (input bytes, own saved bytes)
    started: dict[nn.Module, int] = {}  # saved bytes when each unit's forward began
    handles = []
    for unit in units(unet):

        def before(module: nn.Module, args: tuple) -> None:
            started[module] = sum(seen.values())

        def after(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            per_unit.append((x.numel() * x.element_size(), sum(seen.values()) - started.pop(module)))

        handles += [unit.register_forward_pre_hook(before), unit.register_forward_hook(after)]
    device = next(unet.parameters()).device
    x = torch.randn(1, int(unet.in_channels), latent, latent, device=device, dtype=dtype)
    t = torch.full((1,), 500, device=device, dtype=torch.long)
    context = torch.randn(1, context_tokens, int(unet.context_dim), device=device, dtype=dtype)
    mask = torch.ones(1, context_tokens, device=device, dtype=torch.bool)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet.train()(x, t, context, mask)
    finally:
        for h in handles:
            h.remove()
    full = sum(seen.values())
    inside = sum(own for _, own in per_unit)
    checkpointed = full - inside + sum(inp for inp, _ in per_unit) + max((own for _, own in per_unit), default=0)
    return Activations(full=full, checkpointed=checkpointed)


@dataclass
class MemoryRow:
    """One row of the FSDP memory plan: per-GPU GiB by kind and the largest batch, for one GPU count."""

    gpus: int
    sharded_gib: float  # fp32 parameters + gradients + AdamW moments, this rank's shard
    ema_gib: float  # the fp32 EMA copy this GPU holds (its shard, all of it, or none: the ``ema`` placement)
    gathered_gib: float  # bf16 parameters of the two largest units (the one computing and the one prefetched)
    static_gib: float
    batch_per_gpu: int  # the largest batch whose checkpointed activations fit beside the static memory


def memory_plan(
    unet: KandinskyUNet,
    gpus: Sequence[int] = (1, 8, 64),
    latent: int = 64,
    context_tokens: int = 128,
    gpu_gib: float = 80.0,
    reserve_gib: float = 6.0,  # CUDA context, allocator fragmentation, workspace
    ema: str = "sharded",  # the EMA copy's placement (training_state_bytes); "none" for a stage without EMA
    extra_trainable: int = 0,  # trained parameters beside the U-Net (the text projection and null embedding)
) -> tuple[int, Activations, list[MemoryRow]]:
    """Per-GPU memory of FSDP training of ``unet`` (on the meta device) for each GPU count; see the module docstring.
    Returns the trained parameter count (U-Net + ``extra_trainable``), the activations and one row per GPU count."""
    params = sum(p.numel() for p in unet.parameters()) + int(extra_trainable)
    sizes = sorted((sum(p.numel() for p in u.parameters()) for u in units(unet)), reverse=True)
    gathered = 2 * sum(sizes[:2])  # bf16
    act = activation_bytes(unet, latent, context_tokens)
    rows = []
    for n in gpus:
        state = training_state_bytes(params, n, ema)
        sharded = state.weights + state.grads + state.optimizer
        static = sharded + state.ema + gathered
        free = (gpu_gib - reserve_gib) * GIB - static
        rows.append(
            MemoryRow(
                n,
                sharded / GIB,
                state.ema / GIB,
                gathered / GIB,
                static / GIB,
                max(0, int(free // act.checkpointed)),
            )
        )
    return params, act, rows


@dataclass(frozen=True)
class LoraRow:
    """One row of a LoRA fine-tune's one-GPU plan: GiB by kind, activations per sample, largest batch per GPU size."""

    rank: int
    latent: int
    adapter_params: int
    frozen_gib: float  # the base U-Net and the text projection, frozen, at ``frozen_bytes`` per parameter
    adapter_gib: float  # the adapters' fp32 weights, gradients, AdamW moments and EMA
    other_gib: float  # the frozen MoVQ (validation samples) and the CUDA reserve
    activation_gib: float  # per sample, bf16, every block checkpointed
    batch: dict[float, int]  # GPU GiB -> largest batch


def lora_memory_plan(
    unet: KandinskyUNet,
    ranks: Sequence[int],
    latents: Sequence[int],
    gpu_gibs: Sequence[float] = (24.0, 48.0, 80.0),
    context_tokens: int = 128,
    extra_frozen: int = 0,  # frozen parameters beside the U-Net (the text projection)
    frozen_bytes: int = 4,  # fp32 base weights under bf16 autocast (trainer=gpu), as the stage keeps them
    other_gib: float = 1.0 + 3.0,  # the frozen fp32 MoVQ (~1 GiB, for validation samples) + CUDA context/allocator
    ema: bool = True,
    targets: Sequence[str] | None = None,
) -> list[LoraRow]:
    """A LoRA fine-tune of ``unet`` (on the meta device) on one GPU, text embeddings and latents precomputed (no text
    encoder, no MoVQ encoder in the step): for each rank and latent side, the memory by kind and the largest batch per
    GPU size. The adapters are injected by :func:`k3lab.nn.lora.add_lora` and the activations measured with them."""
    import copy

    from k3lab.nn.lora import DEFAULT_TARGETS, LoraOptions, add_lora

    frozen = sum(p.numel() for p in unet.parameters()) + int(extra_frozen)
    rows = []
    for rank in ranks:
        model = copy.deepcopy(unet)
        add_lora(model, LoraOptions(rank=rank, alpha=rank, target_modules=tuple(targets or DEFAULT_TARGETS)))
        adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
        state = training_state_bytes(adapter, 1, "replicated" if ema else "none")
        for latent in latents:
            act = activation_bytes(model, latent, context_tokens).checkpointed
            static = frozen * frozen_bytes + state.total + other_gib * GIB
            batch = {float(g): max(0, int((g * GIB - static) // act)) for g in gpu_gibs}
            frozen_gib, adapter_gib = frozen * frozen_bytes / GIB, state.total / GIB
            rows.append(LoraRow(rank, latent, adapter, frozen_gib, adapter_gib, other_gib, act / GIB, batch))
    return rows


def shard_unet(unet: nn.Module, mesh: Any = None, mp_policy: Any = None) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): every :func:`units` block its own shard group, then the rest.

    For a process group already initialised (NCCL on GPUs, gloo on CPU: tested with two CPU processes, gradients equal
    to the unsharded model's on the whole batch). ``trainer=fsdp`` is the Lightning path (FSDP1, GPUs only)."""
    from torch.distributed.fsdp import fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh} if mesh is not None else {}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for unit in list(units(unet)):
        fully_shard(unit, **kwargs)
    fully_shard(unet, **kwargs)
    return unet
