"""Where a distillation step's time goes, and what the fused KL loss saves: SmolLM2-135M-Instruct as the
teacher, a student of its 0.75 shape at --multiple-of 64 (FFN 1536 -> 832), one AdamW step on 4 x 256 tokens, the way
`serve-pruned package` trains (bfloat16 autocast where native, frozen embedding).

Variants run round-robin in one process (these machines are noisy): the plain KL formula left to autograd,
as serve-pruned computed it up to this change, against the fused loss it uses now (`kd_loss`: gradient
computed in the forward pass, a block of rows at a time), each with SDPA and with eager attention.
The student's weights are random: a step's time depends on shapes, not values.

    .venv/bin/python bench/distill_speed.py [--rounds 6] [--ffn 832]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _report import publish  # noqa: E402

from serve_pruned.compress.distill import kd_loss, native_bf16  # noqa: E402
from serve_pruned.compress.example_model import materialize  # noqa: E402
from serve_pruned.compress.model_io import load_model  # noqa: E402


def plain_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at T=1 as plain tensor code, differentiated by autograd."""
    s = torch.log_softmax(student_logits.float(), dim=-1)
    p = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (p.exp() * (p - s)).sum(-1).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--ffn", type=int, default=832, help="the student's FFN width")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        src = materialize(Path(tmp) / "smol")
        teacher = load_model(src, dtype="float32", trust_remote_code=False)
    config = teacher.config.__class__.from_dict({**teacher.config.to_dict(), "intermediate_size": args.ffn})
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    for n, p in student.named_parameters():
        p.requires_grad_("embed_tokens" not in n and "lm_head" not in n)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.95))
    autocast = native_bf16("cpu")
    x = torch.randint(0, config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
    losses = {"plain": plain_kd, "fused": lambda s, t: kd_loss(s, t, 1.0)}

    def step(loss_name: str, attn: str) -> dict[str, float]:
        for m in (teacher, student):
            m.config._attn_implementation = attn
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                t_logits = teacher(input_ids=x, use_cache=False).logits
            t1 = time.perf_counter()
            s_logits = student(input_ids=x, use_cache=False).logits
        t2 = time.perf_counter()
        loss = losses[loss_name](s_logits, t_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t4 = time.perf_counter()
        return {"teacher": t1 - t0, "student": t2 - t1, "loss+backward": t3 - t2, "optimizer": t4 - t3,
                "step": t4 - t0}

    variants = [(loss, attn) for loss in ("plain", "fused") for attn in ("sdpa", "eager")]
    times: dict[tuple[str, str], list[dict[str, float]]] = {v: [] for v in variants}
    for r in range(args.rounds + 2):
        for v in variants:
            t = step(*v)
            if r >= 2:
                times[v].append(t)
        print(f"round {r}", file=sys.stderr, flush=True)
    tokens = x.numel()
    base = statistics.median(t["step"] for t in times[variants[0]])
    parts = ["teacher", "student", "loss+backward", "optimizer"]
    lines = ["## Distillation step: where the time goes, plain vs fused KL loss, SDPA vs eager attention", "",
             f"SmolLM2-135M-Instruct teacher, student with FFN {args.ffn} (832: its 0.75 shape at --multiple-of 64), "
             "one AdamW step on "
             f"{x.shape[0]} x {x.shape[1]} tokens, bfloat16 autocast {'on' if autocast else 'off'}, frozen "
             f"embedding; median of {args.rounds} rounds, variants interleaved round by round. 'loss+backward' "
             "is the KL loss and the whole backward pass (the fused loss computes its gradient in the forward).",
             "", "| KL loss | attention | step (s) | tokens/s | vs plain + SDPA | "
             + " | ".join(f"{p} (s)" for p in parts) + " |", "|---|---|---|---|---|" + "---|" * len(parts)]
    for v in variants:
        med = {k: statistics.median(t[k] for t in times[v]) for k in ["step", *parts]}
        lines.append(f"| {v[0]} | {v[1]} | {med['step']:.2f} | {tokens / med['step']:.0f} | "
                     f"{base / med['step']:.2f}x | " + " | ".join(f"{med[p]:.2f}" for p in parts) + " |")
    publish("distill-speed", lines)


if __name__ == "__main__":
    main()
