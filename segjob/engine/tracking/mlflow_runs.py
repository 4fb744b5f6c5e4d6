"""An MLflow run per segjob run, for teams that keep their experiments in MLflow (`tracking.mlflow_uri`).

mlflow is an optional extra (`pip install segjob[mlflow]`, the mlflow-skinny client), imported only when
the key is set. Rank 0 logs the job's keys as params and every history record's numbers as metrics at their
step. The MLflow run's id is kept in <run>/tracking/mlflow.json, so a resumed run (another driver, a restarted
worker group) goes on logging into the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from segjob.errors import UserError
from segjob.job.schema import JobConfig
from segjob.store.run_folder import flatten
from segjob.store.storage import Storage

log = logging.getLogger("segjob")

RUN_ID_FILE = "tracking/mlflow.json"
DEFAULT_EXPERIMENT = "segjob"
_BATCH = 100  # MLflow's limit on params per log_batch call
_PARAM_CHARS = 500


def check_mlflow(job: JobConfig) -> None:
    """One clear line when the job asks for MLflow and this machine has no mlflow."""
    if not job.tracking.mlflow_uri:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError("tracking.mlflow_uri is set but mlflow is not installed here; "
                        "pip install 'segjob[mlflow]' (the mlflow-skinny client), or remove the key") from None


class MlflowTracker:
    def __init__(self, job: JobConfig, storage: Storage, run_path: str):
        check_mlflow(job)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = job.tracking.mlflow_uri
        # MLflow's file store keeps each metric in a file at its name's path: val/dice (a file) and
        # val/dice/<class> (a folder under it) cannot both exist there, so "/" becomes "." on such a store
        self.separator = "." if "://" not in self.uri or self.uri.startswith("file:") else "/"
        self.client = MlflowClient(tracking_uri=self.uri)
        self.storage = storage
        self.id_path = f"{run_path}/{RUN_ID_FILE}"
        self.run_id = self._resumed_run_id()
        if self.run_id is None:
            experiment = job.tracking.mlflow_experiment or DEFAULT_EXPERIMENT
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run = self.client.create_run(experiment_id, run_name=job.name,
                                         tags={"segjob.run": storage.display(run_path)})
            self.run_id = run.info.run_id
            params = [Param(key, str(value)[:_PARAM_CHARS])
                      for key, value in flatten(job.model_dump(mode="json")).items()]
            for start in range(0, len(params), _BATCH):
                self.client.log_batch(self.run_id, params=params[start:start + _BATCH])
            storage.write_bytes(self.id_path, json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}).encode())
            log.info("logging to MLflow run %s (experiment '%s') at %s", self.run_id, experiment, self.uri)
        else:
            log.info("logging to MLflow run %s again at %s", self.run_id, self.uri)
        self._warned = False

    def _resumed_run_id(self) -> str | None:
        try:
            recorded = json.loads(self.storage.read_bytes(self.id_path))
        except FileNotFoundError:
            return None
        return recorded.get("run_id") if recorded.get("tracking_uri") == self.uri else None

    def send(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        from segjob.engine.tracking import scalars

        now = int(time.time() * 1000)
        metrics = [Metric(key.replace("/", self.separator), value, now, int(record["step"]))
                   for record in records for key, value in scalars(record).items()]
        try:
            for start in range(0, len(metrics), 1000):  # MLflow's limit on metrics per log_batch call
                self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])
        except Exception as error:  # an unreachable tracking server never stops training
            if not self._warned:
                log.warning("could not log to MLflow at %s (%s: %s); training goes on",
                            self.uri, type(error).__name__, str(error).splitlines()[0][:200])
                self._warned = True

    def close(self, finished: bool) -> None:
        if finished:
            try:
                self.client.set_terminated(self.run_id, status="FINISHED")
            except Exception as error:
                log.warning("could not mark MLflow run %s finished (%s)", self.run_id, type(error).__name__)
