"""Adapted linears that read the same tensor are computed as one node (lora_lightning.sharing).

The references: the plain formula in float64 (gradcheck and the reference function), and the same
model with grouping turned off (``share_inputs(model, False)``), whose every layer runs the
single-layer kernel the rest of the suite holds to PEFT.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from lora_lightning import LoRAConfig, inject_lora, merge_lora
from lora_lightning.inject import lora_layers
from lora_lightning.kernels import lora_linear, shared_input_lora_linear
from lora_lightning.layers import LoRALinear
from lora_lightning.sharing import input_groups, share_inputs
from lora_lightning.variants import LoRAVariant
from tests.models import tiny_bert, tiny_llama, token_ids
from tests.reference import lora_linear_reference

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _members(dtype=torch.float64, freeze_A=False):
    """Three members reading a 7-wide input: different outputs, ranks, scales, with and without bias."""
    torch.manual_seed(0)
    members = []
    for out, r, bias, scale in [(6, 3, True, 0.5), (4, 2, False, 2.0), (9, 4, True, 1.0)]:
        weight = torch.randn(out, 7, dtype=dtype, requires_grad=True)
        b = torch.randn(out, dtype=dtype, requires_grad=True) if bias else None
        lora_A = torch.randn(r, 7, dtype=dtype, requires_grad=not freeze_A)
        lora_B = torch.randn(out, r, dtype=dtype, requires_grad=True)
        members.append((weight, b, lora_A, lora_B, scale))
    return members


def test_grouped_function_gradcheck_float64():
    members = _members()
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    flat = [t for m in members for t in m[:4]]

    def grouped(x, *flat):
        rebuilt = [(*flat[4 * i : 4 * i + 4], members[i][4]) for i in range(len(members))]
        return shared_input_lora_linear(x, rebuilt)

    assert torch.autograd.gradcheck(grouped, (x, *flat))


@pytest.mark.parametrize("freeze_A", [False, True])
def test_grouped_equals_reference_when_some_outputs_are_unused(freeze_A):
    members = _members(freeze_A=freeze_A)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    inputs = [x] + [t for m in members for t in m[:4] if t is not None and t.requires_grad]

    def loss(outputs):
        return outputs[0].square().sum() + (outputs[2] * torch.linspace(-1, 1, 9, dtype=torch.float64)).sum()

    got_out = shared_input_lora_linear(x, members)
    want_out = [lora_linear_reference(x, *m) for m in members]
    for got, want in zip(got_out, want_out, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(loss(got_out), inputs, allow_unused=True)
    want = torch.autograd.grad(loss(want_out), inputs, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        if w is None:  # the unused member's parameters: no gradient from either
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert sum(g is None for g in got) == (2 if freeze_A else 3)  # member 1's W and B (and A)


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("freeze_A", [False, True])
def test_group_saves_its_input_once_and_x_at_once(freeze_A):
    """Saved: x (unless A is frozen), x [A_1; A_2; A_3]^T (N x R), and the weights and factors."""
    members = [
        (w.detach(), b, a.detach().requires_grad_(not freeze_A), bb.detach().requires_grad_(), s)
        for w, b, a, bb, s in _members(torch.float32)
    ]
    x = torch.randn(64, 7, requires_grad=True)
    params = sum(m[0].numel() + m[3].numel() for m in members) + sum(m[2].numel() for m in members)
    ranks = sum(m[2].shape[0] for m in members)
    expected = (0 if freeze_A else x.numel()) + 64 * ranks + params
    assert _saved_bytes(lambda: shared_input_lora_linear(x, members)) == 4 * expected


def _adapted_llama(**config):
    model = tiny_llama(layers=2)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=TARGETS, **config), share_inputs=True)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.1)  # nonzero: both factors and the input get gradients
    return model.train()


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_step(model, twin, ids, rtol=1e-5, atol=1e-6):
    logits, grads = _step(model, ids)
    logits_twin, grads_twin = _step(twin, ids)
    torch.testing.assert_close(logits, logits_twin, rtol=rtol, atol=atol)
    assert grads.keys() == grads_twin.keys() and len(grads) == 2 * 14
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads_twin[name], rtol=rtol, atol=atol, msg=name)


def _llama_groups(layers: int, with_o: bool) -> list[tuple[str, ...]]:
    groups = []
    for i in range(layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        qkv = tuple(f"{attn}.{p}_proj" for p in ("qkvo" if with_o else "qkv"))
        groups += [qkv, (f"{mlp}.gate_proj", f"{mlp}.up_proj")]
    return sorted(groups)


def test_llama_settles_on_qkv_and_gate_up_and_matches_ungrouped():
    model = _adapted_llama()
    twin = copy.deepcopy(model)
    share_inputs(twin, enabled=False)
    ids = token_ids()
    # Speculative: every module's adapted children of one input width (o_proj reads the hidden width too).
    assert sorted(input_groups(model)) == _llama_groups(2, with_o=True)
    _assert_same_step(model, twin, ids)
    for _ in range(2):  # the next forward cuts o_proj off: it was called with another tensor
        _assert_same_step(model, twin, ids)
        assert sorted(input_groups(model)) == _llama_groups(2, with_o=False)
    assert input_groups(twin) == []


def test_forwards_give_the_same_bits_observed_grouped_or_alone():
    """Each member's output is computed exactly as alone (its own x A^T, one GEMM each), so a
    forward gives the same bits whether its group is a candidate (members run alone while it
    observes), settled (computed together) or off; gradients differ only in summation order."""
    settled = _adapted_llama()
    candidate = copy.deepcopy(settled)
    ids = token_ids()
    settled(input_ids=ids)
    for dtype in (torch.float32, torch.bfloat16):
        for model in (settled, candidate):
            model.to(dtype)
        fresh = copy.deepcopy(candidate)  # copies start from the candidate groups
        off = copy.deepcopy(candidate)
        share_inputs(off, enabled=False)
        logits, grads = _step(settled, ids)
        assert sorted(input_groups(settled)) == _llama_groups(2, with_o=False)
        logits_fresh, grads_fresh = _step(fresh, ids)
        assert sorted(input_groups(fresh)) == _llama_groups(2, with_o=True)  # (it settles on the next forward)
        logits_off, grads_off = _step(off, ids)
        assert torch.equal(logits, logits_fresh) and torch.equal(logits, logits_off)
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0.02, "atol": 1e-3}
        for name, grad in grads.items():
            assert torch.equal(grads_fresh[name], grads_off[name]), (dtype, name)  # observing computes alone
            torch.testing.assert_close(grad, grads_off[name], **tol, msg=f"{dtype} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_a_group_with_one_used_output_is_the_single_layer_kernel_bit_for_bit(dtype, with_bias):
    torch.manual_seed(0)
    layers = [LoRALinear(nn.Linear(32, out, bias=with_bias), r=4, alpha=12).to(dtype) for out in (24, 16)]
    for layer in layers:
        layer.base_layer.requires_grad_(False)
        with torch.no_grad():
            layer.lora_B.normal_()
    x = torch.randn(3, 5, 32, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 5, 16, dtype=dtype)
    members = [(m.base_weight(), m.base_layer.bias, m.lora_A, m.lora_B, m.scale) for m in layers]
    grouped = shared_input_lora_linear(x, members)[1]
    got = torch.autograd.grad(grouped, [x, layers[1].lora_A, layers[1].lora_B], grad)
    alone = lora_linear(x, *members[1])
    want = torch.autograd.grad(alone, [x, layers[1].lora_A, layers[1].lora_B], grad)
    assert torch.equal(grouped, alone)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_grouped_forward_runs_one_node_per_group():
    """The q/k/v outputs come from one autograd node; o_proj, which reads another tensor, from its own."""
    model = _adapted_llama()
    ids = token_ids()
    model(input_ids=ids)
    outputs = {}

    def keep(name):
        return lambda module, args, out: outputs.__setitem__(name, out)

    attn = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(attn, name).register_forward_hook(keep(name))
    model(input_ids=ids)
    nodes = {name: out.grad_fn for name, out in outputs.items()}
    assert type(nodes["q_proj"]).__name__.startswith("SharedInputLoRAFunction")
    assert nodes["q_proj"] is nodes["k_proj"] is nodes["v_proj"]
    assert type(nodes["o_proj"]).__name__.startswith("LoRALinearFunction")


def _adapted(module: nn.Module, targets: list[str]) -> nn.Module:
    inject_lora(module, LoRAConfig(r=2, alpha=4, target_modules=targets), share_inputs=True)
    with torch.no_grad():
        for layer in lora_layers(module).values():
            layer.lora_B.normal_()
    return module


def _grads_of(module: nn.Module, loss: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in module.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params + list(inputs)))


def test_only_layers_seen_reading_the_same_tensor_are_grouped():
    """Cross-attention: q reads the decoder states, k and v the encoder's."""
    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    twin = copy.deepcopy(module)
    share_inputs(twin, enabled=False)
    h, enc = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)
    module.kv_from = twin.kv_from = enc
    for _ in range(3):
        out, out_twin = module(h), twin(h)
        torch.testing.assert_close(out, out_twin)
        for g, w in zip(_grads_of(module, out.sum(), h, enc), _grads_of(twin, out_twin.sum(), h, enc), strict=True):
            torch.testing.assert_close(g, w)
    assert input_groups(module) == [("k", "v")]


class Attention(nn.Module):
    """q, k, v on one tensor, unless told to give k and v another (as cached cross-attention might)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.kv_from: torch.Tensor | None = None
        self.scale_in_place = False
        self.only_q = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q = self.q(h)
        if self.only_q:
            return q
        if self.scale_in_place:
            with torch.no_grad():
                h.mul_(2.0)  # changes h after q read it: k and v must see the new values
        kv = h if self.kv_from is None else self.kv_from
        return q + self.k(kv) * self.v(kv)


def _reference_output(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    twin = copy.deepcopy(module)
    share_inputs(twin, enabled=False)
    return twin(h.clone())


def test_members_called_with_another_tensor_are_regrouped_by_what_they_read():
    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    h = torch.randn(4, 16)
    module(h)
    module(h)
    assert input_groups(module) == [("q", "k", "v")]
    module.kv_from = torch.randn(4, 16)  # from now on k and v read another tensor than q
    want = _reference_output(module, h)
    torch.testing.assert_close(module(h), want)  # k and v are computed together from their tensor
    assert input_groups(module) == [("q", "k", "v")]  # regrouped when the next forward starts
    torch.testing.assert_close(module(h), want)
    assert input_groups(module) == [("k", "v")]
    torch.testing.assert_close(module(h), want)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_forwards_recompute_what_they_saved_through_every_change(use_reentrant):
    """Speculative -> regrouped under activation checkpointing: the recomputation (inside
    backward) must save the tensors its original forward saved, or checkpoint raises."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    twin = copy.deepcopy(module)
    share_inputs(twin, enabled=False)
    states = []
    for step in range(6):
        if step == 3:
            module.kv_from = twin.kv_from = torch.randn(4, 16)
        h = torch.randn(4, 16)
        grads = []
        for m, run in ((module, lambda x: checkpoint(module, x, use_reentrant=use_reentrant)), (twin, twin)):
            m.zero_grad(set_to_none=True)
            x = h.clone().requires_grad_(True)
            run(x).square().sum().backward()  # (reentrant checkpoint refuses autograd.grad)
            grads.append([p.grad for p in m.parameters() if p.requires_grad] + [x.grad])
        for g, w in zip(*grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        states.append(input_groups(module))
    assert states == [[("q", "k", "v")]] * 4 + [[("k", "v")]] * 2  # regrouped when the 5th forward starts


def test_an_input_changed_in_place_between_members_is_not_reused():
    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    module(torch.randn(4, 16))
    module(torch.randn(4, 16))
    module.scale_in_place = True
    h = torch.randn(4, 16)
    want = _reference_output(module, h)
    with torch.no_grad():
        torch.testing.assert_close(module(h), want)


def test_members_a_forward_never_called_leave_the_group():
    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    module(torch.randn(4, 16))
    module(torch.randn(4, 16))
    group = module.q._shared_input
    module.only_q = True
    for _ in range(3):
        h = torch.randn(4, 16)
        torch.testing.assert_close(module(h), _reference_output(module, h))
    assert input_groups(module) == [] and not group._pending  # nothing computed for k and v any more


def test_dropout_in_training_runs_alone_and_eval_groups():
    torch.manual_seed(0)
    module = Attention()
    inject_lora(module, LoRAConfig(r=2, target_modules=["q", "k", "v"], dropout=0.5), share_inputs=True)
    h = torch.randn(4, 16)
    module.train()
    for _ in range(3):
        out = module(h)
        assert type(out.grad_fn).__name__ != "SharedInputLoRAFunctionBackward"
    assert input_groups(module) == [("q", "k", "v")]  # forwards it could not run taught it nothing
    module.eval()
    module(h)
    module(h)
    assert input_groups(module) == [("q", "k", "v")]
    assert not module.q._shared_input._pending  # nothing kept from the training forward
    torch.testing.assert_close(module(h), _reference_output(module, h))


def test_merged_members_and_inference_mode_run_alone():
    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    h = torch.randn(4, 16)
    module(h)
    module(h)
    with torch.inference_mode():
        torch.testing.assert_close(module(h), _reference_output(module, h))
    assert not module.q._shared_input._pending
    want = module(h).detach()
    merge_lora(module)
    torch.testing.assert_close(module(h), want, rtol=1e-5, atol=1e-6)
    assert not module.q._shared_input._pending


def test_a_layer_reused_within_one_forward_is_grouped_per_call():
    """ALBERT-style: one block applied several times per forward."""
    torch.manual_seed(0)
    block = _adapted(Attention(), ["q", "k", "v"])

    def forward(h):
        for _ in range(3):
            h = torch.tanh(block(h))
        return h

    h = torch.randn(4, 16, requires_grad=True)
    forward(h)
    assert input_groups(block) == [("q", "k", "v")]
    twin = copy.deepcopy(block)
    share_inputs(twin, enabled=False)
    out = forward(h)
    grads = _grads_of(block, out.sum(), h)
    h_twin = h.detach().clone().requires_grad_(True)
    out_twin = h_twin
    for _ in range(3):
        out_twin = torch.tanh(twin(out_twin))
    torch.testing.assert_close(out, out_twin)
    for g, w in zip(grads, _grads_of(twin, out_twin.sum(), h_twin), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)  # float32, sums in another order


def test_copies_and_pickles_start_clean_and_group_on_their_own():
    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    module(torch.randn(4, 16))
    module(torch.randn(4, 16))
    module.only_q = True
    out = module(torch.randn(4, 16, requires_grad=True))  # a live graph through the group's node
    clone = copy.deepcopy(module)
    del out
    restored = pickle.loads(pickle.dumps(module))
    for copied in (clone, restored):
        copied.only_q = False
        assert copied.q._shared_input is not module.q._shared_input
        assert copied.q._shared_input.members[1] is copied.k  # the copy's group holds the copy's layers
        h = torch.randn(4, 16)
        torch.testing.assert_close(copied(h), _reference_output(copied, h))


def test_share_inputs_off_and_on_again():
    model = _adapted_llama()
    ids = token_ids()
    model(input_ids=ids)
    model(input_ids=ids)
    assert sorted(input_groups(model)) == _llama_groups(2, with_o=False)
    assert share_inputs(model, enabled=False) == 0
    model(input_ids=ids)
    model(input_ids=ids)
    assert input_groups(model) == []
    assert share_inputs(model) == 4  # the 2 attention and 2 MLP blocks, speculative again
    assert sorted(input_groups(model)) == _llama_groups(2, with_o=True)
    model(input_ids=ids)
    model(input_ids=ids)
    assert sorted(input_groups(model)) == _llama_groups(2, with_o=False)


def test_bert_groups_query_key_value():
    model = tiny_bert()
    inject_lora(model, LoRAConfig(r=4, target_modules=["query", "key", "value", "dense"]), share_inputs=True)
    ids = token_ids()
    model(input_ids=ids)
    model(input_ids=ids)
    groups = input_groups(model)
    assert (
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.key",
        "encoder.layer.0.attention.self.value",
    ) in groups
    assert all("dense" not in name for group in groups for name in group)


def test_gradient_checkpointing_with_groups_matches_plain():
    model = _adapted_llama()
    twin = copy.deepcopy(model)
    share_inputs(twin, enabled=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = token_ids()
    for _ in range(3):
        _assert_same_step(model, twin, ids)
    assert sorted(input_groups(model)) == _llama_groups(2, with_o=False)


def test_autocast_bf16_groups_and_stays_close_to_ungrouped():
    model = _adapted_llama()
    twin = copy.deepcopy(model)
    share_inputs(twin, enabled=False)
    ids = token_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            logits, grads = _step(model, ids)
            logits_twin, grads_twin = _step(twin, ids)
    assert sorted(input_groups(model)) == _llama_groups(2, with_o=False)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, logits_twin, rtol=0.02, atol=0.02)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32  # factors keep their dtype; the compute ran in bf16
        rel = (grad - grads_twin[name]).norm() / grads_twin[name].norm()
        assert rel < 0.02, (name, rel.item())


@pytest.mark.slow
def test_fsdp2_two_processes_group_inside_a_unit_and_fall_back_across_units(tmp_path):
    """Real FSDP2 (gloo, CPU): wrapped per decoder layer, q/k/v and gate/up run as one node on the
    unsharded weights; wrapped per adapted linear, a layer's siblings are shards when it runs, so
    every layer runs alone. Either way training equals the one-by-one run."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fsdp2.json"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "tests.fsdp2_sharing", str(out), str(port)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(out.read_text())
    for wrap in ("layer", "linear"):
        grouped, alone = runs[f"{wrap}/grouped"], runs[f"{wrap}/alone"]
        assert grouped["losses"] == pytest.approx(alone["losses"], rel=1e-6)
        assert grouped["grads"].keys() == alone["grads"].keys() and len(grouped["grads"]) == 28
        for name, grad in grouped["grads"].items():
            torch.testing.assert_close(torch.tensor(grad), torch.tensor(alone["grads"][name]), rtol=1e-5, atol=1e-6)
        assert alone["groups"] == []
    settled = [tuple(g) for g in runs["layer/grouped"]["groups"]]
    assert sorted(settled) == _llama_groups(2, with_o=False)  # grouping ran (it settled) inside each unit
    never_ran = [tuple(g) for g in runs["linear/grouped"]["groups"]]
    assert sorted(never_ran) == _llama_groups(2, with_o=True)  # still speculative: it never could run


def test_two_checkpointed_forwards_before_one_backward_from_the_first_step():
    """DPO-style: two non-reentrant checkpointed forwards, then one backward. The group may only be
    cut once no earlier grouped computation can still be recomputed, or checkpoint would raise."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    module = _adapted(AttentionWithOutput(), ["q", "k", "v", "o"])
    twin = copy.deepcopy(module)
    share_inputs(twin, enabled=False)
    seen = []
    for _ in range(3):
        pair = [torch.randn(4, 16) for _ in range(2)]
        grads = []
        for m, run in ((module, lambda x: checkpoint(module, x, use_reentrant=False)), (twin, twin)):
            m.zero_grad(set_to_none=True)
            xs = [h.clone().requires_grad_(True) for h in pair]
            sum(run(x).square().sum() for x in xs).backward()
            grads.append([p.grad for p in m.parameters() if p.requires_grad] + [x.grad for x in xs])
        for g, w in zip(*grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        seen.append(input_groups(module))
    # The 2nd forward of step 1 could not cut (the 1st's graph was waiting for its backward);
    # the first forward of step 2 did.
    assert seen == [[("q", "k", "v", "o")], [("q", "k", "v")], [("q", "k", "v")]]


class AttentionWithOutput(nn.Module):
    """q, k, v on one tensor and o on their result: o shares q's width but not its input."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(h) * self.k(h) + self.v(h)))


def test_kept_outputs_and_their_graph_do_not_outlive_the_parents_call():
    import weakref

    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    module(torch.randn(4, 16))
    module(torch.randn(4, 16))  # settled: q, k and v are computed together from now on
    module.only_q = True  # k's and v's outputs are computed with q's and never asked for
    out = module(torch.randn(4, 16))
    group = module.q._shared_input
    assert type(out.grad_fn).__name__ == "SharedInputLoRAFunctionBackward"
    assert not group._pending
    node = weakref.ref(out.grad_fn)
    del out
    assert node() is None  # nothing of the group's computation is kept alive


def test_layers_called_outside_their_parents_call_run_alone():
    """Two heads on one feature, each loss backpropagated before the next head runs."""
    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    twin = copy.deepcopy(module)
    share_inputs(twin, enabled=False)
    h = torch.randn(4, 16)
    module(h)
    for m in (module, twin):
        m.zero_grad(set_to_none=True)
        for head in (m.q, m.k, m.v):
            out = head(h)
            assert type(out.grad_fn).__name__ == "LoRALinearFunctionBackward"
            out.square().sum().backward()
    for p, w in zip(module.parameters(), twin.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, w.grad)


def test_members_whose_weights_are_not_gathered_yet_make_the_group_run_alone():
    """ZeRO-3 / FSDP1 style: a layer's own pre-forward hook gathers its weight (``param.data``
    is an empty tensor until then), so a sibling must not compute the group with it."""
    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    h = torch.randn(4, 16)
    want = _reference_output(module, h)
    full = {}

    def release(layer, *_):
        full[layer] = layer.base_layer.weight.data
        layer.base_layer.weight.data = torch.empty(0)

    def gather(layer, args):
        layer.base_layer.weight.data = full[layer]

    for layer in (module.q, module.k, module.v):
        layer.register_forward_pre_hook(gather)
        layer.register_forward_hook(release)
        release(layer)
    for _ in range(2):
        torch.testing.assert_close(module(h), want)
    assert input_groups(module) == [("q", "k", "v")]  # not cut: rounds it could not run teach nothing


def test_a_second_thread_inside_the_same_parent_runs_alone():
    import threading

    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    h_a, h_b = torch.randn(4, 16), torch.randn(4, 16)
    want_a, want_b = _reference_output(module, h_a), _reference_output(module, h_b)
    got = {}
    a_inside, b_done = threading.Event(), threading.Event()
    q_alone = module.q.forward

    def q_then_wait(x):  # thread A stops between q and k, inside the parent's call
        out = q_alone(x)
        if threading.current_thread().name == "A":
            a_inside.set()
            assert b_done.wait(10)
        return out

    module.q.forward = q_then_wait

    def run(name, h):
        with torch.no_grad():
            got[name] = module(h)
        if name == "B":
            b_done.set()

    thread_a = threading.Thread(target=run, args=("A", h_a), name="A")
    thread_a.start()
    assert a_inside.wait(10)
    run("B", h_b)  # the main thread calls the parent while A is inside it
    thread_a.join(10)
    torch.testing.assert_close(got["A"], want_a)
    torch.testing.assert_close(got["B"], want_b)
    assert input_groups(module) == [("q", "k", "v")]


def test_layers_held_in_a_module_list_are_grouped_within_the_call_of_its_owner():
    class Projections(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(16, 8) for _ in range(3))

        def forward(self, h):
            return torch.stack([head(h) for head in self.heads]).sum(0)

    torch.manual_seed(0)
    module = _adapted(Projections(), ["heads.0", "heads.1", "heads.2"])
    h = torch.randn(4, 16)
    module(h)
    nodes = []
    for head in module.heads:
        head.register_forward_hook(lambda mod, args, out: nodes.append(out.grad_fn))
    out = module(h)
    assert input_groups(module) == [("heads.0", "heads.1", "heads.2")]
    assert type(nodes[0]).__name__ == "SharedInputLoRAFunctionBackward" and nodes[0] is nodes[1] is nodes[2]
    torch.testing.assert_close(out, _reference_output(module, h))


class CheckpointedMLP(nn.Module):
    """Checkpoints a region inside its own forward: the recomputation runs without this module's call."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def _inner(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self._inner, x, use_reentrant=False)


def test_a_checkpointed_region_inside_the_parent_runs_alone_in_forward_and_recomputation():
    torch.manual_seed(0)
    module = _adapted(nn.Sequential(CheckpointedMLP(), CheckpointedMLP()), ["gate", "up", "down"])
    twin = copy.deepcopy(module)
    share_inputs(twin, enabled=False)
    x = torch.randn(3, 8)
    for _ in range(3):
        grads = []
        for m in (module, twin):
            m.zero_grad(set_to_none=True)
            m(x).square().sum().backward()  # raised CheckpointError when forward grouped them
            grads.append([p.grad for p in m.parameters() if p.requires_grad])
        for g, w in zip(*grads, strict=True):
            torch.testing.assert_close(g, w)


def test_a_graph_kept_for_a_second_backward_keeps_its_grouping():
    """backward(retain_graph=True), another forward, then a second backward through the first
    graph: the forward in between must not cut the groups the first graph will recompute with."""
    model = _adapted_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    twin = copy.deepcopy(model)
    share_inputs(twin, enabled=False)
    grads = []
    for m in (model, twin):
        first = m(input_ids=token_ids(seed=1)).logits
        first.square().mean().backward(retain_graph=True)
        second = m(input_ids=token_ids(seed=2)).logits
        (first.mean() + second.mean()).backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    for g, w in zip(*grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_an_inference_tensor_read_outside_inference_mode_runs_alone():
    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    with torch.inference_mode():
        h = torch.randn(4, 16)  # e.g. encoder states cached under inference_mode
    with torch.no_grad():
        torch.testing.assert_close(module(h), _reference_output(module, h.clone()))


def test_a_call_that_raised_half_way_teaches_nothing_and_one_interrupted_is_left_behind():
    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    for _ in range(2):
        module(torch.randn(4, 16))
    failing = {"error": RuntimeError("out of memory (simulated)")}
    q_alone = module.q.forward

    def q_then_fail(x):
        out = q_alone(x)
        if failing.get("error") is not None:
            raise failing["error"]
        return out

    module.q.forward = q_then_fail
    with pytest.raises(RuntimeError):
        module(torch.randn(4, 16))  # the loop skips this batch: only q was called
    failing["error"] = None
    h = torch.randn(4, 16)
    torch.testing.assert_close(module(h), _reference_output(module, h))
    assert input_groups(module) == [("q", "k", "v")]  # not cut on the partial call

    failing["error"] = KeyboardInterrupt()  # not an Exception: forward hooks are skipped
    with pytest.raises(KeyboardInterrupt):
        module(h)
    failing["error"] = None
    with torch.no_grad():
        for layer in (module.q, module.k, module.v):
            layer.lora_B.add_(1.0)  # new weights: what the interrupted call kept is stale
    torch.testing.assert_close(module(h), _reference_output(module, h))
    assert module._lora_input_round.depth == 0
    assert input_groups(module) == [("q", "k", "v")]


def test_merge_and_unload_leaves_no_hook_or_attribute_behind():
    import gc
    import weakref

    from lora_lightning import merge_and_unload

    model = _adapted_llama()
    model(input_ids=token_ids())
    layers = [weakref.ref(layer) for layer in lora_layers(model).values()]
    merge_and_unload(model)
    gc.collect()
    assert all(ref() is None for ref in layers)  # nothing holds the removed LoRA layers
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert not any(key.startswith("_lora") for key in vars(module))


class Experts(nn.Module):
    """Mixture-of-experts style: adapted linears in a ModuleList, each fed its own slice."""

    def __init__(self, n: int = 16, width: int = 8) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (n, tokens, width)
        return torch.stack([expert(x[i]) for i, expert in enumerate(self.experts)])


def test_experts_fed_their_own_slices_compute_one_output_each(monkeypatch):
    """16 siblings of one width, each called with its own tensor: every forward computes exactly
    16 adapted outputs (the experts called), from the first one on."""
    import lora_lightning.kernels as kernels

    computed = []
    one_output = kernels._adapted_linear  # the forward of one adapted linear, alone or in a group

    def counting(*args, **kwargs):
        computed.append(1)
        return one_output(*args, **kwargs)

    monkeypatch.setattr(kernels, "_adapted_linear", counting)
    torch.manual_seed(0)
    module = _adapted(Experts(), [f"experts.{i}" for i in range(16)])
    twin = copy.deepcopy(module)
    share_inputs(twin, enabled=False)
    per_forward = []
    for _ in range(3):
        x = torch.randn(16, 5, 8)
        computed.clear()
        out = module(x)
        per_forward.append(len(computed))
        torch.testing.assert_close(out, twin(x))
        out.square().sum().backward()
    assert per_forward == [16, 16, 16]
    assert input_groups(module) == []  # no two experts ever read one tensor


class _DoubledUpdate(LoRAVariant):
    """A variant the fused kernel does not compute (its update counts twice)."""

    name = "doubled"
    fusable = False

    def forward(self, layer, x):
        return layer.base_layer(x) + 2 * layer.scale * (x @ layer.lora_A.t()) @ layer.lora_B.t()


def test_a_layer_the_fused_kernel_does_not_compute_is_never_grouped():
    """Grouping asks each layer for its terms; a variant that is not plain LoRA (or a base that is
    not a dense weight) never joins a group, whether it had that variant from the start or got it
    after the group settled: it is computed by its own forward, never by plain LoRA's formula."""
    torch.manual_seed(0)
    module = _adapted(Attention(), ["q", "k", "v"])
    module.k.variant = _DoubledUpdate()
    share_inputs(module)  # groups start again from the candidates
    assert input_groups(module) == [("q", "v")]  # k is not even a candidate

    def step(h):
        nodes = {}
        hooks = [
            m.register_forward_hook(lambda mod, args, out: nodes.__setitem__(mod, type(out.grad_fn).__name__))
            for m in (module.q, module.k, module.v)
        ]
        out = module(h)
        for hook in hooks:
            hook.remove()
        twin = copy.deepcopy(module)
        share_inputs(twin, enabled=False)  # every layer through its own forward
        torch.testing.assert_close(out, twin(h))
        out.sum().backward()
        return nodes

    for _ in range(3):
        nodes = step(torch.randn(4, 16, requires_grad=True))
    assert input_groups(module) == [("q", "v")]
    assert nodes[module.q] == nodes[module.v] == "SharedInputLoRAFunctionBackward"  # settled and grouped
    assert nodes[module.k] != "SharedInputLoRAFunctionBackward"
    module.v.variant = _DoubledUpdate()  # after the group settled: it now runs its members alone
    for _ in range(2):
        nodes = step(torch.randn(4, 16, requires_grad=True))
        assert "SharedInputLoRAFunctionBackward" not in nodes.values()


@pytest.mark.parametrize("switch", [False, True])
def test_grouping_is_off_unless_asked_for(tmp_path, switch):
    """inject_lora and LoRACallback compute every layer on its own by default; share_inputs=True
    turns grouping on, and training then runs q,k,v (gate,up) as one node."""
    import lightning.pytorch as pl

    from lora_lightning import LoRACallback
    from tests.lightning_modules import CausalLM, token_data

    plain = tiny_llama(layers=1)
    inject_lora(plain, LoRAConfig(r=2, target_modules=TARGETS))
    assert input_groups(plain) == []

    class Nodes(pl.Callback):
        def __init__(self) -> None:
            self.seen: set[str] = set()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            attn = pl_module.model.model.layers[0].self_attn
            self.hook = attn.q_proj.register_forward_hook(
                lambda mod, args, out: self.seen.add(type(out.grad_fn).__name__)
            )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.hook.remove()

    nodes = Nodes()
    lora = LoRACallback(r=2, target_modules=TARGETS, module="model", share_inputs=switch)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[lora, nodes],
    )
    trainer.fit(CausalLM(), token_data(n=24))
    grouped = "SharedInputLoRAFunctionBackward" in nodes.seen
    assert grouped is switch
    with pytest.raises(TypeError, match="share_inputs must be True or False, got 'yes'"):
        LoRACallback(r=2, share_inputs="yes")
