"""A trained model rebuilt from a checkpoint, for evaluate, predict and report (no Ray).

    trained = load_trained("s3://bucket/runs/pets_unet", data_root="/data/pets")
    logits = trained.model(images)              # eval mode, on trained.device
    trained.job, trained.class_names, trained.palette, trained.threshold
    history, where = run_history("gs://bucket/runs/pets_unet")

A checkpoint of a run trained with train.ema holds the moving average of its weights too
(ema.safetensors); that is the model rebuilt (`trained.weights == "ema"`) unless raw_weights=True.

A location is a checkpoint folder (it holds meta.json: a run's `checkpoints/step-…`, or what
`segjob.pull` wrote) or a run folder, whose best committed checkpoint by the run's own
metric is taken (`pick="latest"`: the newest). Local paths, file://, s3:// and gs:// all work.

Checkpoints are untrusted input. Everything goes through segjob.store.checkpoint: every file is
checked against the sha256 in meta.json before use, weights come from safetensors, the
training state only through torch.load(weights_only=True), and the job inside is validated
like a job file. The model is rebuilt without its pretrained-encoder file (the checkpoint's
weights replace it) and without torch.compile.

A checkpoint never chooses what segjob reads or connects to: the data location (data.root,
data.path, ...), data.endpoint_url and storage.endpoint_url recorded in its job are never used.
The dataset is built only where `data_root` (or a data path key in `data_overrides`) says
where it is, or when the job's dataset reads no files at all; its endpoint then comes from
`data_overrides` or the environment (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST).

Class names, input channels and palette come from the dataset when it is built. Otherwise
the class names and palette are those the job's data section implies (results/classes: the
named dataset's published classes, or the classes a `folder` job lists), else the ones its
recorded metrics name (val/iou/<class>), and the input channels come from the weights' shapes.
"""

from __future__ import annotations

import hashlib
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segjob.data import build_datasets
from segjob.data.labels import default_palette
from segjob.data.remote import is_remote
from segjob.errors import UserError
from segjob.job.load import validate_job
from segjob.job.schema import CLASS_NAME_PATTERN, JobConfig, ema_recorded, metric_direction, ranked_metric_name
from segjob.learning.losses import binary_threshold, output_channels
from segjob.models import create_model
from segjob.results.classes import classes_of
from segjob.store import checkpoint
from segjob.store.storage import Storage, open_storage

log = logging.getLogger("segjob")

PICKS = ("best", "latest")


@dataclass
class Trained:
    job: JobConfig
    model: nn.Module
    class_names: list[str]
    in_channels: int
    palette: list[tuple[int, int, int]]
    source: str  # where the checkpoint was found, for messages and reports
    meta: dict[str, Any] = field(repr=False)
    history: list[dict[str, Any]] = field(repr=False)
    device: torch.device = torch.device("cpu")
    datasets: tuple[Any, Any] | None = field(default=None, repr=False)  # (train, val) when the data is here
    weights: str = "trained"  # which weights `model` holds: "ema" (the moving average train.ema kept) or "trained"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def threshold(self) -> float:
        return binary_threshold(self.job.loss)

    @property
    def is_binary(self) -> bool:
        """One sigmoid output channel (bce, bce+dice)."""
        return output_channels(self.job.loss, self.num_classes) == 1

    def require_data(self) -> tuple[Any, Any]:
        if self.datasets is None:
            raise UserError(f"{self.source}: the job's dataset ({self.job.data.name}) is not available here; "
                            f"point --data at a local copy")
        return self.datasets


# --- where the checkpoint is ------------------------------------------------------------


def locate(uri: str, endpoint_url: str | None = None) -> tuple[Storage, str]:
    """(storage, folder path on it) for a local path, file://, s3:// or gs:// URI. A bucket is
    checked first (endpoint reachable, bucket there, credentials found), so a wrong one is one
    line within seconds, not a client library's retries."""
    storage = open_storage(uri, endpoint_url)
    if storage.is_local:
        if not Path(storage.root).is_dir():
            raise UserError(f"{uri}: no such folder")
    else:
        storage.check(uri_setting="the URI", endpoint_setting="--endpoint-url")
    return storage, storage.root


@contextmanager
def untrusted_json(where: str):
    """What a hostile meta.json or history.jsonl raises beyond the checks made on it (nesting
    deep enough to exhaust the parser's recursion) as one line that names the checkpoint."""
    try:
        yield
    except RecursionError:
        raise UserError(f"{where}: its JSON nests too deep to read; the checkpoint is damaged or hostile") from None


def choose_checkpoint(storage: Storage, path: str, pick: str = "best", raw_weights: bool = False) -> str:
    """The checkpoint folder at `path`: itself, or a run's best (by its job metric: with train.ema on, the EMA
    weights' figure unless raw_weights) or newest committed one."""
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {PICKS}")
    if storage.exists(f"{path}/{checkpoint.META_FILE}"):
        return checkpoint.committed_folder(storage, path)  # a run's step folder: the attempt its meta.json names
    committed = checkpoint.list_committed(storage, path)
    if not committed:
        raise UserError(f"{storage.display(path)}: neither a checkpoint folder (no {checkpoint.META_FILE}) "
                        f"nor a run with committed checkpoints")
    newest = committed[-1]
    if pick == "latest":
        return newest.path
    job = newest.meta.get("job")
    metric = job.get("metric") if isinstance(job, dict) else None
    metric = metric if isinstance(metric, dict) else {}  # meta.json is untrusted: any part may be missing
    name = metric.get("name") if isinstance(metric.get("name"), str) else "val/miou"
    mode = metric.get("mode") if metric.get("mode") in ("min", "max") else metric_direction(name)
    name = ranked_metric_name(name, ema_recorded(job) and not raw_weights)
    best = checkpoint.select_best(committed, name, mode)
    return (best[0] if best else newest).path


# --- rebuilding the model ---------------------------------------------------------------


def job_from_meta(meta: dict[str, Any], where: str, data_root: str | None = None,
                  data_overrides: dict[str, Any] | None = None) -> JobConfig:
    """The checkpoint's job, validated, without the endpoints it records; then with the data
    changes asked for on the command line. A data location given here replaces every data path
    the checkpoint recorded (the ones not given fall back to their defaults)."""
    raw = meta.get("job")
    if not isinstance(raw, dict):
        found = "nothing" if raw is None else f"a JSON {type(raw).__name__}"
        raise UserError(f"{where}/{checkpoint.META_FILE}: 'job' holds {found}, not a job configuration; "
                        f"the checkpoint is damaged or was not written by segjob")
    try:
        job = validate_job(raw, source=f"{where}/{checkpoint.META_FILE} (job)")
    except UserError as error:
        raise UserError(f"{error}; the checkpoint may come from another segjob version") from None
    job = without_recorded_endpoints(job, where)
    changes = dict(data_overrides or {})
    path_keys = job.data.path_keys()
    if data_root is not None:
        if not path_keys:
            raise UserError(f"--data: the job's dataset ({job.data.name}) reads no files; leave --data out")
        # data.root, or data.path for a dataset in one file (nyuv2); files it names "beside" follow it
        changes[path_keys[0]] = data_root if "://" in data_root else str(Path(data_root).expanduser().resolve())
    if not changes:
        return job
    raw = job.model_dump(mode="json")
    raw["data"].update(changes)
    given = [key for key in path_keys if key in changes]
    if given:
        for key in path_keys:  # none of the checkpoint's paths survives a location given here
            if key in changes:
                continue
            if type(job.data).model_fields[key].is_required():
                raise UserError(f"--set data.{given[0]}: say where the dataset is too, with --data ROOT "
                                f"(the data.{key} a checkpoint records is never used)")
            raw["data"][key] = type(job.data).model_fields[key].default
    asked = [f"--data {data_root}"] * (data_root is not None) + [f"--set data.{k}" for k in data_overrides or {}]
    shown = " ".join(asked)
    return validate_job(raw, source=shown)


def without_recorded_endpoints(job: JobConfig, where: str) -> JobConfig:
    """The job with data.endpoint_url and storage.endpoint_url cleared, saying so once when the
    checkpoint named an endpoint or a bucket for its data: neither is ever used from a checkpoint."""
    recorded = [f"data.{key} (a bucket)" for key in job.data.path_keys()
                if is_remote(str(getattr(job.data, key) or ""))]
    recorded += [f"{section}.endpoint_url" for section in ("data", "storage")
                 if getattr(getattr(job, section), "endpoint_url", None)]
    if not recorded:
        return job
    log.info("%s: not using the %s recorded in the checkpoint: a checkpoint never chooses where segjob "
             "reads data from or connects to", where, " and ".join(recorded))
    update = {"storage": job.storage.model_copy(update={"endpoint_url": None})}
    if "endpoint_url" in type(job.data).model_fields:
        update["data"] = job.data.model_copy(update={"endpoint_url": None})
    return job.model_copy(update=update)


def names_data_location(job: JobConfig, data_root: str | None, data_overrides: dict[str, Any] | None) -> bool:
    """Whether the command line says where the job's data is (--data, or --set of a data path key)."""
    return data_root is not None or any(key in job.data.path_keys() for key in data_overrides or {})


def model_config_for_inference(job: JobConfig) -> Any:
    """The job's model without its pretrained-encoder file or compilation: the checkpoint has the weights."""
    update = {key: value for key, value in (("encoder_weights", None), ("compile", False))
              if key in type(job.model).model_fields}
    return job.model.model_copy(update=update)


def rebuild_model(job: JobConfig, state: dict[str, torch.Tensor], in_channels: int, num_classes: int,
                  where: str) -> nn.Module:
    model = create_model(model_config_for_inference(job), in_channels, output_channels(job.loss, num_classes))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise UserError(f"{where}: the weights don't fit the model its job describes ({first_line})") from None
    return model.eval()


def class_names_from_metrics(meta: dict[str, Any], history: list[Any]) -> list[str] | None:
    """Class names in order, from the newest record that has val/iou/<class> keys."""
    for record in [meta.get("metrics"), *reversed(history)]:
        if not isinstance(record, dict):
            continue
        names = [key[len("val/iou/"):] for key in record if isinstance(key, str) and key.startswith("val/iou/")]
        if names and all(re.fullmatch(CLASS_NAME_PATTERN, name) for name in names):
            return names
    return None


def in_channels_from_weights(job: JobConfig, state: dict[str, torch.Tensor], num_classes: int) -> int:
    """The input channel count whose model has exactly the checkpoint's tensor shapes."""
    expected = {name: tuple(tensor.shape) for name, tensor in state.items()}
    for channels in (3, 4, 1, 2):
        model = create_model(model_config_for_inference(job), channels, output_channels(job.loss, num_classes))
        if {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()} == expected:
            return channels
    raise UserError("the checkpoint's weights fit no model of its job with 1 to 4 input channels; "
                    "point --data at its dataset")


def load_trained(uri: str, *, endpoint_url: str | None = None, data_root: str | None = None,
                 data_overrides: dict[str, Any] | None = None, pick: str = "best", need_data: bool = False,
                 with_data: bool = True, device: str | torch.device | None = None,
                 raw_weights: bool = False) -> Trained:
    """Rebuild the model of a checkpoint (or of a run's best checkpoint) in eval mode: with the moving
    average of its weights when the run kept one (train.ema), unless raw_weights.

    The dataset is built when `data_root`/`data_overrides` say where it is, or (with_data) when
    it reads no files; need_data: refuse when it is not built, naming the flag that gives it."""
    storage, path = locate(uri, endpoint_url)
    with untrusted_json(storage.display(path)):
        folder = choose_checkpoint(storage, path, pick, raw_weights)
    where = storage.display(folder)
    with untrusted_json(where):
        loaded = checkpoint.load(storage, folder)
        job = job_from_meta(loaded.meta, where, data_root, data_overrides)
    datasets = None
    located = names_data_location(job, data_root, data_overrides)
    if located or (with_data and not job.data.path_keys()):
        try:
            datasets = build_datasets(job.data, job.seed)
        except UserError as error:
            if need_data:
                raise
            log.info("dataset not available (%s); class names and input channels from the checkpoint", error)
    elif need_data:
        key = job.data.path_keys()[0]
        raise UserError(f"{where}: this needs the job's dataset ({job.data.name}); say where it is on this "
                        f"machine with --data ROOT (or --set data.{key}=...): the data location a checkpoint "
                        f"records is never used")
    if datasets is not None:
        val_set = datasets[1]
        class_names, in_channels = list(val_set.class_names), int(val_set.in_channels)
        palette = getattr(val_set, "palette", None)
    else:
        class_names, palette = classes_without_data(job, loaded, where)
        in_channels = in_channels_from_weights(job, loaded.model_state, len(class_names))
    weights = "ema" if loaded.ema_state is not None and not raw_weights else "trained"
    state = loaded.ema_state if weights == "ema" else loaded.model_state
    model = rebuild_model(job, state, in_channels, len(class_names), where)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    palette = [tuple(int(v) for v in colour) for colour in (palette or default_palette(len(class_names)))]
    log.info("loaded %s (epoch %s, step %s%s)", where, loaded.meta.get("epoch"), loaded.meta.get("step"),
             ", EMA weights; --raw-weights for the trained ones" if weights == "ema" else "")
    return Trained(job, model.to(device), class_names, in_channels, palette, where, loaded.meta, loaded.history,
                   device, datasets, weights)


def classes_without_data(job: JobConfig, loaded: checkpoint.LoadedCheckpoint,
                         where: str) -> tuple[list[str], list[tuple[int, int, int]] | None]:
    """(class names, palette) from the job's data section, else from the metrics the checkpoint recorded."""
    implied = classes_of(job.data)
    if implied is not None:
        return implied
    class_names = class_names_from_metrics(loaded.meta, loaded.history)
    if class_names is None:
        raise UserError(f"{where}: the checkpoint records no class names (no evaluation yet) and its dataset "
                        f"is not here; point --data at the dataset")
    return class_names, None


# --- a run's history --------------------------------------------------------------------


def run_history(uri: str, endpoint_url: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """(history records, the checkpoint they came from): the newest committed checkpoint's
    history.jsonl, checked against its meta.json (only that file is read, not the weights).
    A damaged newest checkpoint is skipped for the one before, with a warning."""
    storage, path = locate(uri, endpoint_url)
    with untrusted_json(storage.display(path)):
        if storage.exists(f"{path}/{checkpoint.META_FILE}"):
            path = checkpoint.committed_folder(storage, path)
            return checkpoint.load(storage, path).history, storage.display(path)
        committed = checkpoint.list_committed(storage, path)
    if not committed:
        raise UserError(f"{storage.display(path)}: no committed checkpoints (expected a run folder, e.g. "
                        f"<storage.uri>/<job name>, or a checkpoint folder)")
    problems = []
    for info in reversed(committed):
        where = f"{storage.display(info.path)}/{checkpoint.HISTORY_FILE}"
        try:
            raw = storage.read_bytes(f"{info.path}/{checkpoint.HISTORY_FILE}")
        except FileNotFoundError:
            problems.append(f"{where}: missing")
            continue
        if hashlib.sha256(raw).hexdigest() != info.meta["files"][checkpoint.HISTORY_FILE]["sha256"]:
            problems.append(f"{where}: sha256 does not match {checkpoint.META_FILE}")
            log.warning("%s; trying the checkpoint before", problems[-1])
            continue
        with untrusted_json(where):
            return checkpoint.parse_history(raw, where), storage.display(info.path)
    raise UserError(f"no readable history among {len(committed)} committed checkpoints; newest: {problems[0]}")
