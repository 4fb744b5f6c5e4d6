"""The worker side of Ray Train: each rank's training function and what it asks of Ray."""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointUploadMode

from segjob.engine import loop
from segjob.engine.preemption.notice import Notice, utc_stamp
from segjob.errors import setup_logging
from segjob.job.schema import JobConfig
from segjob.store.lease import Fence

log = logging.getLogger("segjob")


# Ray marks the head node with this resource (ray/_common/constants.py HEAD_NODE_RESOURCE_NAME)
HEAD_NODE_RESOURCE = "node:__internal_head__"


class RaySession:
    """The engine's session on a Ray Train worker."""

    def __init__(self, job: JobConfig) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        storage = context.get_storage()
        # Ray accepts a checkpoint it does not upload only on its own filesystem object, inside the run folder
        self._filesystem = storage.storage_filesystem
        self._grace_s = job.failure.preemption_grace_s

    def preemption_info(self) -> Notice | None:
        """Ray's drain notice for any node of the group (a barrier: every rank, same step)."""
        info = ray.train.get_preemption_info()
        if info is None:
            return None
        deadline = info.deadline_ms / 1000 if info.deadline_ms else None
        return Notice("ray", describe_preemption(info), deadline)

    def drain(self, notice: Notice) -> bool:
        deadline = notice.deadline
        if notice.source == "sigterm":
            if being_shut_down_by_ray():
                log.info("SIGTERM while Ray shuts this worker group down: not a preemption, nothing drained")
                return False
            # this process ends at its own SIGTERM deadline: Ray's restart (deadline + grace) must come first
            deadline = deadline - self._grace_s if deadline is not None else None
        return drain_node_for_preemption(ray.get_runtime_context().get_node_id(), deadline,
                                         f"segjob: preemption notice from {notice.source}: {notice.detail}")

    def report(self, metrics: dict[str, Any], checkpoint_path: str | None) -> None:
        checkpoint = Checkpoint(path=checkpoint_path, filesystem=self._filesystem) if checkpoint_path else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def being_shut_down_by_ray(settle_s: float = 1.0) -> bool:
    """Whether Ray itself is taking this worker down (a group restart or resize also SIGTERMs workers):
    its actor is no longer alive in GCS, or its placement group is gone. Draining the node then would
    take a healthy machine out of the cluster for good."""
    time.sleep(settle_s)  # Ray marks the actor and removes the group before its processes go
    context = ray.get_runtime_context()
    try:
        actor = ray._private.state.state.actor_table(context.get_actor_id())
        group = ray.util.get_current_placement_group()
        group_state = ray.util.placement_group_table(group).get("state") if group else "CREATED"
    except Exception as error:  # GCS unreachable: the node is probably going anyway
        log.debug("could not ask GCS about this worker (%s)", error)
        return False
    return actor.get("State") != "ALIVE" or group_state != "CREATED"


def describe_preemption(info: Any) -> str:
    parts = []
    if getattr(info, "deadline_ms", None):
        parts.append(f"deadline {utc_stamp(info.deadline_ms / 1000)}")
    parts.append(f"ranks {list(getattr(info, 'preempted_ranks', []))}")
    return "node preemption: " + ", ".join(parts)


def drain_node_for_preemption(node_id: str, deadline: float | None, message: str) -> bool:
    """Ask Ray to drain a node with the PREEMPTION reason, so Ray counts what follows as a preemption
    (`max_preemption_failures`, never `max_failures`), tells every rank (`get_preemption_info()`)
    and schedules nothing more there. True when the node is draining.

    `node_id` is hex, as `ray drain-node` and the raylet's own SIGTERM drain pass it: a binary id
    becomes the nil id, which GCS accepts and never drains. A drain cannot be undone. The head is
    never drained: the run's controller lives there (a lost head ends the run anyway), and on a
    one-node cluster nothing could ever run again.
    """
    from ray.core.generated import autoscaler_pb2

    if node_id in ray._private.state.state.get_draining_nodes():
        return True  # already draining (the raylet's own SIGTERM drain, or a cloud integration)
    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
    if node is None or HEAD_NODE_RESOURCE in node.get("Resources", {}):
        log.warning("preemption notice on the head node: not draining it (the run's controller lives there)")
        return False
    deadline_ms = int(deadline * 1000) if deadline else 0  # 0: no deadline
    gcs = ray._private.worker.global_worker.gcs_client
    accepted, refusal = gcs.drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), message, deadline_ms
    )
    if not accepted:
        log.warning("Ray refused to drain node %s for preemption: %s", node_id[:8], refusal)
        return False
    log.warning("asked Ray to drain node %s for preemption%s", node_id[:8],
                f" by {time.strftime('%H:%M:%S', time.localtime(deadline))}" if deadline else "")
    return True


def train_loop_per_worker(config: dict[str, Any]) -> None:
    setup_logging()  # Ray's per-report lines were silenced by segjob.cluster.process_setup, before Ray's setup
    if config.get("log_label"):
        label_log_lines(config["log_label"])
    job = JobConfig.model_validate(config["job"])
    loop.run(job, RaySession(job), fence=Fence.from_config(config.get("fence")))


class _Label(logging.Filter):
    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"[{self.label}] {record.msg}"
        return True


def label_log_lines(label: str) -> None:
    """Start segjob's lines from this process with [label]: a sweep's trials share one console."""
    logger = logging.getLogger("segjob")
    if not any(isinstance(existing, _Label) for existing in logger.filters):
        logger.addFilter(_Label(label))
