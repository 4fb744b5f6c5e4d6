"""Values shared by data, losses and metrics, defined once."""

# Label for pixels that count for nothing: padding, VOC's void, CamVid's unlabelled.
IGNORE_INDEX = 255
