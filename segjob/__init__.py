"""segjob: preemption-tolerant distributed training of semantic-segmentation models."""

__version__ = "0.1.0"
