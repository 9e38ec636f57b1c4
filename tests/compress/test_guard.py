"""The quality guard: the strongest candidate within --max-ppl-ratio, or a refusal that writes nothing."""

from __future__ import annotations

import json

import pytest

from serve_pruned.errors import OptionError, QualityGuardError
from serve_pruned.options import PackageOptions, build_options


def guarded(tiny_models, text_files, out, **kw):
    return PackageOptions(model=str(tiny_models["llama"]), out=out, calib=(str(text_files["calib"]),),
                          eval_text=(str(text_files["eval"]),), eval_max_tokens=512, num_samples=4, seq_len=32,
                          distill_steps=0, multiple_of=32, **kw)


def test_the_guard_packages_the_strongest_candidate_within_it(tiny_models, text_files, tmp_path):
    from serve_pruned.compress.guard import ladder
    from serve_pruned.compress.package import package

    opts = guarded(tiny_models, text_files, tmp_path / "g", max_ppl_ratio=1e6, guard_fractions=(0.8, 0.6))
    assert [r.fraction for r in ladder(opts)] == [0.6, 0.8]  # strongest first
    logs: list[str] = []
    m = package(opts, progress=False, log=logs.append).manifest
    g = m.guard
    assert g is not None and g["chosen"]["fraction"] == 0.6  # every candidate passes: the strongest wins
    assert len(g["tried"]) == 1 and g["tried"][0]["passed"]  # bisection: nothing weaker needed trying
    assert g["measured_ppl_ratio"] == m.quality["recovered"]["perplexity_ratio"]
    assert m.params_fraction <= 0.6
    assert "Quality guard" in (tmp_path / "g" / "README.md").read_text()
    on_disk = json.loads((tmp_path / "g" / "serve_pruned.json").read_text())
    assert on_disk["files"]["README.md"]["bytes"] == (tmp_path / "g" / "README.md").stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["g"]  # its tries' scratch folder is gone
    assert any(line.startswith("guard: chose 0.6 of the parameters") for line in logs)


def test_a_guard_nothing_meets_refuses_with_the_frontier_and_writes_nothing(tiny_models, text_files, tmp_path):
    from serve_pruned.compress.package import package

    (tmp_path / "mine.txt").write_text("the user's own file")
    opts = guarded(tiny_models, text_files, tmp_path / "g", max_ppl_ratio=1.000001, guard_fractions=(0.6, 0.8))
    with pytest.raises(QualityGuardError, match=r"no candidate kept held-out perplexity within 1x") as e:
        package(opts, progress=False)
    # bisection: 0.6 (first of two) fails, then 0.8 fails too; both are in the frontier
    assert len(e.value.frontier) == 2 and all("outside the guard" in f for f in e.value.frontier)
    assert "0.6 of the parameters" in e.value.frontier[0] and "0.8 of the parameters" in e.value.frontier[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]  # no output, no scratch


def test_guard_options_are_checked_at_the_boundary():
    base = {"model": "m", "out": "o", "calib": ("c.txt",), "eval_text": ("e.txt",)}
    with pytest.raises(OptionError, match="chooses the cut itself"):
        build_options({**base, "max_ppl_ratio": 1.1, "target_params": 0.75})
    with pytest.raises(OptionError, match="held-out text"):
        build_options({**base, "max_ppl_ratio": 1.1, "eval_text": ()})
    with pytest.raises(OptionError, match="needs --max-ppl-ratio"):
        build_options({**base, "min_fact_agreement": 0.8})
    with pytest.raises(OptionError, match="each must be a fraction"):
        build_options({**base, "max_ppl_ratio": 1.1, "guard_fractions": (0.5, 1.5)})
    with pytest.raises(OptionError, match="greater than 1"):
        build_options({**base, "max_ppl_ratio": 0.9})
    assert build_options({**base, "max_ppl_ratio": 1.15}).guard_fractions == (0.5, 0.6, 0.7, 0.8, 0.9)
