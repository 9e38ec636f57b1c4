"""What config.json and the checkpoint's headers decide for every stage: the compute dtype auto resolves to."""

from __future__ import annotations

from serve_pruned.model.config import compute_dtype_for


def test_auto_computes_in_bfloat16_only_when_nothing_would_be_rounded():
    assert compute_dtype_for("auto", ["BF16", "BF16", "I64"]) == "bfloat16"  # an integer buffer is not a weight
    # a float32 or float16 checkpoint (or one with a float32 tensor) would lose bits through bfloat16
    assert compute_dtype_for("auto", ["F32"]) == "float32"
    assert compute_dtype_for("auto", ["F16"]) == "float32"
    assert compute_dtype_for("auto", ["BF16", "F32"]) == "float32"
    assert compute_dtype_for("float32", ["BF16"]) == "float32"  # asked for: kept
    assert compute_dtype_for("bfloat16", ["F32"]) == "bfloat16"
