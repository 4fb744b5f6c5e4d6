"""Optimizers and schedules: the lr against torch's schedulers and closed forms, warmup, exact resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from pydantic import TypeAdapter

from segjob.errors import UserError
from segjob.job.load import load_job
from segjob.job.schema import OptimConfig, ScheduleConfig
from segjob.learning.optim import Schedule, build_optimizer, current_lr

as_schedule = TypeAdapter(ScheduleConfig).validate_python


def optimizer(lr: float = 0.1, name: str = "sgd") -> torch.optim.Optimizer:
    return build_optimizer(OptimConfig(name=name, lr=lr), [torch.nn.Parameter(torch.zeros(2))])


def schedule(cfg: dict, total_steps: int = 20, lr: float = 0.1) -> Schedule:
    return Schedule(as_schedule(cfg), optimizer(lr), total_steps)


def test_optimizers_get_their_settings():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1), requires_grad=False)]
    sgd = build_optimizer(OptimConfig(name="sgd", lr=0.01, momentum=0.8, nesterov=True, weight_decay=1e-4), params)
    assert isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups[0]["params"]) == 1  # frozen ones left out
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.01, 0.8, True, 1e-4)
    adamw = build_optimizer(OptimConfig(name="adamw", betas=(0.8, 0.99), weight_decay=0.05), params)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.99)
    assert isinstance(build_optimizer(OptimConfig(name="adam"), params), torch.optim.Adam)


def test_optimizer_settings_that_cannot_work_are_config_errors(tmp_path):
    path = tmp_path / "job.yaml"
    for body, expected in [
        ("optim: {name: adam, nesterov: true}", "nesterov needs name: sgd and momentum > 0"),
        ("optim: {name: sgd, momentum: 0, nesterov: true}", "nesterov needs name: sgd and momentum > 0"),
        ("optim: {betas: [0.9, 1.5]}", "optim.betas: each beta must be in [0, 1)"),
        ("optim: {schedule: {name: step, power: 0.9}}", "optim.schedule.power: unknown key"),
        ("optim: {schedule: {name: cosinus}}", "optim.schedule.name: unknown name 'cosinus' (did you mean 'cosine'?)"),
        ("optim: {schedule: {name: plateau, plateau_metric: val/mIoU}}",
         "optim.schedule.plateau_metric: must be one of"),
    ]:
        path.write_text(body + "\n")
        with pytest.raises(UserError) as caught:
            load_job(path)
        assert expected in str(caught.value), body


def test_modes_follow_the_metric_unless_given():
    assert as_schedule({"name": "plateau"}).plateau_mode == "min"  # val/loss
    assert as_schedule({"name": "plateau", "plateau_metric": "val/miou"}).plateau_mode == "max"
    assert as_schedule({"name": "plateau", "plateau_metric": "val/miou", "plateau_mode": "min"}).plateau_mode == "min"
    from segjob.job.schema import MetricConfig

    assert MetricConfig(name="val/loss").mode == "min" and MetricConfig().mode == "max"
    assert MetricConfig(name="val/dice/pet").mode == "max"


def lrs_by_step(sched: Schedule, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(current_lr(sched.optimizer))
        sched.after_step()
    return seen


def torch_lrs(make, steps: int, lr: float = 0.1) -> list[float]:
    opt = optimizer(lr)
    scheduler = make(opt)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return seen


def test_constant_stays():
    assert lrs_by_step(schedule({"name": "constant"}), 5) == [0.1] * 5


def test_poly_matches_torch_polynomial_lr():
    ours = lrs_by_step(schedule({"name": "poly", "power": 0.9}, total_steps=20), 25)
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=20, power=0.9), 25)
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours[20:] == [0.0] * 5


def test_cosine_matches_the_closed_form():
    ours = lrs_by_step(schedule({"name": "cosine", "min_lr": 0.01}, total_steps=10), 12)
    expected = [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * min(t, 10) / 10)) for t in range(12)]
    assert ours == pytest.approx(expected)
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.01), 11)
    assert ours[:11] == pytest.approx(theirs)


def test_step_matches_torch_step_lr_per_epoch():
    sched = schedule({"name": "step", "step_epochs": 7, "gamma": 0.7})
    opt = optimizer()
    reference = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)
    for _ in range(20):
        sched.after_step()  # steps move nothing
        assert current_lr(sched.optimizer) == pytest.approx(opt.param_groups[0]["lr"])
        sched.after_epoch()
        opt.step()
        reference.step()
    assert current_lr(sched.optimizer) == pytest.approx(0.1 * 0.7 ** 2)


@pytest.mark.parametrize("mode,values", [
    ("min", [1.0, 0.9, 0.95, 0.9, 0.91, 0.85, 0.86, 0.87, 0.88, 0.899999, 0.84, 0.9, 0.9, 0.9, 0.9]),
    ("max", [0.1, 0.2, 0.2, 0.2, 0.20001, 0.3, 0.29, float("nan"), 0.28, 0.4, 0.4, 0.4, 0.4]),
])
def test_plateau_matches_torch_reduce_on_plateau(mode, values):
    metric = "val/loss" if mode == "min" else "val/miou"
    sched = schedule({"name": "plateau", "plateau_metric": metric, "plateau_patience": 2, "plateau_factor": 0.5})
    opt = optimizer()
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=0.5, patience=2)
    for value in values:
        sched.after_eval({metric: value, "val/other": 0.0})
        reference.step(value)
        assert current_lr(sched.optimizer) == pytest.approx(opt.param_groups[0]["lr"]), value
    assert sched.reductions >= 2


def test_plateau_respects_min_lr_and_names_a_missing_metric():
    sched = schedule({"name": "plateau", "plateau_patience": 0, "plateau_factor": 0.1, "min_lr": 0.002})
    for _ in range(5):
        sched.after_eval({"val/loss": 1.0})
    assert current_lr(sched.optimizer) == pytest.approx(0.002)
    with pytest.raises(UserError, match=r"plateau_metric: 'val/loss' is not reported; choose one of val/miou"):
        sched.after_eval({"val/miou": 0.5, "train/loss": 1.0})


def test_linear_warmup_then_poly_over_the_remaining_steps():
    sched = schedule({"name": "poly", "power": 1.0, "warmup_steps": 4, "warmup_start_factor": 0.2}, total_steps=14)
    seen = lrs_by_step(sched, 15)
    assert seen[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])  # 0.2 -> 1 over 4 steps
    assert seen[4:] == pytest.approx([0.1 * (1 - t / 10) for t in range(11)])  # poly over steps 4..14


@pytest.mark.parametrize("name", ["constant", "step", "plateau", "cosine"])
def test_warmup_multiplies_every_schedule(name):
    sched = schedule({"name": name, "warmup_steps": 10, "warmup_start_factor": 0.1}, total_steps=1000)
    assert current_lr(sched.optimizer) == pytest.approx(0.01)
    lrs_by_step(sched, 5)
    assert current_lr(sched.optimizer) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5), rel=1e-3)


def drive(sched: Schedule, events: str) -> list[float]:
    """s = optimizer step, e = epoch end, v/w = evaluation with a good/bad metric; the lr after each."""
    seen = []
    value = 1.0
    for event in events:
        if event == "s":
            sched.after_step()
        elif event == "e":
            sched.after_epoch()
        else:
            value = value * 0.5 if event == "v" else value
            sched.after_eval({"val/loss": value})
        seen.append(current_lr(sched.optimizer))
    return seen


@pytest.mark.parametrize("cfg", [
    {"name": "poly", "warmup_steps": 3},
    {"name": "cosine", "min_lr": 0.001, "warmup_steps": 2},
    {"name": "step", "step_epochs": 2, "gamma": 0.5, "warmup_steps": 5},
    {"name": "plateau", "plateau_patience": 1, "warmup_steps": 2},
    {"name": "constant", "warmup_steps": 6},
], ids=lambda cfg: cfg["name"])
def test_resume_continues_exactly(cfg):
    before, after = "ssvsseswsswsse", "sswweswwsssesw"
    uninterrupted = schedule(cfg, total_steps=20)
    expected = drive(uninterrupted, before + after)

    interrupted = schedule(cfg, total_steps=20)
    drive(interrupted, before)
    buffer = io.BytesIO()
    torch.save({"schedule": interrupted.state_dict(), "optimizer": interrupted.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # what a checkpoint's state.pt allows

    resumed = schedule(cfg, total_steps=20)  # as the engine does: build, then load optimizer, then schedule
    resumed.optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["schedule"])
    assert current_lr(resumed.optimizer) == current_lr(interrupted.optimizer)
    assert drive(resumed, after) == expected[len(before):]


def test_a_schedule_state_of_another_kind_is_refused():
    state = schedule({"name": "poly"}).state_dict()
    with pytest.raises(UserError, match="trained with 'poly', not 'cosine'"):
        schedule({"name": "cosine"}).load_state_dict(state)


def test_a_schedule_state_segjob_did_not_write_is_one_line():
    with pytest.raises(UserError, match=r"^optim.schedule: the checkpoint's schedule state has no steps, epochs"):
        schedule({"name": "poly"}).load_state_dict({"last_epoch": 7, "_last_lr": [0.001]})
