"""What every Ray worker process of a segjob job runs first: Ray's `worker_process_setup_hook`.

    ray.init(runtime_env={"worker_process_setup_hook": "segjob.cluster.process_setup.setup_worker_process", ...})

A module of its own, importing next to nothing, because every worker process of the cluster
(Tune trial actors, Ray Train controllers and workers, Ray's own helper actors) imports it
before anything else runs; segjob.cluster.driver.runtime_env() names it.
"""

from __future__ import annotations

import importlib
import logging
import os

from segjob.engine.preemption import sigterm


def setup_worker_process() -> None:
    quiet_ray_chatter()
    pin_ray_address()
    sigterm.install_sigterm_handler()
    keep_ours_when_ray_sets_sigterm()


# Ray Train V2 logs every report of every rank at INFO ("Reporting training result N: TrainingReport(...)") on a
# logger named after its file's path (`logging.getLogger(__file__)` in this module), not its dotted name: that
# logger is not under `ray.train`, so neither LoggingConfig(log_level) nor a level on the dotted name reaches it
TRAIN_REPORT_MODULE = ("train", "v2", "_internal", "execution", "context.py")
# Ray Train's PlacementGroupCleaner asks the state API (the dashboard) every few seconds; a local run without a
# dashboard gets the same warning each time
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def train_report_logger_name() -> str:
    """The path Ray's context module is loaded from, found without importing ray.train (this runs in every
    Ray process, Ray's own helpers included)."""
    ray = importlib.import_module("ray")
    return os.path.join(os.path.dirname(ray.__file__), *TRAIN_REPORT_MODULE)


def quiet_ray_chatter() -> None:
    """segjob prints one status line per epoch; Ray's per-report lines and repeated warnings go.

    A level set here survives Ray Train's logging setup (a `dictConfig` of `ray.train` that resets the levels
    of the loggers under it, but leaves other loggers and every logger's filters as they are).
    """
    logging.getLogger(train_report_logger_name()).setLevel(logging.WARNING)
    cleaner = logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER)
    if not any(isinstance(existing, OncePerMessage) for existing in cleaner.filters):
        cleaner.addFilter(OncePerMessage())


class OncePerMessage(logging.Filter):
    """Lets each distinct message through once per process."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


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
