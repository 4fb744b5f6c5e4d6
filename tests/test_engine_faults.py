"""Storage cut while training uploads (a loopback proxy in front of the S3 server): training
goes on, the failed checkpoint never looks committed, the next one commits. No Ray needed."""

import logging
import threading
from urllib.parse import urlsplit

from faults import committed_steps, wait_for
from proxy import TcpProxy
from test_engine import tiny_job

from segjob.engine import loop
from segjob.engine.session import LocalSession
from segjob.store import checkpoint
from segjob.store import storage as storage_module
from segjob.store.storage import open_storage


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_storage_cut_during_uploads_costs_checkpoints_not_training(s3_endpoint, s3_bucket, monkeypatch):
    # small retry budgets so a cut fails an upload in about a second
    monkeypatch.setattr(storage_module, "RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(storage_module, "RETRY_BASE_DELAY_S", 0.05)
    monkeypatch.setattr(storage_module, "S3_CLIENT_ATTEMPTS", 1)
    target = urlsplit(s3_endpoint)
    proxy = TcpProxy(target.hostname, target.port)
    uri = f"s3://{s3_bucket}/runs"
    job = tiny_job(uri, epochs=3, checkpoint_every_steps=1)
    job = job.model_copy(
        update={"storage": job.storage.model_copy(update={"endpoint_url": proxy.url, "keep_best": 10})})
    direct = open_storage(uri, endpoint_url=s3_endpoint)  # the test's own view, around the proxy
    warnings = Warnings()
    logging.getLogger("segjob").addHandler(warnings)
    outage = {}

    def cut_for_a_while():
        wait_for(lambda: committed_steps(direct, "tiny"), 60, "a first committed checkpoint")
        proxy.cut()
        outage["cut_after"] = max(committed_steps(direct, "tiny"))
        wait_for(lambda: any("NOT committed" in m for m in warnings.messages), 60, "a failed upload")
        outage["restored_after"] = max(committed_steps(direct, "tiny"))
        proxy.restore()

    thread = threading.Thread(target=cut_for_a_while, daemon=True)
    thread.start()
    session = LocalSession("cpu")
    try:
        metrics = loop.run(job, session)
    finally:
        thread.join(timeout=10)
        logging.getLogger("segjob").removeHandler(warnings)
        proxy.stop()

    assert metrics["epoch"] == 3, "training finished despite the outage"
    assert outage["restored_after"] == outage["cut_after"], "nothing committed while storage was cut"
    failed = [m for m in warnings.messages if "NOT committed" in m]
    assert failed, "at least one upload failed"
    steps = committed_steps(direct, "tiny")
    assert steps[-1] == 18 and steps[-1] > outage["cut_after"], "later checkpoints committed after the restore"
    reported = [(m["step"], path) for m, path in session.reports]
    assert any(path is None for _, path in reported), "a failed upload is reported without a checkpoint"
    for info in checkpoint.list_committed(direct, direct.path("tiny")):  # none committed is unreadable
        checkpoint.load(direct, info, expected_run="tiny")
    # a half-finished upload may be left behind; the driver removes it at its next start
    checkpoint.remove_uncommitted(direct, direct.path("tiny"), grace_s=0)
    assert checkpoint.list_uncommitted(direct, direct.path("tiny")) == []
    assert committed_steps(direct, "tiny") == steps
