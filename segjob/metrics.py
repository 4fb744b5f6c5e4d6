"""Segmentation metrics, every one derived from a single confusion matrix.

    confusion = ConfusionMatrix(num_classes, device=device)
    for images, masks in loader:
        confusion.update(masks, model(images).argmax(1))
    confusion.all_reduce()                      # once, after the last update (DDP)
    history.append(confusion.summary(class_names))   # {"val/miou": ..., "val/iou/pet": ...}

The matrix counts pixels: row = ground-truth class, column = predicted class. Pixels whose
ground truth is the ignore value count for nothing, whatever was predicted there.
Summing matrices over batches and ranks is exact, so a distributed evaluation gives the
same figures as a single-process one over the same samples.

A class absent from both the ground truth and the predictions has no IoU or Dice (nan);
the means (mIoU, mean Dice) skip it, as torchvision and most papers do. A class that is
predicted but never present gets IoU 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .constants import IGNORE_INDEX


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"ConfusionMatrix needs num_classes >= 1 (got {num_classes})")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class label (num_classes={num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        """Count one batch: target and prediction are integer label maps of the same shape ([N, H, W])."""
        if target.shape != prediction.shape:
            raise ValueError(f"target {tuple(target.shape)} and prediction {tuple(prediction.shape)} differ in shape")
        if target.is_floating_point() or prediction.is_floating_point():
            raise TypeError("ConfusionMatrix.update takes integer label maps (use logits.argmax(1) for predictions)")
        n = self.num_classes
        target = target.reshape(-1).long()  # before any arithmetic: uint8 masks would overflow
        prediction = prediction.reshape(-1).to(target.device, torch.long)
        counted = target != self.ignore_index
        bad_target = counted & ((target < 0) | (target >= n))
        bad_prediction = counted & ((prediction < 0) | (prediction >= n))
        if bool((bad_target | bad_prediction).any()):  # one host sync per batch; evaluation only
            if bool(bad_target.any()):
                value = int(target[bad_target][0])
                raise ValueError(
                    f"target label {value} is outside 0..{n - 1} and is not the ignore value {self.ignore_index}"
                )
            value = int(prediction[bad_prediction][0])
            raise ValueError(f"predicted label {value} is outside 0..{n - 1}")
        # Ignored pixels go to an extra bin n*n that is dropped, which avoids a boolean-mask copy.
        cells = torch.where(counted, target * n + prediction, n * n)
        counts = torch.bincount(cells, minlength=n * n + 1)[: n * n]
        self.mat += counts.view(n, n).to(self.mat.device)

    def reset(self) -> None:
        self.mat.zero_()

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks (in place); a no-op without torch.distributed. Call it once."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        mat = self.mat
        if dist.get_backend() == "nccl" and mat.device.type != "cuda":  # NCCL reduces CUDA tensors only
            mat = mat.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(mat, op=dist.ReduceOp.SUM)
        if mat is not self.mat:
            self.mat.copy_(mat)

    def compute(self) -> dict:
        """iou, class_acc, dice: float64 CPU tensors [C] (nan where undefined); miou, pixel_acc, mean_dice: floats."""
        mat = self.mat.detach().to("cpu", torch.float64)  # float64: pixel counts exceed float32's 2**24 exactly
        true_positive = mat.diag()
        in_target = mat.sum(dim=1)
        in_prediction = mat.sum(dim=0)
        # 0/0 is nan in torch: a class with no pixels on either side has no score rather than 0 or 1.
        iou = true_positive / (in_target + in_prediction - true_positive)
        dice = 2 * true_positive / (in_target + in_prediction)
        class_acc = true_positive / in_target
        return {
            "iou": iou,
            "miou": torch.nanmean(iou).item(),
            "pixel_acc": (true_positive.sum() / mat.sum()).item(),
            "class_acc": class_acc,
            "dice": dice,
            "mean_dice": torch.nanmean(dice).item(),
        }

    def summary(self, class_names: list[str], prefix: str = "val") -> dict[str, float]:
        """Flat floats for reporting: {prefix}/miou, /pixel_acc, /dice (mean), /iou/<class>, /dice/<class>.

        Every class always has its keys, so every report carries the same names (Tune and
        checkpoint ranking need the metric in each result); a class absent from both the
        ground truth and the predictions so far reads nan.
        """
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names given for {self.num_classes} classes")
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class names repeat: {class_names}")
        stats = self.compute()
        result = {
            f"{prefix}/miou": stats["miou"],
            f"{prefix}/pixel_acc": stats["pixel_acc"],
            f"{prefix}/dice": stats["mean_dice"],
        }
        for name, iou in zip(class_names, stats["iou"].tolist()):
            result[f"{prefix}/iou/{name}"] = iou
        for name, dice in zip(class_names, stats["dice"].tolist()):
            result[f"{prefix}/dice/{name}"] = dice
        return result


def predict_labels(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Label maps int64 [N,H,W] from logits [N,C,H,W]: argmax, or sigmoid > threshold for one channel."""
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits[:, 0].float()) > threshold).long()
    return logits.argmax(dim=1)
