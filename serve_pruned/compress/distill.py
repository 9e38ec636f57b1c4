"""Recovery by knowledge distillation: the pruned model (student) learns the original's (teacher's)
next-token distributions on calibration text.

Loss: KL(teacher || student) on temperature-softened logits (Hinton et al.; Minitron uses logit KD
alone), optionally plus a cosine loss between the two models' final hidden states (a pruned hidden size
compares the student's channels with the same channels of the teacher's, with no projection). AdamW, linear warm-up then
cosine decay. Batches are a pure function of (seed, step), so a run interrupted at step k and resumed
from its checkpoint sees exactly the batches it would have seen.

Checkpoints are safetensors only (student weights, AdamW moments) plus a JSON state file: nothing
pickled is ever loaded back.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from serve_pruned.atomic import atomic_write_text
from serve_pruned.options import PackageOptions


def _option_default(name: str) -> Any:
    return PackageOptions.model_fields[name].default


@dataclass(frozen=True)
class DistillSettings:
    """How much and how to distill.

    Attributes:
        steps: optimizer steps.
        lr: peak learning rate (AdamW).
        batch_size: sequences per step.
        temperature: softmax temperature of the KL term (the loss is scaled by T^2).
        hidden_weight: weight of the final-hidden-state cosine loss (0 = logits only).
        warmup_steps: linear warm-up before the cosine decay.
        weight_decay: AdamW weight decay.
        checkpoint_every: steps between checkpoints (0 = only at the end).
        train_embeddings: whether the (often tied) token embedding / LM head is trained too; frozen, it keeps
            every token's vector as the original has it and each step skips its weight gradient.
        dtype: compute dtype of the forward passes: bfloat16 autocast, float32, or auto (bfloat16 where the
            hardware computes it natively: a CUDA GPU that supports it, a CPU with AMX or AVX512-BF16;
            measured 1.6x faster per step than float32 on a 2-core AMX Xeon).
        seed: batch order.
    """

    # the defaults `package` has are PackageOptions' (written once, there)
    steps: int
    lr: float = _option_default("distill_lr")
    batch_size: int = _option_default("distill_batch_size")
    temperature: float = _option_default("distill_temperature")
    hidden_weight: float = _option_default("distill_hidden_weight")
    warmup_steps: int = 10
    weight_decay: float = 0.0
    checkpoint_every: int = 25
    train_embeddings: bool = _option_default("distill_train_embeddings")
    dtype: str = _option_default("distill_dtype")
    seed: int = _option_default("seed")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (else autocast only adds casts)."""
    if device == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def batch_indices(n_samples: int, *, step: int, batch_size: int, seed: int) -> list[int]:
    """Sample indices of step ``step``: epochs of seeded permutations, so any step is reproducible."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_samples)
        perm = list(range(n_samples))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        take = min(batch_size - len(out), n_samples - offset)
        out.extend(perm[offset : offset + take])
        pos += take
    return out


class _KDLoss(torch.autograd.Function):
    """KL(teacher || student) and its gradient in one pass over the logits, a block of rows at a time.

    The gradient of T^2 * mean KL with respect to the student's logits is (softmax(s/T) - softmax(t/T)) * T / n,
    so it is computed here, while the block's softmaxes are at hand, and backward only scales it. Autograd of
    the plain formula walks the (tokens x vocabulary) tensors about ten times and keeps several alive; on a
    49k vocabulary that was 15% of a distillation step on 2 CPU cores, 3.6x more than this.
    """

    @staticmethod
    def forward(ctx: Any, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                rows: int, with_grad: bool) -> torch.Tensor:
        vocab = student_logits.shape[-1]
        s2 = student_logits.detach().reshape(-1, vocab)
        t2 = teacher_logits.detach().reshape(-1, vocab)
        n = s2.shape[0]
        grad = torch.empty_like(s2) if with_grad else None
        total = torch.zeros((), dtype=torch.float32, device=s2.device)
        for i in range(0, n, rows):
            s, t = s2[i : i + rows].float(), t2[i : i + rows].float()
            if temperature != 1.0:
                s, t = s / temperature, t / temperature
            s_log, t_log = torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
            p = t_log.exp()
            total += (p * (t_log - s_log)).sum()
            if grad is not None:
                grad[i : i + rows] = s_log.exp_().sub_(p).mul_(temperature / n)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.logits_shape = student_logits.shape
        return total * (temperature * temperature / n)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype)).reshape(ctx.logits_shape), None, None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, *,
            block_elements: int = 1 << 21) -> torch.Tensor:
    """Mean per-token KL(teacher || student) at ``temperature``, times T^2 (gradient scale kept).

    Differentiable in ``student_logits`` only (the teacher's are targets). Works through the tokens in blocks
    of about ``block_elements`` logits, so no full-size float32 copy of either tensor is ever made.
    """
    rows = max(1, block_elements // student_logits.shape[-1])
    with_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _KDLoss.apply(student_logits, teacher_logits, float(temperature), rows, with_grad)


def _params(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    # named_parameters() yields a tied embedding once: the checkpoint holds one copy
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _save_checkpoint(folder: Path, model: Any, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    named = _params(model)
    weights = {n: p.detach().contiguous() for n, p in named}
    moments: dict[str, torch.Tensor] = {}
    for n, p in named:
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                moments[f"{key}/{n}"] = st[key].contiguous()
    for name, tensors in (("student.safetensors", weights), ("optimizer.safetensors", moments)):
        tmp = folder / f".{name}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / name)
    # the state file is written last: it is what makes the checkpoint count
    atomic_write_text(folder / "state.json", json.dumps(state, indent=2) + "\n")


def _load_checkpoint(folder: Path, model: Any, opt: torch.optim.Optimizer, settings: DistillSettings,
                     ) -> dict[str, Any] | None:
    from safetensors.torch import load_file

    state_file = folder / "state.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    if state.get("settings") != asdict(settings):
        return None  # another run's checkpoint (different budget or lr): start over
    weights = load_file(str(folder / "student.safetensors"))
    moments = load_file(str(folder / "optimizer.safetensors"))
    named = _params(model)
    if {n for n, _ in named} != set(weights):
        return None
    with torch.no_grad():
        for n, p in named:
            p.copy_(weights[n])
            if f"exp_avg/{n}" in moments:
                opt.state[p] = {"step": torch.tensor(float(state["step"])),
                                "exp_avg": moments[f"exp_avg/{n}"].to(p.device, p.dtype),
                                "exp_avg_sq": moments[f"exp_avg_sq/{n}"].to(p.device, p.dtype)}
    return state


def distill(
    student: Any,
    teacher: Any,
    samples: torch.Tensor,
    *,
    settings: DistillSettings,
    checkpoint_dir: Path | None = None,
    device: str | None = None,
    progress: Any = None,
    time_budget_s: float | None = None,
    hidden_channels: list[int] | None = None,
) -> dict[str, Any]:
    """Train ``student`` in place to match ``teacher`` on ``samples`` (token ids, (n, seq_len)).

    Resumes from ``checkpoint_dir`` when it holds a checkpoint of the same settings. With
    ``time_budget_s`` training stops early (after a checkpoint) once the budget is spent. Both models train on
    ``device`` (default: the accelerator when there is one) and come back to the host after.
    ``hidden_channels``: the teacher's hidden channels the student kept (None: all), for the hidden-state term.

    Returns:
        A summary: steps done, tokens seen, first/last loss (mean of up to 10 steps), seconds,
        and the step it resumed from.
    """
    if settings.steps < 1:
        raise ValueError("distillation needs at least one step")
    own_weights(student, teacher)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    named = _to_training(student, teacher, settings, device)
    channels = torch.tensor(hidden_channels, device=device) if hidden_channels is not None else None
    opt = torch.optim.AdamW([p for _, p in named], lr=settings.lr, betas=(0.9, 0.95),
                            weight_decay=settings.weight_decay)
    start, losses_before = 0, []
    resumed = None
    if checkpoint_dir is not None:
        state = _load_checkpoint(checkpoint_dir, student, opt, settings)
        if state is not None:
            start, resumed, losses_before = int(state["step"]), int(state["step"]), list(state["losses"])
    losses: list[float] = list(losses_before)
    autocast = settings.dtype == "bfloat16" or (settings.dtype == "auto" and native_bf16(torch.device(device).type))
    t0 = time.perf_counter()
    if progress is not None:
        progress.update(start)
    for step in range(start, settings.steps):
        idx = batch_indices(len(samples), step=step, batch_size=settings.batch_size, seed=settings.seed)
        loss = _loss(student, teacher, samples[idx].to(device), settings, device=device, autocast=autocast,
                     channels=channels)
        for group in opt.param_groups:
            group["lr"] = settings.lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        losses.append(round(loss.item(), 5))
        del loss
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}", refresh=False)
        done = step + 1
        out_of_time = time_budget_s is not None and time.perf_counter() - t0 >= time_budget_s
        if checkpoint_dir is not None and (
            done == settings.steps or out_of_time
            or (settings.checkpoint_every and done % settings.checkpoint_every == 0)):
            _save_checkpoint(checkpoint_dir, student, opt,
                             {"step": done, "losses": losses, "settings": asdict(settings)})
        if out_of_time:
            break
    _to_inference(student, teacher)
    steps_done = len(losses)
    head, tail = losses[:10], losses[-10:]
    return {
        "steps": steps_done,
        "steps_planned": settings.steps,
        "tokens": steps_done * settings.batch_size * int(samples.shape[1]),
        "loss_first": round(sum(head) / max(len(head), 1), 5),
        "loss_last": round(sum(tail) / max(len(tail), 1), 5),
        "seconds": round(time.perf_counter() - t0, 2),
        "resumed_from_step": resumed,
        "bfloat16_autocast": autocast,
        "settings": asdict(settings),
    }


def own_weights(model: Any, other: Any) -> None:
    """Give ``model`` its own copy of every tensor it shares with ``other`` (pruning slices without
    copying what it keeps whole), so training one never changes the other. Tied weights stay tied."""
    theirs = {p.data_ptr() for p in other.parameters()}
    for p in model.parameters():
        if p.data_ptr() in theirs:
            p.data = p.data.clone()


def _to_training(student: Any, teacher: Any, settings: DistillSettings, device: str) -> list[tuple[str, Any]]:
    """Both models on ``device``, the teacher frozen, the student trainable (embeddings only if asked)."""
    student.to(device)
    teacher.to(device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    if not settings.train_embeddings:
        for module in (student.get_input_embeddings(), student.get_output_embeddings()):
            if module is not None:
                module.weight.requires_grad_(False)
    return _params(student)


def _to_inference(student: Any, teacher: Any) -> None:
    student.eval()
    student.to("cpu")
    teacher.to("cpu")
    for p in student.parameters():
        p.requires_grad_(False)


def _loss(student: Any, teacher: Any, x: torch.Tensor, settings: DistillSettings, *, device: str,
          autocast: bool, channels: torch.Tensor | None = None) -> torch.Tensor:
    """KL of the student's next-token distribution from the teacher's, plus the optional hidden-state term."""
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            t_out = teacher(input_ids=x, use_cache=False, output_hidden_states=settings.hidden_weight > 0)
        s_out = student(input_ids=x, use_cache=False, output_hidden_states=settings.hidden_weight > 0)
    loss = kd_loss(s_out.logits, t_out.logits, settings.temperature)
    if settings.hidden_weight > 0:
        target = t_out.hidden_states[-1].float()
        if channels is not None:
            target = target.index_select(-1, channels)
        cos = torch.nn.functional.cosine_similarity(s_out.hidden_states[-1].float(), target, dim=-1)
        loss = loss + settings.hidden_weight * (1.0 - cos).mean()
    return loss
