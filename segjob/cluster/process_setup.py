"""What every Ray worker process of a segjob job runs first: Ray's `worker_process_setup_hook`.

    ray.init(runtime_env={"worker_process_setup_hook": "segjob.cluster.process_setup.setup_worker_process", ...})

A module of its own, importing next to nothing, because every worker process of the cluster
(Tune trial actors, Ray Train controllers and workers, Ray's own helper actors) imports it
before anything else runs; segjob.cluster.driver.runtime_env() names it.
"""

from __future__ import annotations

import importlib
import os

from segjob.engine.preemption import sigterm


def setup_worker_process() -> None:
    pin_ray_address()
    sigterm.install_sigterm_handler()
    keep_ours_when_ray_sets_sigterm()


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


def keep_ours_when_ray_sets_sigterm() -> None:
    """Ray installs its SIGTERM handler after the setup hook: make Ray's the one ours chains to.

    What Ray does (2.60, ray/_private/worker.py and workers/default_worker.py): a worker process
    runs the setup hook and then `Worker.main_loop()`, which installs Ray's own SIGTERM handler
    through `ray._private.utils.set_sigterm_handler`.
    """
    # Ray is already imported in every process that runs the hook (a test may stand in for this module)
    utils = importlib.import_module("ray._private.utils")
    original = utils.set_sigterm_handler
    if getattr(original, "segjob", False):
        return

    def set_sigterm_handler(handler):
        if not sigterm.chain_to(handler):
            original(handler)

    set_sigterm_handler.segjob = True
    utils.set_sigterm_handler = set_sigterm_handler
