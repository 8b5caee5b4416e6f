"""Two gloo processes train a tiny adapted Llama under FSDP2 (``fully_shard``) on CPU.

Run by tests/test_sharing.py in a process of its own:
``python -m tests.fsdp2_sharing OUT_JSON PORT``. For each wrapping (every decoder layer; every
adapted linear on its own) it trains with layers that read one input grouped and one by one, and
rank 0 writes losses, full gradients and the groups in use to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _train(wrap: str, shared: bool, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lora_lightning import LoRAConfig, inject_lora, share_inputs
    from lora_lightning.inject import lora_layers
    from lora_lightning.sharing import input_groups
    from tests.models import tiny_llama, token_ids

    torch.manual_seed(0)
    model = tiny_llama()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    share_inputs(model, enabled=shared)
    model.train()
    mesh = init_device_mesh("cpu", (world,))
    if wrap == "linear":  # each adapted linear its own unit: its siblings' weights are shards when it runs
        for layer in lora_layers(model).values():
            fully_shard(layer, mesh=mesh)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = token_ids(seed=1 + dist.get_rank())  # each rank its own batch, as in data-parallel training
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    grads = {name: p.grad.full_tensor().tolist() for name, p in model.named_parameters() if p.grad is not None}
    return {"losses": losses, "grads": grads, "groups": [list(g) for g in input_groups(model)]}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {
            f"{wrap}/{'grouped' if shared else 'alone'}": _train(wrap, shared, world)
            for wrap in ("layer", "linear")
            for shared in (True, False)
        }
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(_worker, args=(2, int(sys.argv[2]), sys.argv[1]), nprocs=2)
