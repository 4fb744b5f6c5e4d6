# segjob on a CUDA PyTorch base whose torch matches constraints.txt (2.14.1, CUDA 13.0 like the wheel in constraints.txt).
# Build: docker build -t segjob .      Used by the cluster configs in infra/.
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false

WORKDIR /opt/segjob

# Dependencies first, so a source change doesn't reinstall them.
COPY constraints.txt pyproject.toml README.md ./
COPY segjob/__init__.py segjob/__init__.py
RUN pip install -c constraints.txt .

COPY segjob/ segjob/
COPY jobs/ jobs/
RUN pip install --no-deps -c constraints.txt .

# No credentials in the image: instance roles / service accounts / env at run time.
RUN useradd --create-home --uid 1000 ray
USER ray
WORKDIR /home/ray
CMD ["python", "-m", "segjob.train", "--help"]
