from __future__ import annotations

import torch
from torch import nn

from lora_lightning.lightning.checkpoint_record import base_fingerprint, compare_fingerprints


def test_fingerprint_of_a_tensor_past_float32_integer_range():
    """n - 1 = 2**24 + 1 is not a float32: sample positions must still fall inside the tensor."""
    weight = torch.arange(2**24 + 2, dtype=torch.float64)
    (entry,) = base_fingerprint([("w", weight)]).values()
    assert entry["samples"][0] == 0.0 and entry["samples"][-1] == float(2**24 + 1)


def test_fingerprints_tell_same_base_from_another_and_from_a_merged_one():
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    same = base_fingerprint(base.named_parameters())
    assert compare_fingerprints(same, base_fingerprint(base.named_parameters())) == []
    other = nn.Linear(64, 64)
    assert any(
        "holds different values" in p for p in compare_fingerprints(same, base_fingerprint(other.named_parameters()))
    )
    merged = nn.Linear(64, 64)
    merged.load_state_dict(base.state_dict())
    with torch.no_grad():
        merged.weight.add_(torch.randn(64, 4) @ torch.randn(4, 64) * 1e-4)  # a small low-rank update
    problems = compare_fingerprints(same, base_fingerprint(merged.named_parameters()))
    assert problems == ["base weight 'weight' holds different values than the checkpoint's base"]
    # a bf16 copy of the same base passes at bf16's rounding
    assert compare_fingerprints(same, base_fingerprint(base.to(torch.bfloat16).named_parameters())) == []
