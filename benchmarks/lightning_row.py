"""Lightning overhead: a ``Trainer`` step with ``LoRACallback`` vs a hand-written loop, same model.

Both train the same adapted Llama on the same batches (a CPU DataLoader, moved to the device each
step) with AdamW over the adapter parameters. The time per step is the wall time of the timed
steps divided by their count, so everything Lightning does between steps (hooks, the optimizer
closure, batch transfer, loss bookkeeping) is inside it. The two alternate for ``rounds`` rounds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import time
import warnings

import shapes
import torch
from shapes import RANK, TARGETS, Shape

from lora_lightning import LoRAConfig, inject_lora


def _config() -> LoRAConfig:
    return LoRAConfig(r=RANK, alpha=RANK, target_modules=TARGETS)


def _loader(shape: Shape, batches: int):
    from torch.utils.data import DataLoader, TensorDataset

    ids = torch.cat([shapes.token_batch(shape, torch.device("cpu"), seed=s) for s in range(batches)])
    return DataLoader(TensorDataset(ids), batch_size=shape.batch, shuffle=False)


def _optimizer(params, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-5, fused=device.type == "cuda")


def hand_loop(shape: Shape, device: torch.device, dtype: torch.dtype, warmup: int, steps: int) -> float:
    """ms per step of the plain PyTorch loop a user would write without Lightning."""
    model = shapes.build_model(shape, device, dtype)
    inject_lora(model, _config())
    optimizer = _optimizer(model.parameters(), device)
    t0 = 0.0
    for index, (ids,) in enumerate(_loader(shape, warmup + steps)):
        ids = ids.to(device, non_blocking=True)
        if index == warmup:
            shapes.synchronize(device)
            t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    shapes.synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / steps


def trainer_loop(shape: Shape, device: torch.device, dtype: torch.dtype, warmup: int, steps: int) -> float:
    """ms per step of ``Trainer.fit`` with ``LoRACallback`` injecting the same adapters."""
    import lightning as L

    from lora_lightning.lightning.callback import LoRACallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = shapes.build_model(shape, device, dtype)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return _optimizer(self.parameters(), device)

    class StepTimer(L.Callback):
        t0 = t1 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                shapes.synchronize(device)
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == warmup + steps - 1:
                shapes.synchronize(device)
                self.t1 = time.perf_counter()

    timer = StepTimer()
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # "GPU available", tips, "max_steps reached"
    try:  # the callback prints its module table at fit start: 224 rows at 8b, none of them timed
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = L.Trainer(
                accelerator="gpu" if device.type == "cuda" else "cpu",
                devices=1,
                max_steps=warmup + steps,
                callbacks=[LoRACallback(_config()), timer],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                limit_val_batches=0,
            )
            trainer.fit(Module(), train_dataloaders=_loader(shape, warmup + steps))
    finally:
        quiet.setLevel(level)
    return (timer.t1 - timer.t0) * 1e3 / steps


def lightning_overhead(
    shape: Shape, device: torch.device, dtype: torch.dtype, warmup: int = 3, steps: int = 15, rounds: int = 2
) -> str:
    """The Lightning row: hand loop vs Trainer + LoRACallback, alternating, median over rounds."""
    header = f"== Lightning overhead ({shape.note}, {shape.tokens} tokens, {device.type}), ms/step =="
    try:
        hand, fit = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's num_workers / logging advice
            for _ in range(rounds):
                hand.append(hand_loop(shape, device, dtype, warmup, steps))
                shapes.free_device_memory(device)
                fit.append(trainer_loop(shape, device, dtype, warmup, steps))
                shapes.free_device_memory(device)
        h, f = statistics.median(hand), statistics.median(fit)
        return "\n".join(
            [
                header,
                f"hand-written loop       {h:8.1f}   (rounds: {', '.join(f'{v:.1f}' for v in hand)})",
                f"Trainer + LoRACallback  {f:8.1f}   (rounds: {', '.join(f'{v:.1f}' for v in fit)})"
                f"  x hand {f / h:.3f}",
            ]
        )
    except Exception as exc:
        shapes.free_device_memory(device)
        return f"{header}\nFAILED: {shapes.error_text(exc)}"
