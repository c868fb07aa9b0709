# syntax=docker/dockerfile:1
# allconv on an official CUDA-enabled PyTorch image. Build: docker build -t allconv .
# Run:   docker run --gpus all -v "$PWD:/work" allconv train --dataset fake --epochs 2
#        (runs, checkpoints and models land in ./mlruns + ./mlflow.db of the mounted folder)
# Scale: docker compose up --scale worker=4   (see docker-compose.yml and docs/scaling.md)
#
# The base pins CUDA/cuDNN and Python; torch itself comes from the package's pinned dependencies
# (pyproject.toml: torch==2.14.1, wheels with their own CUDA 13 libraries), so the image matches `pip install .`
# elsewhere. With a base image that already has torch 2.14.1 the pip step reuses it:
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:<2.14.1 tag>-runtime -t allconv .
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ALLCONV_DATA_DIR=/data \
    ALLCONV_CACHE_DIR=/work/.cache/allconv \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/allconv
# Dependencies first (their own layer: torch is gigabytes and changes rarely), then the package itself.
COPY pyproject.toml ./
RUN python -c "import importlib.util as u; \
t = __import__('tomllib') if u.find_spec('tomllib') else __import__('pip._vendor.tomli', fromlist=['loads']); \
print('\n'.join(t.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY . .
RUN pip install . \
    && install -m 0755 scripts/worker-entrypoint.sh /usr/local/bin/allconv-worker \
    && allconv --version

# A non-root user. It owns /work (runs, mlflow.db, caches; a volume) and the mount points docker-compose.yml puts
# named volumes on (a new named volume takes the owner of the image's folder it is mounted over).
RUN useradd --create-home --uid 1000 --shell /bin/bash allconv \
    && mkdir -p /work /data /cache /mlartifacts /var/lib/allconv/gpu-locks \
    && chown allconv:allconv /work /data /cache /mlartifacts /var/lib/allconv/gpu-locks
USER allconv
WORKDIR /work
VOLUME ["/work"]

ENTRYPOINT ["allconv"]
CMD ["--help"]
