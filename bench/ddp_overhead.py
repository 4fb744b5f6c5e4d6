"""segjob's per-step cost on 2 gloo ranks (Ray Train) vs a hand-written DDP loop under torchrun.

    .venv/bin/python bench/ddp_overhead.py [--epochs 3] [--rounds 2] [--json figures.json]
    .venv/bin/python bench/ddp_overhead.py --epochs 1 --rounds 1        # smoke check, about 1 min
    .venv/bin/python bench/ddp_overhead.py --agree-variant              # + the torchrun loop with agree()

Both sides train the same job (jobs/quickstart.yaml: synthetic 64x64 shapes, U-Net base 16,
CE, Adam + cosine, 16 images per rank, 2 ranks x 1 CPU, gloo, 0 loader workers), each as
a fresh command, as a user would start it:

- segjob: `python -m segjob.train jobs/quickstart.yaml --set train.epochs=N ...` on a local
  Ray it starts itself. Throughput is the engine's own `train/images_per_s` per epoch (the
  training loop only: evaluation and the epoch-end checkpoint are outside it), read from the
  run's newest committed checkpoint (`history.jsonl`).
- torchrun: `python -m torch.distributed.run --standalone --nproc_per_node 2
  bench/ddp_reference_loop.py` on the same job file, timed the same way (rank 0, loop only).

Rounds alternate (segjob, torchrun, segjob, torchrun, ...) so drift on a shared machine hits
both alike. A round's figure is the median over epochs 2..N (epoch 1 includes warm-up; with
--epochs 1 it is epoch 1); the result is the ratio of the medians over rounds,
torchrun img/s / segjob img/s (goal <= 1.02).

Start-up is timed from the wall clock just before Popen to the start of epoch 1's training
loop (the engine's `started`, taken just before it asks the DataLoader for the first batch).
For segjob that moment is derived from rank 0's epoch-1 status line: the time this script
received the line minus the seconds the line reports since `started`; Ray's log forwarding
makes it late by up to the lag, and the line's own HH:MM:SS stamp bounds that lag (both are
in the JSON). torchrun's rank 0 records it directly, and the end of its first step too.
While each command runs, the CPU time of every process in its tree is sampled from /proc
every 0.5 s, so the JSON (and a line of the table) says how much CPU the processes other than
the two training ranks took during the timed epochs: on a 2-core machine that is CPU the
ranks did not get. Both ranks' CPU time per optimizer step is printed beside img/s: other
sessions' load on the same cores moves it far less than wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY_S = 0.5

STATUS_LINE = re.compile(r"(\d\d):(\d\d):(\d\d) segjob: epoch (\d+)/(\d+) .*?([\d.]+) img/s\s+([\d.]+) s\s*$")
MARKERS = {  # segjob's own lines and Ray's, as the driver prints them: name -> a substring of the line
    "driver_ready": "segjob: starting run",
    "ray_started": "Started a local Ray instance",
    "process_group": "Setting up process group for",
    "worker_group_started": "Started training worker group of size",
    "finished": "segjob: run '",
}


# --- watching a command: its lines with arrival times, the CPU time of its process tree -----------


def read_proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) for every process on the machine."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 of proc(5)
        table[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return table


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Watched:
    """Run a command; keep each output line with the time it arrived, and CPU samples of its tree."""

    def __init__(self, command: list[str], log_path: Path):
        self.command, self.log_path = command, log_path
        self.lines: list[tuple[float, str]] = []
        self.samples: dict[int, list[tuple[float, float]]] = {}  # pid -> [(time, CPU seconds)]
        self.labels: dict[int, str] = {}  # pid -> its command line, as last seen (Ray renames its workers)
        self.machine: list[tuple[float, float]] = []  # (time, busy CPU seconds of the whole machine)
        self._done = threading.Event()

    def run(self) -> tuple[float, float, int]:
        """(wall time before Popen, wall time at exit, exit code)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "w") as log:
            started = time.time()
            process = subprocess.Popen(self.command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, bufsize=1)
            self.root = process.pid
            sampler = threading.Thread(target=self._sample, daemon=True)
            sampler.start()
            try:
                for line in process.stdout:
                    now = time.time()
                    self.lines.append((now, line.rstrip("\n")))
                    log.write(f"{now - started:9.3f} {line}")
                code = process.wait()
            except BaseException:
                process.terminate()  # ours; the driver takes its local Ray down with it
                process.wait(timeout=60)
                raise
            ended = time.time()
            self._done.set()
            sampler.join()
        self._wait_for_tree_to_exit()
        return started, ended, code

    def _sample(self) -> None:
        while not self._done.is_set():
            now, busy, table = time.time(), machine_busy_seconds(), read_proc_table()
            self.machine.append((now, busy))
            tree, frontier = set(), [self.root]
            children: dict[int, list[int]] = {}
            for pid, (parent, _) in table.items():
                children.setdefault(parent, []).append(pid)
            while frontier:
                pid = frontier.pop()
                if pid in table and pid not in tree:
                    tree.add(pid)
                    frontier.extend(children.get(pid, ()))
            for pid in tree:
                self.samples.setdefault(pid, []).append((now, table[pid][1]))
                label = command_line(pid)
                if label:
                    self.labels[pid] = label
            self._done.wait(SAMPLE_EVERY_S)

    def _wait_for_tree_to_exit(self, timeout_s: float = 20.0) -> None:
        """A command's helpers (Ray's GCS, raylet, workers) must be gone before the next run starts."""
        deadline = time.time() + timeout_s
        left = [pid for pid in self.samples if pid != self.root]
        while time.time() < deadline:
            left = [pid for pid in left if command_line(pid) and command_line(pid) == self.labels.get(pid)]
            if not left:
                return
            time.sleep(0.5)
        print(f"warning: {len(left)} process(es) of the last command still running after {timeout_s:.0f} s: "
              + "; ".join(f"{pid} {self.labels[pid][:60]}" for pid in left), file=sys.stderr)

    def first_line(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)

    def cpu_seconds(self, start: float, end: float) -> dict[int, float]:
        """CPU seconds each process of the tree used between two wall-clock times (linear between samples)."""
        return {pid: _value_at(samples, end) - _value_at(samples, start) for pid, samples in self.samples.items()}


def _value_at(samples: list[tuple[float, float]], t: float) -> float:
    if t < samples[0][0]:
        return 0.0  # first seen after t: it was born after the sample before t
    if t >= samples[-1][0]:
        return samples[-1][1]
    for (t0, v0), (t1, v1) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1
    return samples[-1][1]


def cpu_split(watched: Watched, start: float, end: float, steps: int, is_rank) -> dict[str, Any]:
    """CPU seconds between start and end: the two training ranks vs every other process of the tree."""
    used = watched.cpu_seconds(start, end)
    ranks = {pid: s for pid, s in used.items() if is_rank(watched.labels.get(pid, ""))}
    others = {pid: s for pid, s in used.items() if pid not in ranks}
    by_label: dict[str, float] = {}
    for pid, seconds in others.items():
        label = short_label(watched.labels.get(pid, "?"))
        by_label[label] = by_label.get(label, 0.0) + seconds
    busy = _value_at(watched.machine, end) - _value_at(watched.machine, start)
    return {
        "window_s": end - start,
        "cores_x_window_s": (os.cpu_count() or 1) * (end - start),
        "ranks_cpu_s": sum(ranks.values()),
        "steps": steps,
        # both ranks' CPU per optimizer step: what a step costs in CPU, less moved by other load than wall time
        "ranks_cpu_ms_per_step": 1000 * sum(ranks.values()) / steps,
        "others_cpu_s": sum(others.values()),
        # the machine's busy CPU time not spent by this command: the other sessions' load, this script's sampler
        "outside_cpu_s": busy - sum(used.values()),
        "others_by_process": dict(sorted(((k, round(v, 2)) for k, v in by_label.items() if v >= 0.005),
                                         key=lambda item: -item[1])),
    }


def short_label(command: str) -> str:
    words = command.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    scripts = [Path(w).name for w in words[1:] if w.endswith(".py")]
    modules = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "-m"]
    return " ".join([Path(words[0]).name, *(modules or scripts[:1])])


# --- the two sides ----------------------------------------------------------------------------


def overrides(epochs: int, storage: str) -> list[str]:
    return [f"train.epochs={epochs}", "train.checkpoint_every_steps=0", f"storage.uri={storage}",
            "preemption.aws_metadata_url=null", "preemption.gcp_metadata_url=null"]


def with_sets(values: list[str]) -> list[str]:
    return [word for value in values for word in ("--set", value)]


def run_segjob(job_file: str, epochs: int, logs: Path, tag: str) -> dict[str, Any]:
    storage = tempfile.mkdtemp(prefix="ddp-overhead-segjob-")
    try:
        command = [sys.executable, "-m", "segjob.train", job_file, *with_sets(overrides(epochs, storage))]
        watched = Watched(command, logs / f"{tag}.log")
        load_before = os.getloadavg()[0]
        started, ended, code = watched.run()
        if code != 0:
            raise RuntimeError(f"segjob exited with {code}; see {watched.log_path}")
        history = read_history(Path(storage))
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    global_batch = global_batch_size(job_file)
    epochs_seen: dict[int, dict[str, Any]] = {}
    for received, line in watched.lines:
        match = STATUS_LINE.search(line)
        if not match or "RayTrainWorker" not in line:
            continue
        hh, mm, ss, epoch, _, _, seconds = match.groups()
        stamped = stamp_near(received, int(hh), int(mm), int(ss))
        epochs_seen[int(epoch)] = {"line_received": received, "line_stamped": stamped, "line_seconds": float(seconds)}
    figures = []
    previous_step = 0
    for record in history:
        epoch = record["epoch"]
        seen = epochs_seen.get(epoch, {})
        train_seconds = (record["step"] - previous_step) * global_batch / record["train/images_per_s"]
        loop_started = seen["line_received"] - seen["line_seconds"] if seen else None
        figures.append({
            "epoch": epoch, "step": record["step"], "steps": record["step"] - previous_step,
            "images_per_s": record["train/images_per_s"],
            "seconds": train_seconds, "t_loop_started": loop_started,
            "t_loop_ended": loop_started + train_seconds if loop_started else None,
            # the status line left the worker at or after its HH:MM:SS stamp: received - stamped bounds the lag
            "forwarding_lag_at_most_s": seen["line_received"] - seen["line_stamped"] if seen else None,
        })
        previous_step = record["step"]
    first = figures[0]
    timed = figures[1:] or figures
    markers = {name: (watched.first_line(text) - started if watched.first_line(text) else None)
               for name, text in MARKERS.items()}
    cpu = cpu_split(watched, timed[0]["t_loop_started"], timed[-1]["t_loop_ended"], sum(e["steps"] for e in timed),
                    is_rank=lambda label: "RayTrainWorker" in label)
    return {
        "side": "segjob", "command": " ".join(command), "t_popen": started, "wall_s": ended - started,
        "load_avg_1min_before": load_before,
        "epochs": figures, "timed_epochs": [e["epoch"] for e in timed],
        "images_per_s": statistics.median(e["images_per_s"] for e in timed),
        "start_to_loop_s": first["t_loop_started"] - started,
        "start_to_loop_lag_bound_s": first["forwarding_lag_at_most_s"],
        "markers_s": markers, "cpu_in_timed_epochs": cpu,
    }


def run_reference(job_file: str, epochs: int, logs: Path, tag: str, with_agree: bool = False) -> dict[str, Any]:
    scratch = tempfile.mkdtemp(prefix="ddp-overhead-torchrun-")
    try:
        out = Path(scratch) / "figures.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "bench/ddp_reference_loop.py", job_file, *with_sets(overrides(epochs, scratch)), "--out", str(out),
                   *(["--with-agree"] if with_agree else [])]
        watched = Watched(command, logs / f"{tag}.log")
        load_before = os.getloadavg()[0]
        started, ended, code = watched.run()
        if code != 0 or not out.exists():
            raise RuntimeError(f"torchrun exited with {code}; see {watched.log_path}")
        reference = json.loads(out.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    figures = reference.pop("epochs")
    timed = figures[1:] or figures
    cpu = cpu_split(watched, timed[0]["t_loop_started"], timed[-1]["t_loop_ended"], sum(e["steps"] for e in timed),
                    is_rank=lambda label: "ddp_reference_loop.py" in label and "torch.distributed.run" not in label)
    return {
        "side": "torchrun+agree" if with_agree else "torchrun", "command": " ".join(command), "t_popen": started,
        "wall_s": ended - started,
        "load_avg_1min_before": load_before,
        "epochs": figures, "timed_epochs": [e["epoch"] for e in timed],
        "images_per_s": statistics.median(e["images_per_s"] for e in timed),
        "start_to_loop_s": figures[0]["t_loop_started"] - started,
        "start_to_first_step_done_s": reference["t_first_step_done"] - started,
        "markers_s": {key[2:]: value - started for key, value in reference.items() if key.startswith("t_")},
        "settings": {key: value for key, value in reference.items() if not key.startswith("t_")},
        "cpu_in_timed_epochs": cpu,
    }


def read_history(storage: Path) -> list[dict[str, Any]]:
    """The epoch records of the run's newest committed checkpoint (it holds the whole history)."""
    committed = sorted(path.parent for path in storage.glob("*/checkpoints/step-*/meta.json"))
    if not committed:
        raise RuntimeError(f"no committed checkpoint under {storage}")
    records = [json.loads(line) for line in (committed[-1] / "history.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("checkpoint") == "epoch" and "train/images_per_s" in r]


def global_batch_size(job_file: str) -> int:
    sys.path.insert(0, str(REPO))
    from segjob.job.load import load_job

    job = load_job(REPO / job_file)
    return job.train.batch_size * job.scaling.num_workers


def stamp_near(received: float, hour: int, minute: int, second: int) -> float:
    """The wall-clock time of a local HH:MM:SS stamp printed shortly before `received`."""
    moment = datetime.datetime.fromtimestamp(received)
    stamped = moment.replace(hour=hour, minute=minute, second=second, microsecond=0)
    if stamped - moment > datetime.timedelta(hours=12):
        stamped -= datetime.timedelta(days=1)
    return stamped.timestamp()


def time_ray_init() -> dict[str, float]:
    """What a running cluster already has done: `import ray` and `ray.init` of a local 2-CPU Ray, alone."""
    code = ("import json, time; t0 = time.perf_counter(); import ray; t1 = time.perf_counter(); "
            "ray.init(num_cpus=2, include_dashboard=False); t2 = time.perf_counter(); ray.shutdown(); "
            "print('RAYINIT ' + json.dumps({'import_ray_s': t1 - t0, 'ray_init_s': t2 - t1}))")
    started = time.time()
    output = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    figures = json.loads(next(line for line in output.splitlines() if line.startswith("RAYINIT "))[8:])
    return {**figures, "wall_s": time.time() - started}


# --- the table --------------------------------------------------------------------------------


def per_epoch(run: dict[str, Any]) -> str:
    return ", ".join(f"{e['images_per_s']:.1f}" for e in run["epochs"] if e["epoch"] in run["timed_epochs"])


def report(rounds: list[dict[str, Any]], epochs: int, global_batch: int) -> dict[str, Any]:
    seg = statistics.median(r["segjob"]["images_per_s"] for r in rounds)
    ref = statistics.median(r["torchrun"]["images_per_s"] for r in rounds)
    timed = "epochs 2.." + str(epochs) if epochs > 1 else "epoch 1 (no warm-up excluded)"
    print(f"\nimg/s: median over {timed} of one run; start->loop: Popen to the start of epoch 1's training loop; "
          "wall: Popen to exit")
    print("| round | segjob img/s | torchrun img/s | segjob start→loop | torchrun start→loop | segjob wall "
          "| torchrun wall |")
    print("|---|---|---|---|---|---|---|")
    for number, r in enumerate(rounds, start=1):
        s, t = r["segjob"], r["torchrun"]
        print(f"| {number} | {s['images_per_s']:.1f} ({per_epoch(s)}) | {t['images_per_s']:.1f} ({per_epoch(t)}) "
              f"| {s['start_to_loop_s']:.1f} s | {t['start_to_loop_s']:.1f} s "
              f"| {s['wall_s']:.1f} s | {t['wall_s']:.1f} s |")
    median = lambda side, key: statistics.median(r[side][key] for r in rounds)  # noqa: E731
    print(f"| median | {seg:.1f} ({1000 * global_batch / seg:.0f} ms/step) "
          f"| {ref:.1f} ({1000 * global_batch / ref:.0f} ms/step) "
          f"| {median('segjob', 'start_to_loop_s'):.1f} s | {median('torchrun', 'start_to_loop_s'):.1f} s "
          f"| {median('segjob', 'wall_s'):.1f} s | {median('torchrun', 'wall_s'):.1f} s |")
    ratio = ref / seg
    print(f"\ntorchrun img/s / segjob img/s = {ratio:.3f}  (goal <= 1.02)")
    sides = ["segjob", "torchrun"] + (["torchrun+agree"] if rounds[0].get("torchrun+agree") else [])
    cpu_step = {side: statistics.median(r[side]["cpu_in_timed_epochs"]["ranks_cpu_ms_per_step"] for r in rounds)
                for side in sides}
    print(f"training ranks' CPU per step (both ranks): segjob {cpu_step['segjob']:.0f} ms, torchrun "
          f"{cpu_step['torchrun']:.0f} ms, segjob / torchrun = {cpu_step['segjob'] / cpu_step['torchrun']:.3f}")
    print("\nCPU seconds during the timed epochs: the 2 training ranks / the command's other processes / "
          "everything else on the machine (other sessions):")
    for number, r in enumerate(rounds, start=1):
        for side in sides:
            cpu = r[side]["cpu_in_timed_epochs"]
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(cpu["others_by_process"].items())[:4])
            print(f"  round {number} {side:14s}: {cpu['window_s']:.1f} s x {os.cpu_count()} cores, "
                  f"ranks {cpu['ranks_cpu_s']:.1f} CPU-s ({cpu['ranks_cpu_ms_per_step']:.0f} ms/step), "
                  f"others {cpu['others_cpu_s']:.1f} CPU-s ({top}), "
                  f"outside this command {cpu['outside_cpu_s']:.1f} CPU-s")
    for number, r in enumerate(rounds, start=1):
        s = r["segjob"]["markers_s"]
        line = ", ".join(f"{k} {v:.1f} s" for k, v in s.items() if v is not None)
        lag = r["segjob"]["start_to_loop_lag_bound_s"]
        print(f"  round {number} segjob markers after Popen: {line}; loop start {r['segjob']['start_to_loop_s']:.1f} s "
              f"(log forwarding lag <= {lag:.2f} s)")
        t = r["torchrun"]
        print(f"  round {number} torchrun markers after Popen: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in t["markers_s"].items()))
        if r.get("ray_init"):
            print(f"  round {number} `import ray` {r['ray_init']['import_ray_s']:.1f} s + "
                  f"`ray.init(num_cpus=2, include_dashboard=False)` {r['ray_init']['ray_init_s']:.1f} s alone")
    summary = {}
    if "torchrun+agree" in sides:
        agreed = statistics.median(r["torchrun+agree"]["images_per_s"] for r in rounds)
        print("torchrun + agree() per round: " + ", ".join(
            f"{r['torchrun+agree']['images_per_s']:.1f} ({per_epoch(r['torchrun+agree'])})" for r in rounds)
              + f"; median {agreed:.1f} img/s; torchrun / torchrun+agree = {ref / agreed:.3f}; "
              f"CPU per step {cpu_step['torchrun+agree']:.0f} ms")
        summary = {"torchrun_agree_images_per_s": agreed, "ratio_torchrun_over_torchrun_agree": ref / agreed}
    return {**summary, "segjob_images_per_s": seg, "torchrun_images_per_s": ref, "ratio_torchrun_over_segjob": ratio,
            "ranks_cpu_ms_per_step": cpu_step,
            "cpu_per_step_segjob_over_torchrun": cpu_step["segjob"] / cpu_step["torchrun"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default="jobs/quickstart.yaml", help="job file, relative to the repository")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the raw figures here")
    parser.add_argument("--logs", help="keep each command's output here (default: a temporary folder)")
    parser.add_argument("--no-ray-init", action="store_true", help="skip timing `ray.init` alone after each round")
    parser.add_argument("--agree-variant", action="store_true",
                        help="diagnostic: a third run per round, the torchrun loop plus the per-step flag "
                             "all-reduce of the engine's agree() (ddp_reference_loop.py --with-agree)")
    args = parser.parse_args()

    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="ddp-overhead-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    rounds = []
    began = time.time()
    for number in range(1, args.rounds + 1):
        segjob = run_segjob(args.job, args.epochs, logs, f"round{number}-segjob")
        print(f"round {number}: segjob {segjob['images_per_s']:.1f} img/s ({per_epoch(segjob)}), "
              f"start->loop {segjob['start_to_loop_s']:.1f} s, wall {segjob['wall_s']:.1f} s", flush=True)
        reference = run_reference(args.job, args.epochs, logs, f"round{number}-torchrun")
        print(f"round {number}: torchrun {reference['images_per_s']:.1f} img/s ({per_epoch(reference)}), "
              f"start->loop {reference['start_to_loop_s']:.1f} s, wall {reference['wall_s']:.1f} s", flush=True)
        variant = None
        if args.agree_variant:
            variant = run_reference(args.job, args.epochs, logs, f"round{number}-torchrun-agree", with_agree=True)
            print(f"round {number}: torchrun+agree {variant['images_per_s']:.1f} img/s ({per_epoch(variant)}), "
                  f"wall {variant['wall_s']:.1f} s", flush=True)
        ray_init = None if args.no_ray_init else time_ray_init()
        rounds.append({"segjob": segjob, "torchrun": reference, "torchrun+agree": variant, "ray_init": ray_init})
    summary = report(rounds, args.epochs, global_batch_size(args.job))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "nproc": os.cpu_count(), "started": began, "seconds": time.time() - began,
            "logs": str(logs), "summary": summary, "rounds": rounds,
        }, indent=1))
        print(f"\nraw figures: {args.json}")
    print(f"logs: {logs}")


if __name__ == "__main__":
    main()
