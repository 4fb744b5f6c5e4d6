# segjob on a CUDA PyTorch base whose torch matches constraints.txt (torch 2.14.1, CUDA 13.0 like
# the pinned nvidia-* wheels). The host needs an NVIDIA driver that supports CUDA 13.
#   docker build -t segjob:0.1.0 .
# Used by every file in infra/. No credentials inside: instance roles, service accounts or
# Workload Identity supply them at run time, and .dockerignore keeps key files out of the context.
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false

# A failing command inside a pipe fails the build.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# rsync and ssh: Ray's cluster launcher copies its files into the container with rsync, and the
# autoscaler on the head sets up new worker nodes over ssh. Versions come with the base image's Ubuntu.
# User `ray` with uid 1000 as in Ray's own images (numeric, so Kubernetes' runAsNonRoot can check
# it); a base image that already has a uid-1000 user (Ubuntu 24.04's `ubuntu`) gives it up first.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-client rsync \
    && rm -rf /var/lib/apt/lists/* \
    && if getent passwd 1000 > /dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi \
    && useradd --create-home --uid 1000 --shell /bin/bash ray

WORKDIR /opt/segjob

# Dependencies first (pinned by constraints.txt), so a source change doesn't reinstall them.
COPY constraints.txt pyproject.toml README.md ./
COPY segjob/__init__.py segjob/__init__.py
RUN pip install -c constraints.txt ".[onnx]"

# Then the source, and the job files (python -m segjob.tune /opt/segjob/jobs/X.yaml).
COPY segjob/ segjob/
COPY jobs/ jobs/
RUN pip install --no-deps -c constraints.txt .

# The cluster launcher reads HOME from the image to place its files in the container.
ENV HOME=/home/ray
USER 1000
WORKDIR /home/ray
CMD ["python", "-m", "segjob.train", "--help"]
