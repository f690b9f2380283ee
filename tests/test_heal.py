"""``heal``: a compressed model distilled towards the original on calibration data."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from models import decoder_config, token_batches
from torch import nn

import pcasurgery as ps

transformers = pytest.importorskip("transformers")


def _compressed_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**decoder_config(num_hidden_layers=2))
    teacher = transformers.LlamaForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = ps.pca_wrap(teacher, include="model.layers.*")
    ps.calibrate(wrapped, token_batches(96), progress=False)
    ps.apply_plan(wrapped, ps.budget_plan(wrapped, remove=0.4))
    return teacher, ps.compress(wrapped)


def _kl(student, teacher, batches) -> float:
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            s = student(**batch, use_cache=False).logits.log_softmax(-1)
            t = teacher(**batch, use_cache=False).logits.log_softmax(-1)
            total += float((t.exp() * (t - s)).sum(-1).mean())
    return total / len(batches)


def test_healing_brings_the_student_closer_and_trains_only_what_it_is_told():
    teacher, student = _compressed_llama()
    teacher_state = copy.deepcopy(teacher.state_dict())
    frozen = {
        n: p.detach().clone()
        for n, p in student.named_parameters()
        if not n.startswith("model.layers.")
    }
    held = token_batches(96, count=2, batch=4, length=24)[1:]
    before = _kl(student, teacher, held)
    result = ps.heal(student, teacher, token_batches(96), steps=40, lr=3e-3, warmup=5,
                     train="model.layers.*", progress=False)  # fmt: skip
    after = _kl(student, teacher, held)
    assert after < 0.8 * before, (before, after)
    assert result["steps"] == 40 and result["last_loss"] < result["first_loss"]
    assert not student.training and not teacher.training
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in student.parameters())  # put back as they were


def test_hidden_states_of_an_encoder_and_a_loss_of_ones_own():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    data = [torch.randn(64, 8) for _ in range(4)]
    wrapped = ps.calibrate(ps.pca_wrap(teacher, 0.6), data, progress=False)
    student = ps.compress(wrapped)
    x = torch.randn(256, 8)

    def error():
        with torch.no_grad():
            return float(((student(x) - teacher(x)) ** 2).mean())

    before = error()
    ps.heal(student, teacher, data, steps=100, lr=1e-2, warmup=5, target="hidden", progress=False)
    assert error() < 0.8 * before  # a rank-limited student: the error has a floor
    mse = lambda s, t, batch: ((s - t) ** 2).mean()  # noqa: E731
    again = error()
    ps.heal(student, teacher, data, steps=30, lr=1e-2, warmup=5, target=mse, progress=False)
    assert error() < again


@pytest.mark.parametrize("training", [False, True])
def test_the_student_heals_as_it_will_be_used_unless_training_is_asked(training):
    """By default the student runs in eval mode (its dropout off: each step matches the
    teacher's exact function); ``training=True`` runs it as in pretraining. Either way it
    ends in eval mode."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    data = [torch.randn(64, 8) for _ in range(4)]
    small = ps.compress(ps.calibrate(ps.pca_wrap(teacher, 0.6), data, progress=False))
    student = nn.Sequential(small, nn.Dropout(0.5))
    seen = []
    student.register_forward_hook(lambda module, args, out: seen.append(module.training))
    ps.heal(student, teacher, data, steps=6, lr=1e-3, warmup=1, target="hidden",
            training=training, progress=False)  # fmt: skip
    assert seen == [training] * 6 and not student.training
    with pytest.raises(TypeError, match="training must be True or False"):
        ps.heal(student, teacher, data, steps=1, training="yes")


def test_a_failed_healing_leaves_the_student_as_it_was_and_bad_input_is_named():
    teacher, student = _compressed_llama()
    state = copy.deepcopy(student.state_dict())
    data = token_batches(96)
    calls = []

    def explodes(s, t, batch):
        calls.append(1)
        return s.logits.sum() * (float("nan") if len(calls) > 3 else 1e-6)

    with pytest.raises(ValueError, match="healing loss is .* at step 3"):
        ps.heal(student, teacher, data, steps=10, lr=1e-2, target=explodes, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())
    with pytest.raises(ValueError, match="steps must be"):
        ps.heal(student, teacher, data, steps=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        ps.heal(student, teacher, data, lr=-1.0)
    with pytest.raises(ValueError, match="target must be one of"):
        ps.heal(student, teacher, data, target="kl")
    with pytest.raises(ValueError, match="train='decoder.\\*' names no module"):
        ps.heal(student, teacher, data, train="decoder.*")
    with pytest.raises(ValueError, match="data ran out of batches after 0 steps"):
        ps.heal(student, teacher, [], steps=2)
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        ps.heal(student, "teacher", data)
