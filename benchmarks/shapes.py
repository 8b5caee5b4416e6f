"""Model shapes, builders and timing helpers shared by the benchmark scripts.

Every model is a transformers ``LlamaForCausalLM`` built from a config with random weights (no
download), directly on the target device and in the target dtype. Imports only torch,
transformers and lora_lightning's core (never hydra, omegaconf or wandb).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# `python benchmarks/step.py` puts benchmarks/ first on sys.path; the package lives one level up.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class Shape:
    """A Llama shape and the batch one step trains on."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    note: str = ""

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(self.seq, 128),
            rope_theta=500000.0,
            use_cache=False,  # training: no KV cache objects in the step
            tie_word_embeddings=False,
        )

    def shrunk(self, layers: int, batch: int, seq: int) -> Shape:
        """Same widths, fewer layers and tokens (for the correctness check)."""
        return Shape(
            f"{self.name}-check",
            layers,
            self.hidden,
            self.intermediate,
            self.heads,
            self.kv_heads,
            self.vocab,
            batch,
            seq,
            f"{self.name} widths, {layers} layers",
        )

    @property
    def tokens(self) -> str:
        return f"{self.batch}x{self.seq}"


SIZES: dict[str, Shape] = {
    # Small enough for 2 CPU threads, wide enough that GEMMs (not Python) dominate a step.
    "tiny": Shape("tiny", 4, 256, 688, 8, 4, 2048, 4, 128, "tiny Llama"),
    "1b": Shape("1b", 22, 2048, 5632, 32, 4, 32000, 8, 2048, "TinyLlama-1.1B shape"),
    "8b": Shape("8b", 32, 4096, 14336, 32, 8, 128256, 2, 2048, "Llama-3-8B shape"),
}


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A randomly initialised Llama of ``shape``, created directly on ``device`` in ``dtype``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(shape.config(), dtype=dtype)
    return model.train()


def token_batch(shape: Shape, device: torch.device, seed: int = 1) -> torch.Tensor:
    """Random token ids ``(batch, seq)``; the same ids serve as labels."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones.

    On CUDA every call sits between two events and the host synchronises once at the end, so the
    numbers are device time and the host never stalls the queue; on CPU a wall clock per call.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_interleaved(
    calls: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float] | str]:
    """Like :func:`time_calls` for several calls taking turns, one call each per round.

    On a shared machine the load from other processes changes from second to second; taking
    turns spreads it over every call alike. A call that raises is dropped from later rounds and
    its entry is the error text instead of the times.
    """
    live, results = dict(calls), {}
    records: dict[str, list] = {name: [] for name in calls}
    cuda = device.type == "cuda"
    for index in range(warmup + repeats):
        if index == warmup:
            synchronize(device)
        for name, fn in list(live.items()):
            timed = index >= warmup
            if cuda and timed:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as exc:
                results[name] = error_text(exc)
                del live[name]
                continue
            if timed and cuda:
                end.record()
                records[name].append((start, end))
            elif timed:
                records[name].append((time.perf_counter() - t0) * 1e3)
    synchronize(device)
    for name in live:
        results[name] = [s.elapsed_time(e) for s, e in records[name]] if cuda else records[name]
    return results


def summarise(times: list[float]) -> tuple[float, float]:
    """Median and half the spread between the 25th and 75th percentile (ms)."""
    if len(times) < 4:
        return statistics.median(times), (max(times) - min(times)) / 2
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), (q[2] - q[0]) / 2


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux ``VmHWM``).

    Not ``getrusage().ru_maxrss``: Linux carries that over ``exec`` from the process that spawned
    us, so a worker started by a parent holding 500 MiB would report at least 500 MiB.
    """
    return _proc_status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Start ``VmHWM`` again from the current resident set (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def versions() -> str:
    import platform

    import transformers

    parts = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
    ]
    for name in ("peft", "lightning"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            parts.append(f"{name} missing")
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    return ", ".join(parts)


def error_text(exc: BaseException) -> str:
    """One short line for a table cell."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."
