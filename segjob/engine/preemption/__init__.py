"""Preemption notices: learn that this machine is about to go away, early enough to checkpoint.

Sources, checked in this order by `PreemptionWatcher.notice()`:

- **sigterm**: SIGTERM to this process (Kubernetes pod deletion, a spot interruption handler,
  `ray stop`). `sigterm.install_sigterm_handler()` runs once per process from Ray's
  `worker_process_setup_hook` (the main thread: Train V2 runs the training function in a
  thread, where `signal.signal` raises). The notice is sticky: a SIGTERM is never taken back.
- **aws**: EC2 spot `instance-action` through IMDSv2 (token, then GET; 404 = nothing), about
  two minutes ahead; the deadline is the notice's own `time`.
- **gcp**: GCE `instance/preempted` = TRUE, about 30 s ahead.

The cloud sources are polled by daemon threads every `poll_interval_s`; `notice()` only reads
what they found, so the engine can call it every step. Each thread first asks whether the
machine is on its cloud (`cloud.detect`: the metadata server answers as that cloud's does);
off it (nothing answers after 3 tries, or another server does) the source is dropped without
a word above debug, and on it rank 0 says so once.

Ray's own drain notices (`ray.train.get_preemption_info()`) are a barrier across ranks, so
the engine asks for them from its training loop, never from here.

When a notice arrives the watcher calls `drain(notice)` once, from a side thread: on Ray that
asks Ray to drain this node with the PREEMPTION reason and the notice's deadline, so Ray's
accounting (a preemption never uses up `failure.max_failures`), every rank's
`get_preemption_info()` and the elastic policy all see it. A drain cannot be undone, so from
then on the notice stays, even if the cloud withdraws it; a notice that drained nothing (no
Ray, or `ray_drain: false`) may still be withdrawn.
"""
