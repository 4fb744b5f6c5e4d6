"""Learning curves of a run from its stored history, as PNGs and one HTML page. No Ray.

    python -m segjob.report runs/quickstart
    python -m segjob.report s3://bucket/runs/pets_unet --out report/pets_unet
    python -m segjob.report ./best                      # a checkpoint folder: its own history

RUN_URI is a run folder (`<storage.uri>/<job name>`) or a checkpoint folder, local, s3://
or gs://. The history is the newest committed checkpoint's history.jsonl, checked against
its meta.json (a damaged one is skipped for the one before). Written into --out:

    loss.png      train loss per epoch (and per logged step, faint), validation loss
    miou.png      validation mIoU and IoU per class
    lr.png        the learning rate at each epoch's end
    scores.png    pixel accuracy, mean class accuracy and Dice, when recorded
    previews.gif  the run's per-epoch predictions on fixed validation images, one frame per
                  <run>/previews/epoch-NNN.png (runs trained with train.preview_every_epochs)
    report.html   one page embedding the figures, with the last epoch's figures in a table
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import math
from pathlib import Path
from typing import Any

from segjob.errors import ArgumentParser, exits_cleanly_on_user_error, setup_logging
from segjob.results import figures
from segjob.results.arguments import check_output_folder
from segjob.results.preview_gif import write_preview_gif
from segjob.results.trained import locate, run_history

log = logging.getLogger("segjob")


def epoch_records(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per finished epoch (the last one written for it), in epoch order."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for record in history:
        if record.get("checkpoint") == "epoch" and isinstance(record.get("epoch"), (int, float)):
            by_epoch[int(record["epoch"])] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _number(value: Any) -> float | None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if is_number and math.isfinite(value) else None


def series(records: list[dict[str, Any]], key: str, x_key: str = "epoch") -> tuple[list[float], list[float]]:
    """(x, y) of the records that carry a finite `key`."""
    xs, ys = [], []
    for record in records:
        x, y = _number(record.get(x_key)), _number(record.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def curve(records: list[dict[str, Any]], key: str, label: str | None = None, **style: Any) -> list[figures.Curve]:
    xs, ys = series(records, key)
    return [figures.Curve(label or key, xs, ys, **style)] if xs else []


def learning_curves(history: list[dict[str, Any]], out: Path, title: str) -> dict[str, Path]:
    epochs = epoch_records(history)
    steps = [record for record in history if "train/step_loss" in record]
    written = {}

    loss = []
    if steps:  # every logged step, faint, behind the epoch means
        loss.append(figures.Curve("train/step_loss", *series(steps, "train/step_loss"), marker=None, alpha=0.35))
    loss += curve(epochs, "train/loss") + curve(epochs, "val/loss") + curve(epochs, "val_ema/loss")  # EMA: train.ema
    written["loss"] = figures.save(figures.line_plot(loss, f"{title}: loss", "loss"), out / "loss.png")

    class_keys = list(dict.fromkeys(key for record in epochs for key in record if key.startswith("val/iou/")))
    iou = curve(epochs, "val/miou", "val/miou", style="-", marker="o")
    iou += curve(epochs, "val_ema/miou", "val_ema/miou", style="-", marker="s")  # the EMA weights', with train.ema
    for key in class_keys:
        iou += curve(epochs, key, key[len("val/iou/"):], style="--", marker=None, alpha=0.8)
    written["miou"] = figures.save(figures.line_plot(iou, f"{title}: validation IoU", "IoU"), out / "miou.png")

    lr = curve(epochs, "lr")
    lrs = [y for c in lr for y in c.y if y > 0]
    log_scale = bool(lrs) and max(lrs) / min(lrs) > 20
    written["lr"] = figures.save(figures.line_plot(lr, f"{title}: learning rate", "lr", log_y=log_scale),
                                 out / "lr.png")

    scores = curve(epochs, "val/pixel_acc") + curve(epochs, "val/mean_acc") + curve(epochs, "val/dice")
    if scores:
        written["scores"] = figures.save(figures.line_plot(scores, f"{title}: validation scores", "score"),
                                         out / "scores.png")
    return written


def html_page(title: str, source: str, pictures: dict[str, Path], last: dict[str, Any] | None) -> str:
    def embedded(path: Path) -> str:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        kind = "gif" if path.suffix == ".gif" else "png"
        return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/{kind};base64,{data}"></figure>'

    rows = ""
    if last:
        for key, value in last.items():
            if key == "checkpoint":
                continue
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            rows += f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(shown)}</td></tr>\n"
    table = f"<h2>Last epoch</h2>\n<table>\n{rows}</table>" if rows else "<p>No epoch has finished yet.</p>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:2em auto}} figure{{display:inline-block;margin:0.5em}}
img{{max-width:600px}} th{{text-align:left;padding-right:2em}} td{{font-family:monospace}}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>History of {html.escape(source)}</p>
{''.join(embedded(path) for path in pictures.values())}
{table}
</body>
</html>
"""


def write_report(uri: str, out: Path, endpoint_url: str | None = None) -> dict[str, Path]:
    history, source = run_history(uri, endpoint_url)
    title = source.rstrip("/").split("/checkpoints/")[0].rsplit("/", 1)[-1]
    out.mkdir(parents=True, exist_ok=True)
    pictures = learning_curves(history, out, title)
    storage, path = locate(uri, endpoint_url)
    run_path = path.rstrip("/").split("/checkpoints/")[0]  # a checkpoint folder of a run: its run's previews
    gif = write_preview_gif(storage, run_path, out / "previews.gif")
    if gif:
        pictures["previews"] = gif
    epochs = epoch_records(history)
    page = out / "report.html"
    page.write_text(html_page(title, source, pictures, epochs[-1] if epochs else None))
    return {**pictures, "html": page}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m segjob.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", metavar="RUN_URI", help="a run folder or checkpoint folder: local, s3:// or gs://")
    parser.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: ./report)")
    parser.add_argument("--endpoint-url", default=None, help="S3/GCS endpoint (MinIO, emulators)")
    return parser.parse_args(argv)


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    check_output_folder(args.out, "--out")
    written = write_report(args.run, args.out, args.endpoint_url)
    log.info("wrote %s to %s", ", ".join(path.name for path in written.values()), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
