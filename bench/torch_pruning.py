"""Peer comparison: Torch-Pruning's LLM recipe vs serve-pruned on SmolLM2-135M-Instruct at the same parameter
count, with the same recovery budget (logit distillation from the original), measured on the same text.

Ours: `serve-pruned package` in-process, one-shot to --target of the parameters, no quantization; the
`pruned` stage of its quality report is the pruned-only model (it is evaluated before any recovery, and
is the model `--no-recover` would write), `recovered` is after refit + distillation.
Torch-Pruning: the recipe of its examples/LLMs/prune_llm.py (magnitude group importance, local pruning of the
hidden size, the MLP width and whole query heads at one ratio, lm_head ignored, round_to=4), with the ratio
bisected so that the pruned model has as many parameters as ours; then our distillation with the same
budget, samples, learning rate and batch order.

    .venv/bin/python bench/torch_pruning.py [--target 0.75] [--distill-steps 100] [--eval-tokens 8192]
    .venv/bin/python bench/torch_pruning.py --smoke   # tiny random Llama, seconds, writes nothing
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from _report import DOCS, OOD, bench_command, write_section  # noqa: E402

# This script has the name of the package it benchmarks: take bench/ off the path again (Python put it first
# too), or `import torch_pruning` would import this file instead of Torch-Pruning.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]

from serve_pruned.compress.data import calibration_samples, eval_tokens, read_sources  # noqa: E402
from serve_pruned.compress.distill import DistillSettings, distill  # noqa: E402
from serve_pruned.compress.evaluate import evaluate  # noqa: E402
from serve_pruned.compress.model_io import load_model, load_tokenizer  # noqa: E402
from serve_pruned.compress.package import package  # noqa: E402
from serve_pruned.options import PackageOptions  # noqa: E402

CALIB = (str(DOCS / "howto"), str(DOCS / "faq"))
HELD_OUT, OUT_OF_DOMAIN = str(DOCS / "tutorial"), str(OOD)
# What package() uses for its distillation windows (PackageOptions defaults): the peer gets the same.
DISTILL_SAMPLES, DISTILL_SEQ_LEN, DISTILL_BATCH, DISTILL_LR, SEED = 512, 256, 4, 1e-4, 0
DISTILL_DTYPE = "auto"  # bfloat16 autocast where the CPU/GPU computes it natively; resolved alike for both
EVAL_SEQ_LEN = 512


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def n_params(model: Any) -> int:
    # parameters() yields a tied tensor once, as the safetensors file stores it
    return sum(p.numel() for p in model.parameters())


def shape_of(model: Any) -> dict[str, int]:
    attn = model.model.layers[0].self_attn
    return {"layers": len(model.model.layers), "hidden": model.model.embed_tokens.embedding_dim,
            "heads": attn.q_proj.out_features // attn.head_dim, "kv_heads": attn.k_proj.out_features // attn.head_dim,
            "head_dim": attn.head_dim, "ffn": model.model.layers[0].mlp.gate_proj.out_features}


# --------------------------------------------------------------------------------------------- Torch-Pruning


def tp_prune(model: Any, example_ids: torch.Tensor, ratio: float) -> Any:
    """Prune ``model`` in place with Torch-Pruning's LLM recipe at ``ratio``; returns the model, ready to run.

    Adaptations to transformers 5 (none changes what gets pruned or how it is ranked):
    - the example input passes ``use_cache=False``: otherwise the KV cache's ``torch.cat`` along the sequence
      is traced as a channel concatenation and Torch-Pruning's dependency walk never ends (the hang reported
      in VainF/Torch-Pruning#527);
    - the model is traced with eager attention: transformers 5's SDPA path hands the smaller K/V straight to
      SDPA (``enable_gqa``), which the tracer takes for an elementwise op joining 192 query channels to 64
      key channels (``shape '[6, -1]' is invalid``); eager attention expands K/V with ``repeat_kv``, which it
      maps per head. SDPA is switched back on for evaluation and training;
    - the tied lm_head / embedding: Torch-Pruning slices both views of the one tensor into two separate
      parameters with identical values, so they are tied again (the model keeps one copy, as the original);
    - the attributes transformers 5 reads at run time are updated (the example's ``num_heads`` and
      ``hidden_size`` module attributes no longer exist: attention reshapes with ``-1`` heads).
    """
    import torch_pruning as tp

    cfg = model.config
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    model.set_attn_implementation("eager")
    for p in model.parameters():  # the tracer follows autograd: the weights must require grad
        p.requires_grad_(True)
    num_heads: dict[Any, int] = {}
    for layer in model.model.layers:
        a = layer.self_attn
        num_heads.update({a.q_proj: cfg.num_attention_heads, a.k_proj: cfg.num_key_value_heads,
                          a.v_proj: cfg.num_key_value_heads})
    with warnings.catch_warnings():
        # "Unwrapped parameters detected": the RMSNorm weights, pruned along their only dimension, as wanted
        warnings.filterwarnings("ignore", message="Unwrapped parameters")
        pruner = tp.pruner.BasePruner(
            model,
            example_inputs={"input_ids": example_ids, "use_cache": False},
            importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False,
            output_transform=lambda out: out.logits,
            pruning_ratio=ratio,
            ignored_layers=[model.lm_head],
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,  # whole heads only: RoPE needs head_dim intact
            head_pruning_ratio=ratio,
            round_to=4,
        )
        for group in pruner.step(interactive=True):
            group.prune()
    del pruner
    if tied:
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        if head is not emb:
            if head.shape != emb.shape or not torch.equal(head, emb):
                raise RuntimeError("Torch-Pruning pruned the tied embedding and lm_head differently")
            model.lm_head.weight = emb
    heads = model.model.layers[0].self_attn.q_proj.out_features // model.model.layers[0].self_attn.head_dim
    kv_heads = model.model.layers[0].self_attn.k_proj.out_features // model.model.layers[0].self_attn.head_dim
    for layer in model.model.layers:
        a = layer.self_attn
        if a.q_proj.out_features // a.head_dim != heads or a.k_proj.out_features // a.head_dim != kv_heads:
            raise RuntimeError("Torch-Pruning left layers with different head counts")
        a.num_key_value_groups = heads // kv_heads  # read by repeat_kv / SDPA's enable_gqa
    cfg.hidden_size = model.lm_head.in_features
    cfg.num_attention_heads, cfg.num_key_value_heads = heads, kv_heads
    cfg.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    model.set_attn_implementation("sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def tp_params_at(config: Any, example_ids: torch.Tensor, ratio: float) -> tuple[int, dict[str, int]]:
    """Parameters and shape Torch-Pruning produces at ``ratio``, from a one-layer random copy of the
    architecture: with local pruning at one ratio every layer gets the same shape, and the shape does not
    depend on the weights' values, so the full count is the one-layer count plus (layers - 1) layers."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    layers = cfg.num_hidden_layers
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    proxy = tp_prune(AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"), example_ids, ratio)
    per_layer = sum(p.numel() for p in proxy.model.layers[0].parameters())
    return n_params(proxy) + (layers - 1) * per_layer, {**shape_of(proxy), "layers": layers}


def match_ratio(config: Any, example_ids: torch.Tensor, target: int, iters: int) -> tuple[float, int, dict]:
    """Bisect the pruning ratio for the parameter count closest to ``target`` (the count falls as the ratio
    rises, in steps of round_to channels)."""
    lo, hi = 0.0, 0.9
    best: tuple[float, int, dict] | None = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        count, shape = tp_params_at(config, example_ids, mid)
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (mid, count, shape)
        if count > target:
            lo = mid
        else:
            hi = mid
    assert best is not None
    if abs(best[1] - target) > 0.01 * target:
        # the count is not strictly monotone in the ratio (head pruning is rounded per KV group): scan instead
        for k in range(1, 100):
            count, shape = tp_params_at(config, example_ids, k / 200)
            if abs(count - target) < abs(best[1] - target):
                best = (k / 200, count, shape)
    return best


# -------------------------------------------------------------------------------------------------- main


def fmt(ppl: float, orig: float) -> str:
    return f"{ppl:.2f} ({ppl / orig:.2f}x)"


def shape_text(s: dict[str, int]) -> str:
    return (f"{s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads / {s['kv_heads']} KV heads "
            f"x {s['head_dim']}, FFN {s['ffn']}")


def smoke_model(tmp: Path) -> Path:
    """A tiny random Llama (tied embeddings, 6 query heads over 2 KV heads, like SmolLM2's 9 over 3)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_tiny_model, make_tokenizer

    return make_tiny_model("llama", tmp / "tiny", make_tokenizer(tmp / "tok"), layers=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.75, help="fraction of the parameters to keep")
    ap.add_argument("--distill-steps", type=int, default=100, help="recovery budget, the same for both")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--bisect-iters", type=int, default=14)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, tiny budget; docs untouched")
    args = ap.parse_args()
    if args.smoke:
        args.distill_steps, args.eval_tokens, args.bisect_iters = 4, 1024, 10
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        name = "a tiny random Llama (smoke test)" if args.smoke else "SmolLM2-135M-Instruct"
        if args.smoke:
            src = smoke_model(tmp)
        else:
            from serve_pruned.compress.example_model import materialize

            src = materialize(tmp / "smol")

        # ---- ours: the packaging pipeline, one shot, recovery on
        log(f"ours: serve-pruned package --target-params {args.target} --distill-steps {args.distill_steps}")
        t = time.perf_counter()
        opts = PackageOptions(
            model=str(src), out=tmp / "ours", quant="none", target_params=args.target, schedule="one-shot",
            calib=CALIB, eval_text=(HELD_OUT,), eval_ood_text=(OUT_OF_DOMAIN,), eval_max_tokens=args.eval_tokens,
            eval_seq_len=EVAL_SEQ_LEN, distill_steps=args.distill_steps, distill_seq_len=DISTILL_SEQ_LEN,
            distill_batch_size=DISTILL_BATCH, distill_samples=DISTILL_SAMPLES, distill_lr=DISTILL_LR,
            distill_dtype=DISTILL_DTYPE, seed=SEED,
            **({"num_samples": 16, "seq_len": 128} if args.smoke else {}))
        m = package(opts, progress=False, log=log).manifest.to_dict()
        ours_s = time.perf_counter() - t
        q = m["quality"]
        d_ours = m["recovery"]["steps"][-1].get("distill", {})
        ours_kl = (d_ours.get("loss_first", float("nan")), d_ours.get("loss_last", float("nan")))
        target_params = int(m["params_after"])
        sa = m["shape_after"]
        hidden = json.loads((src / "config.json").read_text())["hidden_size"]  # never pruned by ours
        ours_shape = {"layers": sa["num_layers"], "hidden": hidden,
                      "heads": sa["num_heads"], "kv_heads": sa["num_kv_heads"], "head_dim": sa["head_dim"],
                      "ffn": sa["intermediate_size"]}

        # ---- the same text for the peer
        tok = load_tokenizer(src, trust_remote_code=False)
        original = load_model(src, dtype="float32", trust_remote_code=False)
        calib = read_sources(list(CALIB))
        texts = {"held": eval_tokens(tok, read_sources([HELD_OUT]), max_tokens=args.eval_tokens),
                 "ood": eval_tokens(tok, read_sources([OUT_OF_DOMAIN]), max_tokens=args.eval_tokens)}

        def ppl(model: Any) -> dict[str, float]:
            return {k: evaluate(model, ids, seq_len=EVAL_SEQ_LEN).perplexity for k, ids in texts.items()}

        rows: dict[str, dict[str, Any]] = {}
        orig = ppl(original)
        # same model, same tokens, same windows as package's own "original" stage: a check on the harness
        orig_manifest = {"held": q["original"]["perplexity"], "ood": q["original"]["out_of_domain"]["perplexity"]}
        if any(abs(orig[k] - orig_manifest[k]) > 1e-3 * orig[k] for k in orig):
            raise SystemExit(f"harness mismatch: original perplexity {orig} here, {orig_manifest} in package()")
        rows["original"] = {"params": int(m["params_before"]), **orig}
        rows["serve-pruned, pruned only"] = {"params": target_params, "held": q["pruned"]["perplexity"],
                                             "ood": q["pruned"]["out_of_domain"]["perplexity"]}
        rows["serve-pruned, pruned + recovery (refit + distillation)"] = {
            "params": target_params, "held": q["recovered"]["perplexity"],
            "ood": q["recovered"]["out_of_domain"]["perplexity"]}

        # ---- Torch-Pruning at the same parameter count
        tp_version = importlib.metadata.version("torch-pruning")
        example = torch.tensor([tok.encode("Hello world.")], dtype=torch.long)  # the example's tracing input
        peer: dict[str, Any] = {}
        try:
            t = time.perf_counter()
            ratio, predicted, _ = match_ratio(original.config, example, target_params, args.bisect_iters)
            peer["bisect_s"] = time.perf_counter() - t
            log(f"torch-pruning: ratio {ratio:.4f} -> {predicted:,} parameters (ours {target_params:,})")
            t = time.perf_counter()
            student = tp_prune(copy.deepcopy(original), example, ratio)
            peer["prune_s"] = time.perf_counter() - t
            peer.update(ratio=ratio, params=n_params(student), shape=shape_of(student))
            if peer["params"] != predicted:  # the table uses the real count; say the estimate was off
                peer["note"] = (f"the one-layer estimate said {predicted:,} parameters, the pruned model has "
                                f"{peer['params']:,}")
                log(f"torch-pruning: {peer['note']}")
            rows["Torch-Pruning, pruned only"] = {"params": peer["params"], **ppl(student)}
            dsamples = calibration_samples(tok, calib, num_samples=DISTILL_SAMPLES, seq_len=DISTILL_SEQ_LEN,
                                           seed=SEED + 1)  # package(): seed + 1
            # train_embeddings=True as the section was measured (DistillSettings' default was True until its
            # defaults came from PackageOptions, whose default freezes them)
            settings = DistillSettings(steps=args.distill_steps, lr=DISTILL_LR, batch_size=DISTILL_BATCH,
                                       warmup_steps=max(1, min(10, args.distill_steps // 10)), dtype=DISTILL_DTYPE,
                                       seed=SEED, train_embeddings=True)
            t = time.perf_counter()
            d = distill(student, original, dsamples, settings=settings)
            peer["distill_s"] = time.perf_counter() - t
            peer["distill"] = d
            log(f"torch-pruning: distilled {d['steps']} steps, KL {d['loss_first']:.3f} -> {d['loss_last']:.3f}")
            rows["Torch-Pruning + the same distillation"] = {"params": peer["params"], **ppl(student)}
        except Exception as exc:  # the section must say what failed, never show made-up numbers
            peer["error"] = f"{type(exc).__name__}: {exc}"
            log(f"torch-pruning failed: {peer['error']}")
    wall = time.perf_counter() - t_all
    # other work on the machine stretches the timings (not the perplexities): say so when it happened
    load = os.getloadavg()[1]  # 5-minute average, as of the end of the run
    busy = (f" The machine was shared: 5-minute load average {load:.1f} on {os.cpu_count()} cores at the end, "
            "so these timings overstate the cost.") if load > 1.25 * (os.cpu_count() or 1) else ""

    # ---- report
    o = rows["original"]
    ours_rec = rows["serve-pruned, pruned + recovery (refit + distillation)"]
    tokens = args.distill_steps * DISTILL_BATCH * DISTILL_SEQ_LEN
    timings = m["timings_s"]
    lines = [
        "## Peer comparison: Torch-Pruning vs serve-pruned at the same parameter count", "",
        f"{name}, float32, pruned to {args.target} of its parameters by each method; recovery "
        f"budget for both: {args.distill_steps} steps x {DISTILL_BATCH} sequences x {DISTILL_SEQ_LEN} tokens = "
        f"{tokens:,} tokens of logit distillation from the original (AdamW, lr {DISTILL_LR:g}, same "
        f"{DISTILL_SAMPLES} windows of the Python HOWTOs + FAQ, same batch order, "
        f"{'bfloat16 autocast' if d_ours.get('bfloat16_autocast') else 'float32'} forward passes). Perplexity on "
        f"the first {args.eval_tokens} tokens of the Python tutorial (held out) and of GPL-3 (out of domain), "
        f"windows of {EVAL_SEQ_LEN}, the same `evaluate` for every row.", "",
        "| method | params | ppl held out (x orig) | ppl out of domain (x orig) |", "|---|---|---|---|"]
    # "pruned only" for serve-pruned is package()'s `pruned` stage: evaluated right after pruning, before the
    # refit; with one-shot pruning it is the very model `recover=False` writes (same scores, same shape)
    for name, r in rows.items():
        lines.append(f"| {name} | {r['params']:,} | {fmt(r['held'], o['held'])} | {fmt(r['ood'], o['ood'])} |")
    if "error" in peer:
        lines.append("| Torch-Pruning | – | failed | failed |")
    lines.append("")
    peer_rec = rows.get("Torch-Pruning + the same distillation")
    if peer_rec is not None:
        rh, ro = peer_rec["held"] / ours_rec["held"], peer_rec["ood"] / ours_rec["ood"]
        verdict = ("lower" if rh > 1 and ro > 1 else "higher" if rh < 1 and ro < 1 else "mixed")
        if verdict == "lower":
            s = (f"**serve-pruned is better at the same size and budget**: after recovery its perplexity is "
                 f"{rh:.2f}x lower held out and {ro:.2f}x lower out of domain than Torch-Pruning's")
        elif verdict == "higher":
            s = (f"**Torch-Pruning is better at the same size and budget**: after recovery its perplexity is "
                 f"{1 / rh:.2f}x lower held out and {1 / ro:.2f}x lower out of domain than serve-pruned's")
        else:
            s = (f"**Neither is better on both texts**: Torch-Pruning's recovered perplexity is {rh:.2f}x ours "
                 f"held out and {ro:.2f}x ours out of domain")
        pp, op = rows["Torch-Pruning, pruned only"], rows["serve-pruned, pruned only"]
        s += (f". Pruned only, before any recovery, Torch-Pruning's perplexity is {pp['held'] / op['held']:.2f}x "
              f"ours held out and {pp['ood'] / op['ood']:.2f}x out of domain.")
        lines.append(s)
        lines += ["", f"Shapes. serve-pruned: {shape_text(ours_shape)} ({target_params:,} parameters). "
                  f"Torch-Pruning at ratio {peer['ratio']:.4f} (hidden size, FFN and query heads): "
                  f"{shape_text(peer['shape'])} ({peer['params']:,} parameters, "
                  f"{100 * (peer['params'] / target_params - 1):+.2f}% vs ours)"
                  + (f"; note: {peer['note']}." if "note" in peer else "."),
                  "", f"Distillation loss (KL, mean of the first / last 10 steps): serve-pruned (after its refit) "
                  f"{ours_kl[0]:.3f} -> {ours_kl[1]:.3f}; Torch-Pruning {peer['distill']['loss_first']:.3f} -> "
                  f"{peer['distill']['loss_last']:.3f}."]
    else:
        lines.append(f"**Torch-Pruning {tp_version} could not be run here**: `{peer['error']}`. Only serve-pruned's "
                     "rows are measured.")
    lines += [
        "", "Method notes. Torch-Pruning follows its examples/LLMs/prune_llm.py: `GroupMagnitudeImportance(p=2, "
        "group_reduction='mean')` (the example's importance; `GroupNormImportance` in older releases; "
        "data-free, weights only), local pruning, one ratio for the hidden size, MLP width and query heads, whole "
        "heads only (`prune_head_dims=False`), KV heads kept (its GQA rule), `round_to=4`, lm_head ignored; the "
        "ratio is bisected for the parameter count nearest ours. serve-pruned's pruned-only row is its one-shot "
        "pruning evaluated before any recovery (the model `--no-recover` writes). serve-pruned scores channels "
        "and heads on calibration activations (Python HOWTOs + FAQ), keeps the hidden size, and its recovery adds a "
        "closed-form least-squares refit of o_proj/down_proj before the distillation: the refit is part of "
        "our method, not of the shared budget (it costs no distillation steps; "
        f"{timings.get('refit_s', 0):.0f} s here). It is not applied to Torch-Pruning's model, whose pruned "
        "hidden size leaves no per-layer output to refit against.",
        "", f"Adapting Torch-Pruning {tp_version} to transformers {importlib.metadata.version('transformers')} "
        "(nothing here changes what it prunes): trace with `use_cache=False` (else the KV cache's concatenation "
        "sends its dependency walk into an endless loop, as in VainF/Torch-Pruning#527) and with eager "
        "attention (transformers 5's SDPA path passes grouped K/V to SDPA directly, which its tracer cannot "
        "map per head); SDPA is restored afterwards; the tied lm_head/embedding, which it slices into two equal "
        "copies, is tied again; `num_key_value_groups` and the config are updated (the example's module "
        "attributes no longer exist).",
        "", f"Timings (s): serve-pruned package (load, score, shape search, prune, refit, distill, evaluate "
        f"3 stages, write) {ours_s:.0f} [" + ", ".join(f"{k.removesuffix('_s')} {v:.0f}" for k, v in
                                                    timings.items()) + "]"
        + (f"; Torch-Pruning ratio search {peer['bisect_s']:.0f}, prune {peer['prune_s']:.0f}, distill "
           f"{peer['distill_s']:.0f}" if "distill_s" in peer else "")
        + f"; whole benchmark {wall / 60:.1f} min." + busy,
    ]
    text = "\n".join(lines)
    print(text)
    if not args.smoke:
        write_section("torch-pruning", text, bench_command())


if __name__ == "__main__":
    main()
