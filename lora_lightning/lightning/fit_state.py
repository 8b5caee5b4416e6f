"""What a :class:`~lora_lightning.LoRACallback` knows between Lightning's hooks: one object, named phases.

The callback owns one :class:`FitState` and is the only code that changes it; every transition is
a method here, so the whole life of an adapted module reads in one place:

``FRESH`` --setup--> ``ADAPTED`` --fit end--> ``MERGED`` (a plain model; :attr:`FitState.merged`
can bring the base back) --second fit or a checkpoint load--> ``ADAPTED`` / ``READAPTED``
(re-adapted for a validate/test checkpoint load, merged again at teardown). Under FSDP the merge
happens at train end inside ``summon_full_params`` (``MERGED_IN_PLACE``) and the plain layers go
back at fit end. A module that is not the one merged (or changed since) starts ``FRESH`` again.
"""

from __future__ import annotations

import enum
import weakref
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lora_lightning.lightning.fit_merge import MergedAdapters


class Phase(enum.Enum):
    """Where the adapted module stands."""

    FRESH = "fresh"  # nothing injected by this callback (or starting again on another module)
    ADAPTED = "adapted"  # adapters injected; fit, validate or test may run
    READAPTED = "readapted"  # a merged model re-adapted for a validate/test checkpoint load
    MERGED_IN_PLACE = "merged_in_place"  # FSDP: merged at train end, the plain layers still to go back
    MERGED = "merged"  # merged and unloaded at fit end: a plain model


@dataclass
class AdapterKeys:
    """What checkpoints keep and check, measured when the adapters are injected."""

    own: set[str] = field(default_factory=set)  # adapter state_dict keys, relative to the adapted module
    checkpointed: list[str] = field(default_factory=list)  # the same in the LightningModule's state_dict
    frozen: set[str] = field(default_factory=set)  # the LightningModule's keys left out of checkpoints


@dataclass
class FitState:
    """The callback's state: a phase and what each phase needs.

    Attributes:
        phase: where the adapted module stands.
        stage: the stage Lightning set up last ("fit", "validate", ...).
        fingerprint: of the base this callback adapted; checkpoints for another base are refused.
        keys: what checkpoints keep and check.
        merged: what the last fit end merged, and into which module (``MERGED``, ``MERGED_IN_PLACE``).
        quantized: the module this callback quantized (a second setup finds it done).
        restored_by_unmerge: fingerprint names our own unmerge restored (compared to their rounding).
        readapted_stage: the stage that re-adapted a merged model (``READAPTED``).
        input_grads: models whose input gradients this callback switched on for checkpointing.
        done_at_train_end: the fit-end export (and merge) ran at train end (FSDP), not to repeat.
    """

    phase: Phase = Phase.FRESH
    stage: str = "fit"
    fingerprint: dict[str, Any] | None = None
    keys: AdapterKeys = field(default_factory=AdapterKeys)
    merged: MergedAdapters | None = None
    quantized: weakref.ref[nn.Module] | None = None
    restored_by_unmerge: set[str] = field(default_factory=set)
    readapted_stage: str | None = None
    input_grads: list[nn.Module] = field(default_factory=list)
    done_at_train_end: bool = False

    def merged_into(self, target: nn.Module) -> bool:
        """Whether ``target`` is the very module the last fit end merged, unchanged since."""
        return self.merged is not None and self.merged.matches(target)

    def start_afresh(self) -> None:
        """Another module (or a changed one): forget the earlier merge and the base it was for."""
        self.phase, self.merged, self.fingerprint, self.restored_by_unmerge = Phase.FRESH, None, None, set()

    def readapt(self, restored: set[str], stage: str) -> None:
        """The merged adapters were re-injected and unmerged: the base is back."""
        self.restored_by_unmerge, self.merged, self.readapted_stage = restored, None, stage
        self.phase = Phase.READAPTED

    def adapted(self, keys: AdapterKeys, fingerprint: dict[str, Any]) -> None:
        """Adapters are in place (injected now, or found there); the first fingerprint is kept."""
        self.keys = keys
        if self.fingerprint is None:
            self.fingerprint = fingerprint
        if self.phase is not Phase.READAPTED:
            self.phase = Phase.ADAPTED

    def merged_at_fit_end(self, merged: MergedAdapters, in_place: bool) -> None:
        """The fit end merged ``merged``; ``in_place``: the plain layers go back later (FSDP)."""
        self.merged = merged
        self.phase = Phase.MERGED_IN_PLACE if in_place else Phase.MERGED

    def finished_fit(self) -> None:
        """Fit is over: a model merged in place is now plain; one left adapted stays adapted."""
        self.done_at_train_end = False
        if self.phase is Phase.MERGED_IN_PLACE:
            self.phase = Phase.MERGED

    def torn_down(self, merged_again: MergedAdapters | None) -> None:
        """A stage ended; a re-adapted model merged again is plain once more."""
        if merged_again is not None:
            self.merged, self.phase = merged_again, Phase.MERGED
        elif self.phase is Phase.READAPTED:
            self.phase = Phase.ADAPTED
        self.readapted_stage = None
