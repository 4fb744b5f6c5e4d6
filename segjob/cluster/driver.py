"""Everything segjob asks of Ray Train (2.60, Train V2), in one place.

The driver builds a TorchTrainer from a job (`build_trainer`): `segjob.train` for its run,
each trial of a `segjob.tune` sweep for its own. Each worker runs `train_loop_per_worker`,
which hands a `RaySession` to the Ray-free engine. segjob owns its checkpoints: rank 0
commits them into the run directory itself (meta.json last), and Ray is only told where
they are (NO_UPLOAD), so Ray's results and Tune see them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from segjob.cluster import process_setup
from segjob.cluster.worker import train_loop_per_worker
from segjob.errors import UserError
from segjob.job.schema import JobConfig
from segjob.store.lease import Fence
from segjob.store.storage import Storage, worker_env_vars

# Ray Train V2's bookkeeping of reported checkpoints, in the run folder
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def runtime_env() -> dict[str, Any]:
    """What every Ray worker process needs: storage settings, and segjob.cluster.process_setup's hook (its own
    cluster's address for Ray's state API, and segjob's SIGTERM handler).

    The handler must be installed at process level: Train V2 runs the training function in a
    thread, where signal.signal is not allowed.
    """
    hook = f"{process_setup.__name__}.{process_setup.setup_worker_process.__name__}"  # follows the code if it moves
    return {"env_vars": worker_env_vars(), "worker_process_setup_hook": hook}


def pyarrow_filesystem(storage: Storage) -> pyarrow.fs.FileSystem:
    """The filesystem Ray's RunConfig(storage_filesystem=...) takes, over the run's storage; `storage.root`
    is the storage_path to go with it."""
    if storage.is_local:
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.fs))


def connect(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (or `ray job submit`'s), else start a local one.

    A local Ray gets a dashboard only when asked (a sweep asks): Ray Train's PlacementGroupCleaner
    finds a controller that died with its Tune trial (ASHA stopped it) through the dashboard's
    state API, and without it the dead run's workers' resources are never given back.
    """
    # the driver runs Ray Train's code too (a sweep's trials run theirs in Tune's actors, which run the hook)
    process_setup.quiet_ray_chatter()
    if ray.is_initialized():
        return
    env = without_job_settings(runtime_env())
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, runtime_env=env, log_to_driver=True)


def without_job_settings(env: dict[str, Any]) -> dict[str, Any]:
    """Leave out what a submitted job's own runtime env sets (`ray job submit --runtime-env-json`).

    Ray refuses to start a driver whose runtime env names a field or an env var that the job's
    already names, even with the same value; the job's settings reach every worker anyway.
    """
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not injected:
        return env
    job_env = json.loads(injected).get("runtime_env") or {}
    kept = {key: value for key, value in env.items() if key != "env_vars" and key not in job_env}
    env_vars = {key: value for key, value in env.get("env_vars", {}).items() if key not in job_env.get("env_vars", {})}
    return {**kept, "env_vars": env_vars} if env_vars else kept


def resolve_use_gpu(job: JobConfig) -> bool:
    if job.scaling.use_gpu != "auto":
        return bool(job.scaling.use_gpu)
    return ray.cluster_resources().get("GPU", 0) >= 1


def check_fits_local_cluster(job: JobConfig, use_gpu: bool) -> None:
    """A local cluster never grows: say so now instead of waiting forever for resources."""
    if os.environ.get("RAY_ADDRESS"):
        return  # a real cluster may autoscale
    have = ray.cluster_resources().get("CPU", 0)
    fewest = job.scaling.fewest_workers  # an elastic group starts on what fits, from min_workers up
    need = fewest * job.scaling.cpus_per_worker
    if need > have:
        raise UserError(
            f"scaling: {fewest} workers x {job.scaling.cpus_per_worker} CPUs need {need:g} CPUs, "
            f"this local Ray has {have:g}; lower scaling.num_workers (or min_workers) or scaling.cpus_per_worker"
        )
    if use_gpu and ray.cluster_resources().get("GPU", 0) < fewest:
        raise UserError(f"scaling.use_gpu: {fewest} workers need as many GPUs; this machine has fewer")


def build_trainer(job: JobConfig, storage: Storage, use_gpu: bool, callbacks: Sequence[Any] = (),
                  log_label: str | None = None, fence: Fence | None = None) -> TorchTrainer:
    """The run `job.name` under `storage`; callbacks are Ray Train UserCallbacks (a sweep's trial
    passes the one that reports to Tune); log_label starts the workers' segjob lines; the workers stamp
    their commits with the driver lease's `fence` and stop when a newer driver holds it."""
    if job.train.amp == "fp16" and not use_gpu:
        raise UserError("train.amp: fp16 needs GPU workers; use bf16 (or off) on CPU")
    resources = {"CPU": job.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    # Ray's barriers (report, get_preemption_info) fail with a message after this long instead of hanging;
    # the trainer reads it from this process's environment and passes it on to the controller
    os.environ.setdefault(COLLECTIVE_TIMEOUT_ENV, str(job.failure.collective_timeout_s))
    return TorchTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "log_label": log_label,
                           "fence": fence.to_config() if fence else None},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=job.failure.collective_timeout_s),
        scaling_config=scaling_config(job, use_gpu, resources),
        run_config=RunConfig(
            name=job.name,
            storage_path=storage.root,
            storage_filesystem=pyarrow_filesystem(storage),
            failure_config=failure_config(job),
            callbacks=list(callbacks),
        ),
    )


COLLECTIVE_TIMEOUT_ENV = "RAY_TRAIN_COLLECTIVE_TIMEOUT_S"


def scaling_config(job: JobConfig, use_gpu: bool, resources: dict[str, float]) -> ScalingConfig:
    """A fixed group, or an elastic one (min_workers..num_workers) that Ray shrinks when nodes go and grows back."""
    scaling = job.scaling
    elastic = scaling.fewest_workers < scaling.num_workers
    return ScalingConfig(
        num_workers=(scaling.fewest_workers, scaling.num_workers) if elastic else scaling.num_workers,
        use_gpu=use_gpu, resources_per_worker=resources,
        elastic_resize_monitor_interval_s=scaling.resize_interval_s,
    )


def failure_config(job: JobConfig) -> FailureConfig:
    """Worker and node losses use up max_failures; preemptions (drains with the PREEMPTION reason) their own budget."""
    failure = job.failure
    return FailureConfig(
        max_failures=failure.max_failures,
        max_preemption_failures=-1 if failure.max_preemptions is None else failure.max_preemptions,
        relax_collectives_on_preemption=failure.relax_collectives_on_preemption,
        preemption_grace_s=failure.preemption_grace_s,
    )


def forget_ray_snapshot(storage: Storage, run_path: str) -> None:
    """Drop Ray's record of reported checkpoints before a new driver starts on this run.

    Ray refuses to start when its snapshot names a checkpoint that is gone, and segjob's
    retention deletes checkpoints Ray was told about. Resume never reads Ray's record
    (it takes the newest committed checkpoint in storage), so nothing is lost.
    """
    storage.rm(f"{run_path}/{RAY_SNAPSHOT_FILE}")


def fit(trainer: TorchTrainer) -> None:
    """Run the trainer; a user error raised on a worker comes back as one UserError line."""
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as error:
        user_error = _find_user_error(error)
        if user_error:
            raise UserError(user_error) from None
        raise


def _find_user_error(error: BaseException) -> str | None:
    failures = list(getattr(error, "worker_failures", {}).values())
    for failure in [error, *failures]:
        seen = set()
        while failure is not None and id(failure) not in seen:
            seen.add(id(failure))
            if isinstance(failure, UserError):
                return str(failure)
            # Ray re-raises worker errors as generated subclasses; look for ours by name
            for line in str(failure).splitlines():
                if "segjob.errors.UserError:" in line:
                    return line.split("segjob.errors.UserError:", 1)[1].strip()
            failure = failure.__cause__ or failure.__context__
    return None

