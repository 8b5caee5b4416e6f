"""What an injection did, as numbers and a table: adapted modules, ranks and parameter counts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from lora_lightning.config import LoRAConfig
from lora_lightning.kinds import logical_numel
from lora_lightning.kinds.experts import is_bank_4bit


@dataclass(frozen=True)
class AdaptedModule:
    """One adapted module as the report shows it."""

    name: str  # the module, or for an expert bank the adapted parameter (``...mlp.experts.down_proj``)
    kind: str  # base layer type: Linear, Conv1D, Embedding, Experts
    in_features: int
    out_features: int
    r: int
    alpha: float
    scale: float
    experts: int = 1  # an expert bank's projection holds r x (in + out) factors per expert

    @property
    def num_params(self) -> int:
        return self.experts * self.r * (self.in_features + self.out_features)

    @property
    def type_label(self) -> str:
        """The type column: ``Linear``, or ``Experts(8)`` for a bank of 8 experts."""
        return f"{self.kind}({self.experts})" if self.kind == "Experts" else self.kind


@dataclass(frozen=True)
class ParameterSummary:
    """Trainable and total parameter counts (total includes adapters, as in PEFT)."""

    trainable: int
    total: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
            f"|| trainable%: {self.trainable_percent:.4f}"
        )


@dataclass(frozen=True)
class LoRAReport:
    """What :func:`inject_lora` adapted: modules, ranks, extras trained in full, and counts."""

    config: LoRAConfig
    modules: list[AdaptedModule]
    modules_to_save: list[str]
    params: ParameterSummary
    expert_params: int = 0
    """Base parameters held in fused expert banks (a Mixture-of-Experts model), adapted or not."""
    adapted_expert_params: int = 0
    """Of those, the ones in banks that carry adapters."""
    quantized_banks: tuple[int, int, int] | None = None
    """Expert banks :func:`inject_lora` quantized to 4 bits (a 4-bit model's): (banks, bytes before, bytes after)."""

    @property
    def adapter_params(self) -> int:
        return sum(m.num_params for m in self.modules)

    def rows(self, full: bool = False) -> list[tuple[str, str, str, str, str]]:
        """(module, type, in, out, r): one row per role across layers (modules that differ only in
        block index, ``model.layers.*.mlp.up_proj (x32)``), or with ``full`` one per adapted module.
        An expert bank shows one row per adapted projection, typed ``Experts(E)``, in / out of one expert."""
        if full:
            return [(m.name, m.type_label, str(m.in_features), str(m.out_features), str(m.r)) for m in self.modules]
        groups: dict[tuple[str, str, int, int, int], int] = {}
        for m in self.modules:
            key = (re.sub(r"\.\d+(?=\.)", ".*", m.name), m.type_label, m.in_features, m.out_features, m.r)
            groups[key] = groups.get(key, 0) + 1
        return [
            (f"{name} (x{count})" if count > 1 else name, kind, str(i), str(o), str(r))
            for (name, kind, i, o, r), count in groups.items()
        ]

    def table(self, full: bool = False) -> str:
        """A plain-text table of adapted modules (name, type, in, out, r); see :meth:`rows`."""
        rows = self.rows(full)
        header = ("module", "type", "in", "out", "r")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
        return "\n".join(lines)

    def __str__(self) -> str:
        text = f"{self.table()}\n{self.params}"
        if self.quantized_banks:
            count, before, after = self.quantized_banks
            text += (
                f"\nexpert banks: {count} quantized to 4 bits like the model's linear layers, "
                f"{before / 2**20:,.1f} MiB -> {after / 2**20:,.1f} MiB"
            )
        return text

    def hparams(self) -> dict[str, Any]:
        """The config fields a logger records for a run (``lora/r``, ``lora/targets``, ...)."""
        config = self.config
        fields = ("r", "alpha", "dropout", "use_rslora", "use_dora", "init_lora_weights", "bias", "freeze_A")
        return {
            **{f"lora/{name}": getattr(config, name) for name in fields},
            "lora/targets": str(config.target_modules),
            "lora/adapted_modules": len(self.modules),
        }

    def metrics(self) -> dict[str, float]:
        """The counts a logger records: ``lora/trainable_params``, ``lora/total_params``, ``lora/trainable_percent``
        (and ``lora/expert_params``, ``lora/adapted_expert_params`` on a Mixture-of-Experts model)."""
        metrics = {
            "lora/trainable_params": float(self.params.trainable),
            "lora/total_params": float(self.params.total),
            "lora/trainable_percent": self.params.trainable_percent,
        }
        if self.expert_params:
            metrics["lora/expert_params"] = float(self.expert_params)
            metrics["lora/adapted_expert_params"] = float(self.adapted_expert_params)
        return metrics


def parameter_summary(model: nn.Module) -> ParameterSummary:
    """Trainable / total parameter counts; ``str()`` of it is PEFT's familiar line.

    Tied parameters count once (``nn.Module.parameters`` deduplicates them), and a packed 4-bit
    weight counts the parameters it stands for (two a byte), as in PEFT.
    """
    trainable = total = 0
    for module in model.modules():  # 4-bit expert banks hold their weights as buffers: frozen parameters
        if is_bank_4bit(module):
            total += sum(bank.logical_numel() for bank in module.banks_4bit.values())
    for param in model.parameters():
        count = logical_numel(param)
        total += count
        if param.requires_grad:
            trainable += count
    return ParameterSummary(trainable=trainable, total=total)
