"""LoRA on a Mixture-of-Experts model's fused expert banks: step time and memory against PEFT and the frozen floor.

A Qwen3-MoE (transformers 5: experts as 3-D ``gate_up_proj`` / ``down_proj`` parameters) in float32,
r=16, alpha=16, one training step (forward + backward + AdamW over the adapters) per call, each
variant in a process of its own:

    floor       every weight frozen, the input embeddings require grad: backward runs through every
                layer (the model's own grouped_mm experts), no weight gradient, no optimizer
    ours        lora-lightning, target_modules="all-linear": attention and every expert's gate_up /
                down projection at rank 16 (LoRAExperts: two extra grouped GEMMs of rank r per
                projection, W + s B A never formed)
    peft        HF PEFT 0.21, target_modules="all-linear": on transformers 5 it rewrites that into
                target_parameters (experts and router), gate_up_proj at rank 2r (its v4 w1 + w3);
                each ParamWrapper forms W + s B A for every expert every forward
    peft_same   HF PEFT with exactly our targets and ranks (target_parameters for the experts)

Per variant: the median step after one warm-up step, what the steps add to the resident set
(``VmHWM`` reset after the warm-up, minus the resident set then) and the bytes autograd saves for
backward in one forward (tensors that are not parameters or buffers, each storage once), and the
tensors held between steps (weights, buffers, adapters, AdamW state: what no allocator can go below;
the resident adds glibc's free lists and oneDNN's caches to them). At (e) the vocabulary is the real
151,936 and ours takes lora_lightning's chunked loss; PEFT the model's own. A check runs ours
and PEFT with the same factors (``peft_same``) and compares logits and every adapter gradient.

    python benchmarks/moe.py                         # (a) tiny and (b) Qwen3-30B-A3B widths, 1 thread
    python benchmarks/moe.py --sizes tiny --steps 5
    python benchmarks/moe.py --sizes gpu-30b-a3b --no-check   # (c) on a CUDA device (benchmarks/gpu_all.sh)
    python benchmarks/moe.py --sizes 30b-a3b-4bit --variants lora_bf16,qlora,peft_qlora --no-check  # (d) QLoRA

Targets (issue 22), at (b): ours' step <= 1.15x the floor's and <= 0.7x PEFT's; the memory ours adds
over the floor <= 0.25x what PEFT adds; ours equals PEFT to 1e-5 (fp32). At (c), 8 of Qwen3-30B-A3B's 48
layers in bfloat16 on the GPU, 4x2048 tokens (grouped_mm's CUDA kernel): ours' step <= 1.15x the
floor's, tokens/s >= 1.5x PEFT's, peak allocated memory <= PEFT's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes

RANK = 16
SIZES = {
    # (a) the tiny Qwen3-MoE
    "tiny": {
        "hidden_size": 256, "moe_intermediate_size": 512, "num_experts": 8, "num_experts_per_tok": 2,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "batch": 2, "seq": 128,
    },
    # (b) Qwen3-30B-A3B's widths with 2 of its 48 layers (vocabulary shrunk: the head is not what is measured)
    "30b-a3b": {
        "hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "batch": 1, "seq": 512,
    },
    # (d) issue 23's CPU shape: bf16 weights (and GEMMs), 1x256 tokens; the QLoRA variants
    "30b-a3b-4bit": {
        "hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "batch": 1, "seq": 256, "dtype": "bfloat16",
    },
    # (e) issue 23 on a CUDA device: the whole Qwen3-30B-A3B shape, random weights quantized on the device,
    # bf16 compute, gradient checkpointing, 1x2048 tokens (qlora, peft_qlora)
    "gpu-30b-a3b-4bit": {
        "hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "batch": 1, "seq": 2048, "device": "cuda", "dtype": "bfloat16", "checkpointing": True,
        "vocab_size": 151936, "chunked_loss": True,
    },
    # (c) on a CUDA device: 8 of the 48 layers, bfloat16
    "gpu-30b-a3b": {
        "hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 8, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "batch": 4, "seq": 2048, "device": "cuda", "dtype": "bfloat16",
    },
}  # fmt: skip
VOCAB = 8192
VARIANTS = ("floor", "ours", "peft", "peft_same")
# QLoRA on the MoE (issue 23), at size 30b-a3b-4bit: our LoRA on the bf16 banks, ours with every bank and
# linear layer nf4-dq, PEFT + bitsandbytes (4-bit linear layers, bf16 banks under ParamWrapper)
QLORA_VARIANTS = ("lora_bf16", "qlora", "peft_qlora")


def build(size: str) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    spec = dict(SIZES[size])
    batch, seq = spec.pop("batch"), spec.pop("seq")
    device, dtype = torch.device(spec.pop("device", "cpu")), getattr(torch, spec.pop("dtype", "float32"))
    checkpointing = spec.pop("checkpointing", False)
    spec.pop("chunked_loss", None)
    vocab = spec.pop("vocab_size", VOCAB)
    config = Qwen3MoeConfig(vocab_size=vocab, intermediate_size=4 * spec["hidden_size"], **spec)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype, on its device: no float32 copy of 8 layers on the host
    try:
        with device:
            model = Qwen3MoeForCausalLM(config).train()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for module in model.modules():  # routers drawn wider than the init, so tokens spread over experts
            if type(module).__name__.endswith("TopKRouter"):
                module.weight.normal_(0, 0.5)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    return model, ids


def adapt(variant: str, model: torch.nn.Module, twin_of: torch.nn.Module | None = None) -> torch.nn.Module:
    """``variant`` made of a freshly built model (``twin_of``: ours, whose factors peft_same copies)."""
    if variant == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if variant in ("ours", "lora_bf16", "qlora"):
        from lora_lightning import LoRAConfig, inject_lora

        if variant == "qlora":
            from lora_lightning.quantize import quantize_model

            quantize_model(model, "nf4-dq")  # every linear layer and expert bank (head, embeddings, routers stay)
        inject_lora(model, LoRAConfig(r=RANK, alpha=RANK))
        return model
    if variant == "peft_qlora":  # what load_in_4bit gives: 4-bit linear layers, the experts as they were
        from peft import LoraConfig, get_peft_model

        from lora_lightning.quantize import quantize_model

        quantize_model(model, "nf4-dq", banks=False)
        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear"))
    from peft import LoraConfig, get_peft_model

    if variant == "peft":
        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear"))
    from lora_lightning.inject import lora_banks, lora_layers

    reference = twin_of
    if reference is None:
        reference = adapt("ours", copy.deepcopy(model))
    linears = sorted(lora_layers(reference))
    parameters = sorted(f"{n}.{p}" for n, b in lora_banks(reference).items() for p in b.projections)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=linears, target_parameters=parameters)
    peft_model = get_peft_model(model, config)
    if twin_of is not None:
        copy_factors(twin_of, peft_model)
    return peft_model


@torch.no_grad()
def copy_factors(ours: torch.nn.Module, peft_model: torch.nn.Module) -> None:
    """Our factors into PEFT's layout: A ``(E, r, in)`` -> ``(r*E, in)``, B ``(E, out, r)`` -> ``(out, r*E)``."""
    from lora_lightning.inject import lora_banks, lora_layers

    inner = peft_model.base_model.model
    for name, layer in lora_layers(ours).items():
        twin = inner.get_submodule(name)
        twin.lora_A["default"].weight.copy_(layer.lora_A)
        twin.lora_B["default"].weight.copy_(layer.lora_B)
    for name, bank in lora_banks(ours).items():
        module = inner.get_submodule(name)
        while hasattr(module, "parameter_name"):
            A, B = bank.lora_A[module.parameter_name], bank.lora_B[module.parameter_name]
            experts, rank = A.shape[:2]
            module.lora_A["default"].weight.copy_(A.reshape(experts * rank, -1))
            module.lora_B["default"].weight.copy_(B.permute(1, 2, 0).reshape(B.shape[1], rank * experts))
            module = module.base_layer


def saved_bytes(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for backward in one forward: saved tensors that are not the model's
    parameters or buffers, each storage once."""
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss
    return sum(seen.values())


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of every parameter, buffer and optimizer-state tensor, each storage once."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def run_variant(variant: str, size: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    import contextlib
    import importlib

    for library in ("transformers", "peft", "lora_lightning.quantize", "bitsandbytes"):
        # every variant's libraries loaded first, so "resident" counts the model's memory (the device has
        # no bitsandbytes unless its wheel is carried)
        with contextlib.suppress(ImportError):
            importlib.import_module(library)

    process = shapes.rss_bytes()  # before the model exists
    model, ids = build(size)
    model = adapt(variant, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if variant != "floor" else None
    # ours may take the chunked loss (the product's own); PEFT's users have the model's loss
    chunked = SIZES[size].get("chunked_loss", False) and variant in ("ours", "lora_bf16", "qlora")

    def loss() -> torch.Tensor:
        if chunked:
            from lora_lightning import causal_lm_loss

            return causal_lm_loss(model, ids, ids)
        return model(input_ids=ids, labels=ids).loss

    def step() -> None:
        loss().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    cuda = ids.device.type == "cuda"
    step()  # warm-up: optimizer state, allocator
    saved = saved_bytes(model, loss)
    held = held_bytes(model, optimizer)
    if cuda:  # the GPU: what the device holds at its peak, over the model and optimizer state held before
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = shapes.rss_bytes()
        shapes.reset_peak_rss()
    times = [ms / 1e3 for ms in shapes.time_calls(step, ids.device, warmup=0, repeats=steps)]
    peak = torch.cuda.max_memory_allocated() if cuda else shapes.peak_rss_bytes()
    return {
        "variant": variant,
        "step_s": statistics.median(times),
        "tokens_per_s": ids.numel() / statistics.median(times),
        "added_peak_mib": (peak - before) / 2**20,
        "resident_mib": (peak - process) / 2**20 if not cuda else float("nan"),
        "peak_mib": peak / 2**20,
        "saved_mib": saved / 2**20,
        # tensors held between steps (weights, buffers, adapters, AdamW state): independent of the allocator
        "held_mib": held / 2**20,
        "chunked_loss": chunked,
        "trainable": sum(p.numel() for p in trainable if variant != "floor"),
    }


def run_check(size: str, threads: int, layers: int | None = None, float64: bool = False) -> dict:
    """Ours and PEFT (our targets, our factors, B random) on the same base: logits and adapter gradients.

    ``float64``: also ours in float64 (a copy), which decides how far each float32 side is from the
    exact values; ``layers`` overrides the size's layer count (the float64 copy doubles the memory).
    """
    torch.set_num_threads(threads)
    if layers is not None:
        SIZES[size] = {**SIZES[size], "num_hidden_layers": layers}
    base, ids = build(size)
    ours = adapt("ours", copy.deepcopy(base))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(2)
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    exact = copy.deepcopy(ours).double() if float64 else None
    theirs = adapt("peft_same", base, twin_of=ours)
    out, ref = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    (out.square().mean()).backward()
    (ref.square().mean()).backward()
    if exact is not None:
        truth = exact(input_ids=ids).logits
        truth.square().mean().backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))

    from lora_lightning.inject import lora_banks

    inner, worst = theirs.base_model.model, 0.0
    to_exact = {"ours": 0.0, "peft": 0.0}
    exact_banks = lora_banks(exact) if exact is not None else {}
    for name, bank in lora_banks(ours).items():
        module = inner.get_submodule(name)
        while hasattr(module, "parameter_name"):
            p = module.parameter_name
            experts, rank = bank.lora_A[p].shape[:2]
            gA = module.lora_A["default"].weight.grad.reshape(experts, rank, -1)
            gB = module.lora_B["default"].weight.grad.reshape(-1, rank, experts).permute(2, 0, 1)
            worst = max(worst, rel(bank.lora_A[p].grad, gA), rel(bank.lora_B[p].grad, gB))
            if exact is not None:
                tA, tB = exact_banks[name].lora_A[p].grad, exact_banks[name].lora_B[p].grad
                to_exact["ours"] = max(to_exact["ours"], rel(bank.lora_A[p].grad, tA), rel(bank.lora_B[p].grad, tB))
                to_exact["peft"] = max(to_exact["peft"], rel(gA, tA), rel(gB, tB))
            module = module.base_layer
    result = {"logits_rel": rel(out, ref), "bank_grad_rel": worst}
    if exact is not None:
        result.update(
            ours_logits_to_float64=rel(out, truth),
            peft_logits_to_float64=rel(ref, truth),
            ours_grads_to_float64=to_exact["ours"],
            peft_grads_to_float64=to_exact["peft"],
        )
    return result


def _worker(args: list[str]) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"{' '.join(args)}: FAILED\n{proc.stderr[-3000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,30b-a3b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--layers", type=int, help="override the sizes' layer count (memory against depth)")
    parser.add_argument(
        "--check64-layers", type=int, help="also run the check with a float64 copy of ours, at this many layers"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--check-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layers:
        for spec in SIZES.values():
            spec["num_hidden_layers"] = args.layers
    if args.worker:
        variant, size = args.worker.split(":")
        print(json.dumps(run_variant(variant, size, args.steps, args.threads)))
        return
    if args.check_worker:
        size, _, layers = args.check_worker.partition(":")
        kind = {"layers": int(layers), "float64": True} if layers else {}
        print(json.dumps(run_check(size, args.threads, **kind)))
        return
    print(f"# benchmarks/moe.py --sizes {args.sizes} --steps {args.steps} --threads {args.threads}")
    print(f"# {shapes.versions()} | load average before: {os.getloadavg()[0]:.2f}")
    for size in args.sizes.split(","):
        spec = SIZES[size]
        rows = {}
        for variant in args.variants.split(","):
            common = ["--steps", str(args.steps), "--threads", str(args.threads)]
            if args.layers:
                common += ["--layers", str(args.layers)]
            row = _worker(["--worker", f"{variant}:{size}", *common])
            if row is not None:
                rows[variant] = row
        print(
            f"== ({size}) Qwen3-MoE hidden {spec['hidden_size']}, moe_intermediate {spec['moe_intermediate_size']}, "
            f"{spec['num_experts']} experts top-{spec['num_experts_per_tok']}, {spec['num_hidden_layers']} layers, "
            f"{spec['batch']}x{spec['seq']} tokens, {spec.get('dtype', 'float32')}, r={RANK}"
            f"{' on ' + torch.cuda.get_device_name() if spec.get('device') == 'cuda' else ''} =="
        )
        floor = rows.get("floor")
        print(
            f"{'variant':<10} {'step s':>8} {'x floor':>8} {'added peak MiB':>15} {'over floor':>11} "
            f"{'saved MiB':>10} {'over floor':>11} {'tokens/s':>9} {'peak MiB':>9} {'resident MiB':>13} "
            f"{'held MiB':>9} {'trainable':>12}"
        )
        for name, row in rows.items():
            x = row["step_s"] / floor["step_s"] if floor else float("nan")
            peak_over = row["added_peak_mib"] - floor["added_peak_mib"] if floor else float("nan")
            saved_over = row["saved_mib"] - floor["saved_mib"] if floor else float("nan")
            print(
                f"{name:<10} {row['step_s']:>8.3f} {x:>8.3f} {row['added_peak_mib']:>15.0f} {peak_over:>11.0f} "
                f"{row['saved_mib']:>10.0f} {saved_over:>11.0f} {row['tokens_per_s']:>9.0f} {row['peak_mib']:>9.0f} "
                f"{row['resident_mib']:>13.0f} {row['held_mib']:>9.0f} "
                f"{row['trainable']:>12,d}{'  (chunked loss)' if row['chunked_loss'] else ''}"
            )
        if floor and "ours" in rows and "peft" in rows:
            ours, peft = rows["ours"], rows["peft"]
            step_floor = ours["step_s"] / floor["step_s"]
            step_peft = ours["step_s"] / peft["step_s"]
            added = {k: rows[k]["added_peak_mib"] - floor["added_peak_mib"] for k in ("ours", "peft")}
            saved = {k: rows[k]["saved_mib"] - floor["saved_mib"] for k in ("ours", "peft")}
            mem_peak = added["ours"] / added["peft"] if added["peft"] > 0 else float("nan")
            mem_saved = saved["ours"] / saved["peft"] if saved["peft"] > 0 else float("nan")
            print("targets:")
            if spec.get("device") == "cuda":
                lines = [
                    ("ours step / floor step", step_floor, "<=", 1.15),
                    ("ours tokens/s / PEFT tokens/s", ours["tokens_per_s"] / peft["tokens_per_s"], ">=", 1.5),
                    ("ours peak / PEFT peak (allocated)", ours["peak_mib"] / peft["peak_mib"], "<=", 1.0),
                ]
            else:
                lines = [
                    ("ours step / floor step", step_floor, "<=", 1.15),
                    ("ours step / PEFT step", step_peft, "<=", 0.70),
                    ("ours added peak / PEFT added peak (RSS)", mem_peak, "<=", 0.25),
                    ("ours added saved / PEFT added saved", mem_saved, "<=", 0.25),
                ]
            for label, value, sense, target in lines:
                met = value <= target if sense == "<=" else value >= target
                print(f"  {label:<44} {value:.3f}  ({sense} {target:.2f})  {_ok(met)}")
        if spec.get("device") == "cuda" and "qlora" in rows:
            qlora = rows["qlora"]
            print("targets (QLoRA on the device):")
            peak_gib = qlora["peak_mib"] / 1024
            print(f"  {'ours QLoRA peak GiB':<44} {peak_gib:.2f}  (<= 22.00)  {_ok(peak_gib <= 22)}")
            if "peft_qlora" in rows:
                ratio = qlora["tokens_per_s"] / rows["peft_qlora"]["tokens_per_s"]
                print(f"  {'ours tokens/s / PEFT + bitsandbytes':<44} {ratio:.3f}  (>= 1.00)  {_ok(ratio >= 1.0)}")
            else:
                print("  PEFT + bitsandbytes: no row (it did not fit or failed; its error is above)")
        elif all(v in rows for v in QLORA_VARIANTS):
            held = {v: rows[v]["resident_mib"] for v in QLORA_VARIANTS}
            print("targets (QLoRA; resident = peak RSS over the process before the model was built):")
            lines = [
                ("ours QLoRA resident / ours bf16 LoRA", held["qlora"] / held["lora_bf16"], 0.35),
                ("ours QLoRA resident / PEFT + bitsandbytes", held["qlora"] / held["peft_qlora"], 0.35),
                ("ours QLoRA step / ours bf16 LoRA step", rows["qlora"]["step_s"] / rows["lora_bf16"]["step_s"], 1.3),
            ]
            for label, value, target in lines:
                print(f"  {label:<44} {value:.3f}  (<= {target:.2f})  {_ok(value <= target)}")
            # what no allocator can go below: the tensors held between steps, plus autograd's saved tensors,
            # all alive at the end of the forward (the adapters' gradients come as backward frees them)
            floor_of = {v: rows[v]["held_mib"] + rows[v]["saved_mib"] for v in QLORA_VARIANTS}
            q, b = rows["qlora"]["held_mib"], rows["lora_bf16"]["held_mib"]
            fq, fb = floor_of["qlora"], floor_of["lora_bf16"]
            print(f"  tensors held between steps, QLoRA / bf16 LoRA: {q / b:.3f} ({q:.0f} / {b:.0f} MiB)")
            print(f"  held + saved (the resident's lower bound): {fq / fb:.3f} ({fq:.0f} / {fb:.0f} MiB)")
        if args.check64_layers:
            check = _worker(["--check-worker", f"{size}:{args.check64_layers}", "--threads", str(args.threads)])
            if check is not None:
                print(
                    f"check with float64 ({args.check64_layers} layer(s)): ours vs PEFT logits "
                    f"{check['logits_rel']:.2e}, bank gradients {check['bank_grad_rel']:.2e}; to float64: ours "
                    f"{check['ours_logits_to_float64']:.2e} / {check['ours_grads_to_float64']:.2e}, PEFT "
                    f"{check['peft_logits_to_float64']:.2e} / {check['peft_grads_to_float64']:.2e} (logits / gradients)"
                )
        if not args.no_check:
            check = _worker(["--check-worker", size, "--threads", str(args.threads)])
            if check is not None:
                worst = max(check.values())
                print(
                    f"check: ours vs PEFT (same factors): logits {check['logits_rel']:.2e}, bank gradients "
                    f"{check['bank_grad_rel']:.2e} (max error / max magnitude; <= 1e-5)  {_ok(worst <= 1e-5)}"
                )
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


def _ok(flag: bool) -> str:
    return "ok" if flag else "MISS"


if __name__ == "__main__":
    main()
