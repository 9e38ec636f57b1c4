"""The iterative pipeline survives an interruption: a rerun resumes after the last finished pruning step and
ends with the same model as an uninterrupted run; nothing is written to --out by the failed run."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from serve_pruned.compress import distill as distill_mod  # noqa: E402
from serve_pruned.compress.package import package  # noqa: E402
from serve_pruned.options import PackageOptions  # noqa: E402


def _opts(tiny_models, text_files, out, ckpt):
    return PackageOptions(model=str(tiny_models["llama"]), out=out, calib=(str(text_files["calib"]),),
                          num_samples=8, seq_len=32, multiple_of=32, target_params=0.75,
                          schedule="iterative", prune_step=0.125,
                          distill_steps=4, distill_samples=8, distill_seq_len=32, distill_lr=1e-3,
                          checkpoint_dir=ckpt)


def test_interrupted_run_resumes_after_the_last_finished_step(tiny_models, text_files, tmp_path, monkeypatch):
    straight = package(_opts(tiny_models, text_files, tmp_path / "straight", tmp_path / "ck1"), progress=False)
    assert [s["step"] for s in straight.manifest.to_dict()["recovery"]["steps"]] == [1, 2]
    assert not (tmp_path / "ck1").exists()  # checkpoints are removed once the output is complete

    real = distill_mod.distill
    calls = {"n": 0}

    def dies_in_step_two(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as Ctrl-C would
        return real(*a, **k)

    monkeypatch.setattr(distill_mod, "distill", dies_in_step_two)
    with pytest.raises(KeyboardInterrupt):
        package(_opts(tiny_models, text_files, tmp_path / "resumed", tmp_path / "ck2"), progress=False)
    assert not (tmp_path / "resumed").exists()
    assert (tmp_path / "ck2" / "step-1" / "done.json").is_file()
    monkeypatch.setattr(distill_mod, "distill", real)
    logs: list[str] = []
    resumed = package(_opts(tiny_models, text_files, tmp_path / "resumed", tmp_path / "ck2"), progress=False,
                      log=logs.append)
    assert any("step 1/2: done in an earlier run" in m for m in logs)
    assert resumed.manifest.to_dict()["recovery"]["steps"][0]["resumed"] is True
    assert resumed.manifest.to_dict()["shape_after"] == straight.manifest.to_dict()["shape_after"]
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].float().allclose(b[k].float(), atol=1e-2) for k in a)
