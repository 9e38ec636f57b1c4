"""--scorer auto: obs where the refit follows and its elimination is affordable, activation otherwise, and why."""

from __future__ import annotations

import pytest

from serve_pruned.compress.scorer_choice import AUTO_OBS_BUDGET_S, choose_scorer, obs_seconds
from serve_pruned.model.shapes import Shape
from serve_pruned.options import PackageOptions

SMOLLM2 = Shape(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536, hidden_size=576)
LLAMA_8B = Shape(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336, hidden_size=4096)


def opts(**kw):
    return PackageOptions(**{"model": "m", "out": "o", "target_params": 0.75, "calib": ("a.txt",), **kw})


@pytest.mark.parametrize(("given", "expected"), [
    ({}, "obs"), ({"recover": False}, "activation"), ({"refit": False}, "activation"),
    ({"scorer": "activation"}, "activation"), ({"scorer": "obs", "recover": False}, "obs"),
])
def test_auto_is_obs_only_when_the_refit_follows(given, expected):
    """obs ranks FFN channels for the least-squares refit; without one, activation prunes better."""
    assert choose_scorer(opts(**given), SMOLLM2, on_device=False).name == expected


def test_auto_weighs_obs_cost_which_is_cubic_in_the_ffn_width():
    assert obs_seconds(SMOLLM2) < AUTO_OBS_BUDGET_S < obs_seconds(LLAMA_8B)
    wider = Shape(30, 9, 3, 64, 2 * 1536, 576)
    assert obs_seconds(wider) == pytest.approx(8 * obs_seconds(SMOLLM2))
    big = choose_scorer(opts(), LLAMA_8B, on_device=False)
    assert big.name == "activation" and big.obs_seconds == obs_seconds(LLAMA_8B)
    assert "14336" in big.reason and " h " in big.reason and "--scorer obs" in big.reason
    assert choose_scorer(opts(scorer="obs"), LLAMA_8B, on_device=False).name == "obs"  # asked for: it runs
    assert choose_scorer(opts(), LLAMA_8B, on_device=True).name == "obs"
    small = choose_scorer(opts(), SMOLLM2, on_device=False)
    assert small.as_manifest()["scorer"] == "obs" and small.as_manifest()["obs_predicted_s"] > 0
