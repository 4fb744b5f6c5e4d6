"""Training-step throughput and peak memory per architecture, beside segmentation_models_pytorch.

    .venv/bin/python bench/models.py                                   # CPU, the full list, 256x256
    .venv/bin/python bench/models.py --only unet-r50 --batch 2 --steps 3 --rounds 2 --threads 1
    .venv/bin/python bench/models.py --device cuda --modes fp32,amp,channels_last,amp+channels_last

A step is forward, cross-entropy (plus 0.4 x the auxiliary loss for PSPNet), backward and
zero_grad on a random batch: the model's own cost, no data loading and no optimizer.
On CPU a step's time is the process's CPU time (with one intra-op thread, what the step
cost, however busy the shared machine was; wall time is printed beside it); on CUDA it is
wall time after synchronising. Every (model, mode) is measured in a fresh process, so its
peak memory is its own: on CPU
the growth of the resident set during the steps (activations, gradients and workspace on top
of the weights), on CUDA torch.cuda.max_memory_allocated. Rounds alternate segjob and its smp
peer so drift on a shared machine hits both alike; the ratio of medians is what counts
(goal: segjob's U-Net-R50 step <= 1.0x smp's Unet-R50). Encoders are randomly initialised on
both sides (smp with encoder_weights=None): nothing is downloaded.

Peers: smp.Unet on the same encoder (its decoder: nearest up-sampling, then two convs on
[up, skip], widths 256..16, the same widths as segjob's default decoder_channels), and
smp.PSPNet, which is not the paper's structure: it stops at layer2 (encoder_depth 3) without
dilation and pools 512 channels, so it costs a fraction of the published PSPNet that segjob
builds; its figures are context, not a target.

The modern encoders' peers are smp's timm-backed ("tu-") Unet on the same architecture
(timm's convnext_tiny, tf_efficientnetv2_s, regnety_008, regnetx_016: the same layers as
torchvision's up to padding details); smp's Unet starts ConvNeXt's decoder at stride 4 too.
smp.DeepLabV3Plus (output stride 16) makes its ASPP and decoder convs depthwise-separable,
where segjob's keeps the plain convs of the paper's ResNet variant: a lighter peer.
smp.DeepLabV3 (output stride 8, like torchvision's deeplabv3_resnet50) has no auxiliary head,
and neither has torchvision's here (aux_weight 0). fcn, deeplabv3_mobilenet and lraspp have
no smp counterpart.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NUM_CLASSES = 21  # VOC's; the class count barely moves these figures


@dataclass(frozen=True)
class Candidate:
    name: str
    segjob_model: dict[str, Any]  # the job's model section
    peer: str | None = None  # a key of PEERS, or no smp counterpart


CANDIDATES = [
    Candidate("unet-plain", {"name": "unet", "base_channels": 64, "depth": 4}),
    Candidate("unet-r50", {"name": "unet", "encoder": "resnet50"}, peer="smp-unet-r50"),
    Candidate("unet-r50-se", {"name": "unet", "encoder": "resnet50", "se": True}, peer="smp-unet-r50"),
    Candidate("unet-mobilenet_v2", {"name": "unet", "encoder": "mobilenet_v2"}, peer="smp-unet-mobilenet_v2"),
    Candidate("pspnet-r50", {"name": "pspnet", "encoder": "resnet50"}, peer="smp-pspnet-r50"),
    Candidate("segnet-vgg16_bn", {"name": "segnet"}),
    Candidate("segnet-pets", {"name": "segnet", "stages": 4, "input_batchnorm": True}),
    Candidate("unet-convnext_tiny", {"name": "unet", "encoder": "convnext_tiny"}, peer="smp-unet-convnext_tiny"),
    Candidate("unet-efficientnet_v2_s", {"name": "unet", "encoder": "efficientnet_v2_s"},
              peer="smp-unet-efficientnetv2_s"),
    Candidate("unet-regnet_y_800mf", {"name": "unet", "encoder": "regnet_y_800mf"}, peer="smp-unet-regnety_008"),
    Candidate("unet-regnet_x_1_6gf", {"name": "unet", "encoder": "regnet_x_1_6gf"}, peer="smp-unet-regnetx_016"),
    Candidate("deeplabv3plus-r50", {"name": "deeplabv3plus", "encoder": "resnet50"}, peer="smp-deeplabv3plus-r50"),
    Candidate("deeplabv3_resnet50", {"name": "deeplabv3_resnet50"}, peer="smp-deeplabv3-r50"),
    Candidate("fcn_resnet50", {"name": "fcn_resnet50"}),
    Candidate("deeplabv3_mobilenet_v3_large", {"name": "deeplabv3_mobilenet_v3_large"}),
    Candidate("lraspp_mobilenet_v3_large", {"name": "lraspp_mobilenet_v3_large"}),
]


def _smp(kind: str, encoder: str) -> Callable[[], Any]:
    def build():
        import segmentation_models_pytorch as smp

        return getattr(smp, kind)(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=NUM_CLASSES)

    return build


PEERS = {
    "smp-unet-r50": _smp("Unet", "resnet50"),
    "smp-unet-mobilenet_v2": _smp("Unet", "mobilenet_v2"),
    "smp-pspnet-r50": _smp("PSPNet", "resnet50"),
    # timm's builds of the same architectures through smp's "tu-" encoders
    "smp-unet-convnext_tiny": _smp("Unet", "tu-convnext_tiny"),
    "smp-unet-efficientnetv2_s": _smp("Unet", "tu-tf_efficientnetv2_s"),
    "smp-unet-regnety_008": _smp("Unet", "tu-regnety_008"),
    "smp-unet-regnetx_016": _smp("Unet", "tu-regnetx_016"),
    "smp-deeplabv3plus-r50": _smp("DeepLabV3Plus", "resnet50"),
    "smp-deeplabv3-r50": _smp("DeepLabV3", "resnet50"),
}


def build_model(which: str):
    """A segjob candidate's name, or an smp peer's."""
    if which in PEERS:
        return PEERS[which]()
    from segjob.job.load import validate_job
    from segjob.models import create_model

    candidate = next(c for c in CANDIDATES if c.name == which)
    return create_model(validate_job({"name": "bench", "model": candidate.segjob_model}).model, 3, NUM_CLASSES)


def measure(which: str, mode: str, device: str, batch: int, size: int, steps: int, threads: int) -> dict[str, float]:
    """Runs in its own process: warm-up step, then `steps` timed steps."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(which).to(device).train()
    parameters = sum(p.numel() for p in model.parameters())
    memory_format = torch.channels_last if "channels_last" in mode else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    target = torch.randint(0, NUM_CLASSES, (batch, size, size), device=device)
    amp_dtype = torch.bfloat16 if device == "cpu" else torch.float16
    scaler = torch.amp.GradScaler(device, enabled="amp" in mode and amp_dtype == torch.float16)

    def step() -> None:
        with torch.autocast(device, dtype=amp_dtype, enabled="amp" in mode):
            output = model(images)
        if isinstance(output, dict):
            loss = F.cross_entropy(output["out"].float(), target) + 0.4 * F.cross_entropy(output["aux"].float(), target)
        else:
            loss = F.cross_entropy(output.float(), target)
        scaler.scale(loss).backward()
        model.zero_grad(set_to_none=True)

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rss_before_kib = _rss_kib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up: allocator, cuDNN/oneDNN algorithm choice
    synchronize()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    synchronize()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024
    step_seconds = (cpu_seconds if device == "cpu" else seconds) / steps
    return {"images_per_s": batch / step_seconds, "ms_per_step": 1000 * step_seconds,
            "wall_ms_per_step": 1000 * seconds / steps, "peak_mib": peak_mib, "parameters": parameters}


def _rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() // 1024


def _measure_in_child(args: tuple) -> dict[str, float]:
    return measure(*args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--modes", default=None, help="comma-separated: fp32, amp, channels_last, amp+channels_last "
                        "(default: fp32 on CPU, all four on CUDA)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated candidates (default all): {', '.join(c.name for c in CANDIDATES)}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurements per (model, mode), alternating with the peer")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    args = parser.parse_args(argv)
    modes = (args.modes or ("fp32" if args.device == "cpu" else "fp32,amp,channels_last,amp+channels_last")).split(",")
    wanted = set(args.only.split(",")) if args.only else None
    candidates = [c for c in CANDIDATES if wanted is None or c.name in wanted]

    import torch

    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{platform.processor() or platform.machine()}, {args.threads} thread(s)")
    print(f"# torch {torch.__version__}, {where}; batch {args.batch} x 3 x {args.size} x {args.size}, "
          f"{args.steps} timed steps x {args.rounds} rounds")
    clock = "CPU time" if args.device == "cpu" else "wall"
    print(f"| model | mode | parameters | ms/step ({clock}) | img/s | wall ms/step | peak MiB "
          f"| peer | peer ms/step | peer peak MiB | step time / peer's |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    context = multiprocessing.get_context("spawn")  # a fresh process per measurement: its own peak memory
    with context.Pool(1, maxtasksperchild=1) as pool:
        for candidate in candidates:
            for mode in modes:
                ours, peers = [], []
                for _ in range(args.rounds):
                    common = (mode, args.device, args.batch, args.size, args.steps, args.threads)
                    ours.append(pool.apply(_measure_in_child, ((candidate.name, *common),)))
                    if candidate.peer:
                        peers.append(pool.apply(_measure_in_child, ((candidate.peer, *common),)))
                print(_row(candidate, mode, ours, peers), flush=True)


def _row(candidate: Candidate, mode: str, ours: list[dict], peers: list[dict]) -> str:
    def median(results: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in results)

    step_ms = median(ours, "ms_per_step")
    cells = [candidate.name, mode, f"{ours[0]['parameters'] / 1e6:.2f} M", f"{step_ms:.0f}",
             f"{median(ours, 'images_per_s'):.2f}", f"{median(ours, 'wall_ms_per_step'):.0f}",
             f"{max(r['peak_mib'] for r in ours):.0f}"]
    if peers:
        peer_ms = median(peers, "ms_per_step")
        cells += [f"{candidate.peer} ({peers[0]['parameters'] / 1e6:.2f} M)", f"{peer_ms:.0f}",
                  f"{max(r['peak_mib'] for r in peers):.0f}", f"**{step_ms / peer_ms:.2f}**"]
    else:
        cells += ["-", "-", "-", "-"]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
