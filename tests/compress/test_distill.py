"""Recovery by logit distillation: the student moves toward the teacher, training is resumable from a
checkpoint to the same result, and the teacher is never changed."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from tiny import prune_tiny  # noqa: E402

from serve_pruned.compress.distill import DistillSettings, batch_indices, distill, kd_loss  # noqa: E402
from serve_pruned.compress.steps import step_targets  # noqa: E402


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    assert kd_loss(a, a, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(a, a + torch.randn(2, 5, 11), 2.0).item() > 0


def _kd_reference(student_logits, teacher_logits, t):
    s = torch.log_softmax(student_logits.float() / t, dim=-1)
    p = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    return (p.exp() * (p - s)).sum(-1).mean() * t * t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_value_and_gradient_match_the_plain_formula(dtype, temperature):
    """The fused loss computes its gradient in blocks of rows; 3 x 7 tokens in blocks of 4 rows (4 x 11 logits)
    leave a ragged last block."""
    torch.manual_seed(0)
    s = (3 * torch.randn(3, 7, 11)).to(dtype)
    t = (3 * torch.randn(3, 7, 11)).to(dtype)
    s_fused, s_ref = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    fused = kd_loss(s_fused, t, temperature, block_elements=44)
    ref = _kd_reference(s_ref, t, temperature)
    (2.5 * fused).backward()
    (2.5 * ref).backward()
    assert fused.item() == pytest.approx(ref.item(), rel=1e-5)
    assert s_fused.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(s_fused.grad.float(), s_ref.grad.float(), atol=tol, rtol=1e-2)


def test_batches_are_a_function_of_the_step():
    seen = [batch_indices(10, step=s, batch_size=4, seed=3) for s in range(5)]
    assert seen == [batch_indices(10, step=s, batch_size=4, seed=3) for s in range(5)]
    flat = [i for b in seen for i in b]
    assert sorted(flat[:10]) == list(range(10))  # the first epoch visits every sample once
    assert seen != [batch_indices(10, step=s, batch_size=4, seed=4) for s in range(5)]


@pytest.mark.parametrize(("target", "step", "expected"), [
    (0.75, 0.125, [0.875, 0.75]), (0.75, 0.1, [0.9167, 0.8333, 0.75]), (0.9, 0.125, [0.9]), (0.5, 0.5, [0.5]),
])
def test_step_targets(target, step, expected):
    assert [round(x, 4) for x in step_targets(target, step)] == expected


@pytest.fixture()
def student_teacher(tiny_models, tokenizer_dir, text_files):
    teacher, student, _sel, samples, _tok = prune_tiny(tiny_models["llama"], tokenizer_dir, text_files["calib"],
                                                       ffn=96, seq_len=32)
    # the student shares the tensors pruning kept whole with the teacher: distill() must part them
    return student, teacher, samples


def _kl(student, teacher, samples) -> float:
    with torch.no_grad():
        return kd_loss(student(input_ids=samples).logits, teacher(input_ids=samples).logits, 1.0).item()


def test_distillation_moves_the_student_toward_the_teacher(student_teacher):
    student, teacher, samples = student_teacher
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = _kl(student, teacher, samples)
    report = distill(student, teacher, samples, settings=DistillSettings(steps=20, lr=1e-3, batch_size=4,
                                                                         warmup_steps=2))
    after = _kl(student, teacher, samples)
    assert after < 0.8 * before, (before, after)
    assert report["steps"] == 20 and report["tokens"] == 20 * 4 * 32
    assert all(v.equal(teacher.state_dict()[k]) for k, v in teacher_state.items())  # the teacher is untouched
    assert not any(p.requires_grad for p in student.parameters())


def test_frozen_embeddings_stay_as_the_original_has_them(student_teacher):
    student, teacher, samples = student_teacher
    emb = student.get_input_embeddings().weight.detach().clone()
    down = student.model.layers[0].mlp.down_proj.weight.detach().clone()
    before = _kl(student, teacher, samples)
    distill(student, teacher, samples, settings=DistillSettings(steps=10, lr=1e-3, batch_size=4, warmup_steps=2,
                                                                 train_embeddings=False))
    assert torch.equal(student.get_input_embeddings().weight, emb)
    assert not torch.equal(student.model.layers[0].mlp.down_proj.weight, down)
    assert _kl(student, teacher, samples) < before


def test_interrupted_distillation_resumes_to_the_same_weights(student_teacher, tmp_path):
    import copy

    student, teacher, samples = student_teacher
    settings = DistillSettings(steps=6, lr=1e-3, batch_size=4, warmup_steps=2, checkpoint_every=2)
    straight = copy.deepcopy(student)
    distill(straight, teacher, samples, settings=settings)

    class Interrupt(Exception):
        pass

    class StopAfter:  # a progress bar that raises as Ctrl-C would, after 3 steps
        n = 0

        def update(self, k):
            self.n += k
            if self.n == 3:
                raise Interrupt

        def set_postfix(self, **_kw):
            pass

    resumed = copy.deepcopy(student)
    with pytest.raises(Interrupt):
        distill(resumed, teacher, samples, settings=settings, checkpoint_dir=tmp_path, progress=StopAfter())
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 2  # the last checkpoint kept
    fresh = copy.deepcopy(student)  # a new process: weights as pruned, the checkpoint on disk
    report = distill(fresh, teacher, samples, settings=settings, checkpoint_dir=tmp_path)
    assert report["resumed_from_step"] == 2 and report["steps"] == 6
    for (name, a), (_, b) in zip(straight.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    other = DistillSettings(steps=6, lr=5e-4, batch_size=4, warmup_steps=2, checkpoint_every=2)
    again = copy.deepcopy(student)  # other settings never pick up this checkpoint
    assert distill(again, teacher, samples, settings=other, checkpoint_dir=tmp_path)["resumed_from_step"] is None
