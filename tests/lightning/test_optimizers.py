from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_lightning.lightning.optimizers import find_optimizers_and_schedulers, restrict_optimizer


def _params():
    frozen = [nn.Parameter(torch.zeros(3), requires_grad=False) for _ in range(2)]
    lora_A = [nn.Parameter(torch.zeros(2)) for _ in range(2)]
    lora_B = [nn.Parameter(torch.zeros(2)) for _ in range(2)]
    return frozen, lora_A, lora_B


def test_frozen_params_leave_and_empty_groups_are_dropped():
    frozen, lora_A, lora_B = _params()
    opt = torch.optim.SGD([{"params": frozen, "lr": 0.5}, {"params": lora_A + lora_B}], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.5**s])
    kept = restrict_optimizer(opt, lora_A + lora_B, [sched])
    assert kept == 4 and len(opt.param_groups) == 1
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in lora_A + lora_B}
    # the scheduler follows the group that stayed (the second lambda)
    for step in range(3):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**step)
        opt.step()
        sched.step()


def test_nothing_trainable_leaves_an_empty_optimizer():
    frozen, _, _ = _params()
    opt = torch.optim.SGD(frozen, lr=0.1)
    assert restrict_optimizer(opt, []) == 0
    assert opt.param_groups == []


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=6),
        lambda opt: torch.optim.lr_scheduler.SequentialLR(
            opt,
            [torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=2), torch.optim.lr_scheduler.StepLR(opt, 2)],
            milestones=[2],
        ),
        lambda opt: None,
    ],
    ids=["lambda", "cosine", "onecycle", "sequential", "none"],
)
def test_lora_plus_B_lr_is_ratio_times_A_lr_through_the_schedule(make_scheduler):
    """A's group follows exactly the schedule an untouched optimizer gets; B's is 4x that, every step."""
    frozen, lora_A, lora_B = _params()
    reference_params = [nn.Parameter(torch.zeros(2))]
    ours = torch.optim.AdamW([*frozen, *lora_A, *lora_B], lr=0.1)
    reference = torch.optim.AdamW(reference_params, lr=0.1)
    sched, ref_sched = make_scheduler(ours), make_scheduler(reference)
    restrict_optimizer(ours, lora_A + lora_B, [sched] if sched else [], lora_B=lora_B, lr_ratio_B=4.0)
    assert [len(g["params"]) for g in ours.param_groups] == [2, 2]
    assert {id(p) for p in ours.param_groups[1]["params"]} == {id(p) for p in lora_B}
    for _ in range(6):
        a_lr, b_lr = (g["lr"] for g in ours.param_groups)
        assert a_lr == pytest.approx(reference.param_groups[0]["lr"])
        assert b_lr == pytest.approx(4.0 * a_lr)
        for opt in (ours, reference):
            opt.step()
        for s in (sched, ref_sched):
            if s is not None:
                s.step()


def test_finds_objects_in_every_lightning_return_shape():
    p = nn.Parameter(torch.zeros(1))
    o1, o2 = torch.optim.SGD([p], lr=0.1), torch.optim.Adam([p], lr=0.1)
    s1 = torch.optim.lr_scheduler.StepLR(o1, 1)
    s2 = torch.optim.lr_scheduler.ReduceLROnPlateau(o2)
    shapes = [
        o1,
        [o1, o2],
        ([o1, o2], [s1]),
        {"optimizer": o1, "lr_scheduler": {"scheduler": s1, "interval": "step"}},
        [{"optimizer": o1, "lr_scheduler": s1}, {"optimizer": o2, "lr_scheduler": {"scheduler": s2, "monitor": "x"}}],
    ]
    found = [find_optimizers_and_schedulers(shape) for shape in shapes]
    assert [(len(o), len(s)) for o, s in found] == [(1, 0), (2, 0), (2, 1), (1, 1), (2, 2)]
