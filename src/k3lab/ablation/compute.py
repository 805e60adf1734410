"""What a cell's training cost: FLOPs per optimizer step counted by ``torch.utils.flop_counter`` on the run's own
first step (forward and backward of everything the step runs: conditioning and U-Net), so arms that differ in cost
can be compared at equal compute as well as at equal steps."""

from __future__ import annotations

import logging
from typing import Any, Callable

import lightning as L
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode
from typing_extensions import override

log = logging.getLogger(__name__)


def _cpu_attention(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter has no formula for the CPU flash-attention kernels that SDPA dispatches to on CPU: the same as its
# other SDPA kernels (Q K^T and P V forward; four products backward)
CPU_ATTENTION = {
    op: formula
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_attention),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_attention_backward),
    )
    if (op := getattr(torch.ops.aten, name, None)) is not None
}


def flop_counter_mode() -> FlopCounterMode:
    """torch's flop counter, with the CPU attention kernels counted."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs (multiply-add = 2) of the matrix products, convolutions and attention ``step()`` runs, forward and
    backward (torch's flop counter; elementwise work is not counted, as in MFU)."""
    with flop_counter_mode() as mode:
        step()
    return int(mode.get_total_flops())


class StepFlops(L.Callback):
    """Counts optimizer step 0 of the run (forward + backward, before the optimizer) and logs
    ``perf/flops_per_step``; ``flops_per_step`` holds it for the cell's totals and learning curve.

    The count travels in the checkpoint: a resumed run never counts again, so no step after step 0 runs under the
    counter's dispatch mode (whose kernels can differ in the last bits) and a resume stays bit-exact."""

    def __init__(self) -> None:
        self.flops_per_step: int | None = None
        self._mode: FlopCounterMode | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"flops_per_step": self.flops_per_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.flops_per_step = state_dict.get("flops_per_step")

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.flops_per_step is None and self._mode is None and int(trainer.global_step) == 0:
            self._mode = flop_counter_mode()
            self._mode.__enter__()

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        self.flops_per_step = int(self._mode.get_total_flops())
        self._mode = None
        for lg in trainer.loggers:
            lg.log_metrics({"perf/flops_per_step": float(self.flops_per_step)}, step=int(trainer.global_step))
        log.info("training FLOPs per optimizer step: %.3g (torch.utils.flop_counter)", self.flops_per_step)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._mode is not None:  # a run that stopped inside its first step
            self._mode.__exit__(None, None, None)
            self._mode = None
