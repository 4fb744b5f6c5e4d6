"""The loop's answer to a preemption notice (no Ray): a checkpoint at once, one more before the
deadline, never a stop; the same decisions on every rank; SyncBatchNorm conversion."""

import logging
import time

import pytest
import torch
from test_engine import final_weights, tiny_job

from segjob.engine import loop
from segjob.engine.preemption.notice import Notice
from segjob.engine.preemption.plan import Agreed, PreemptionPlan
from segjob.engine.session import LocalSession
from segjob.models.batchnorm import sync_batchnorm


def agreed(notice=True, due=False, deadline=None):
    return Agreed(notice=notice, upload_done=False, deadline_due=due, deadline=deadline)


def test_a_notice_checkpoints_now_then_once_before_the_deadline():
    plan = PreemptionPlan(margin_s=1.0)
    assert plan.decide(agreed(notice=False)) is None
    assert plan.decide(agreed(deadline=time.time() + 60)) == "now"
    assert plan.decide(agreed()) is None  # nothing more until the deadline comes near
    assert plan.decide(agreed(due=True)) == "deadline"
    assert plan.decide(agreed(due=True)) is None  # once


def test_the_deadline_checkpoint_leaves_room_for_a_commit_and_a_step():
    plan = PreemptionPlan(margin_s=1.0)
    plan.decide(agreed(deadline=time.time() + 10))
    plan.commit_seconds, plan.step_seconds = 4.0, 1.0
    # due: now >= deadline - (commit 4 + two steps 2 + margin 1): the flag is read a step after it is sent
    assert plan.local_view(None)[1] is False
    plan.deadline = time.time() + 7.5
    assert plan.local_view(None)[1] is False
    plan.deadline = time.time() + 6.5
    assert plan.local_view(None)[1] is True


def test_the_earliest_deadline_wins_and_rays_notice_stays_between_asks():
    plan = PreemptionPlan(margin_s=0.0)
    plan.ray_notice = Notice("ray", "node preemption", deadline=2000.0)
    notice, _, deadline = plan.local_view(Notice("aws", "instance-action", deadline=1000.0))
    assert notice and deadline == 1000.0
    assert plan.local_view(None)[2] == 2000.0
    plan.decide(agreed(deadline=2000.0))
    plan.decide(agreed(deadline=1500.0))
    assert plan.deadline == 1500.0


def test_a_withdrawn_notice_resets_the_plan(caplog):
    plan = PreemptionPlan(margin_s=0.0)
    plan.decide(agreed(deadline=time.time() + 60))
    with caplog.at_level(logging.WARNING, logger="segjob"):
        assert plan.decide(agreed(notice=False)) is None
    assert "withdrawn" in caplog.text and not plan.active
    assert plan.decide(agreed()) == "now"  # a new notice is acted on again


class NoticeAt(LocalSession):
    """A session whose cluster announces a preemption (as Ray's get_preemption_info would) from a given step."""

    def __init__(self, step: int, seconds_to_deadline: float):
        super().__init__("cpu")
        self.step, self.seconds, self.asked = step, seconds_to_deadline, []
        self.notice = None

    def preemption_info(self):
        self.asked.append(len(self.reports))
        if self.notice is None and len(self.asked) >= self.step:
            self.notice = Notice("ray", "node preemption: test", deadline=time.time() + self.seconds)
        return self.notice


def test_the_engine_checkpoints_at_once_and_before_the_deadline_and_finishes(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "RESTART_SLACK_S", 0.2)  # no Ray here to restart the group: go on at once
    reference = tmp_path / "reference"
    loop.run(tiny_job(str(reference)), LocalSession("cpu"))
    uri = str(tmp_path / "preempted")
    job = tiny_job(uri).model_copy(deep=True)
    job.preemption.ray_check_every_steps = 1
    job.preemption.deadline_margin_s = 0.0
    session = NoticeAt(step=2, seconds_to_deadline=0.0)  # due at the very next step
    metrics = loop.run(job, session)
    assert metrics["step"] == 12, "a notice never stops training"
    reasons = [m.get("checkpoint") for m in load_history(uri) if "checkpoint" in m]
    preemption_reasons = [r for r in reasons if r.startswith("preemption")]
    assert preemption_reasons[0] == "preemption (ray: node preemption: test)"
    assert preemption_reasons[1] == "preemption deadline (ray: node preemption: test)"
    assert len(preemption_reasons) == 2
    for name, tensor in final_weights(str(reference)).items():
        assert torch.equal(final_weights(uri)[name], tensor), "checkpoints change nothing in what is trained"


def load_history(uri):
    from segjob.store import checkpoint
    from segjob.store.storage import open_storage

    storage = open_storage(uri)
    return checkpoint.load(storage, checkpoint.latest(storage, storage.path("tiny"))).history


# --- SyncBatchNorm ------------------------------------------------------------------------


def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)))


def test_sync_batchnorm_converts_for_several_gpu_workers_and_keeps_the_state():
    model = bn_model()
    model[1].running_mean.fill_(0.5)  # as loaded from a checkpoint, before the conversion
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    converted = sync_batchnorm(model, "auto", torch.device("cuda", 0), world_size=2)
    kinds = [type(m) for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert kinds == [torch.nn.SyncBatchNorm, torch.nn.SyncBatchNorm]
    assert [id(p) for p in converted.parameters()] == params, "the optimizer's parameters stay the same objects"
    after = converted.state_dict()
    assert after.keys() == before.keys(), "checkpoints keep plain BatchNorm keys"
    assert all(torch.equal(after[k], before[k]) for k in before)
    plain = bn_model()
    plain.load_state_dict(after)  # a checkpoint of a converted model loads into a plain one


@pytest.mark.parametrize("setting, device, world_size", [
    ("auto", "cpu", 2), (True, "cpu", 2), ("auto", "cuda", 1), (False, "cuda", 2),
])
def test_plain_batchnorm_where_sync_cannot_or_need_not_run(setting, device, world_size, caplog):
    model = bn_model()
    with caplog.at_level(logging.INFO, logger="segjob"):
        kept = sync_batchnorm(model, setting, torch.device(device), world_size)
    assert kept is model and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in kept.modules())
    said = "not synchronised across the 2 CPU workers" in caplog.text
    assert said == (device == "cpu"), "CPU runs say once that BatchNorm stays per worker"


def test_the_schedule_length_depends_on_the_global_batch_only():
    job = tiny_job("unused").model_copy(deep=True)
    job.scaling.num_workers = 4
    job.train.batch_size = 2
    steps = set()
    for world_size in (1, 2, 3, 4):
        session = LocalSession("cpu")
        session.world_size = world_size
        from segjob.data import build_datasets

        train_set, _ = build_datasets(job.data, job.seed)
        steps.add(loop.train_sampler(job, session, train_set, epoch=0).steps_per_epoch)
    assert steps == {48 // 8}
