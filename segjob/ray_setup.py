"""What every Ray worker process of a segjob job runs first: Ray's `worker_process_setup_hook`.

    ray.init(runtime_env={"worker_process_setup_hook": "segjob.ray_setup.setup_worker_process", ...})

A module of its own, importing next to nothing, because every worker process of the cluster
(Tune trial actors, Ray Train controllers and workers, Ray's own helper actors) imports it
before anything else runs; segjob.ray_worker.runtime_env() names it.
"""

from __future__ import annotations

import os

from . import preemption


def setup_worker_process() -> None:
    pin_ray_address()
    preemption.install_sigterm_handler()


def pin_ray_address() -> None:
    """Point this process's Ray clients at the cluster it belongs to.

    Ray's state API finds "the" cluster from RAY_ADDRESS, else by looking for Ray processes on
    the machine. With two Ray instances on one machine (a local sweep beside a test's Ray, a
    `ray start` cluster beside a local one) it finds none it may choose, or the wrong one. Ray
    Train's PlacementGroupCleaner asks it whether a run's controller is alive, and a controller
    dies whenever Tune stops a trial (ASHA): the dead run's resources are then never given
    back and the sweep waits forever.
    """
    if os.environ.get("RAY_ADDRESS"):
        return
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
