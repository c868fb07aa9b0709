# allconv on the official CUDA PyTorch image. Build: docker build -t allconv .
# Run:   docker run --gpus all -v "$PWD:/work" allconv train --dataset fake --epochs 2
#        (runs, checkpoints and models land in ./mlruns + ./mlflow.db of the mounted folder)
# Scale: docker compose up --scale worker=4   (see docker-compose.yml and docs/scaling.md)
#
# torch and torchvision are the base image's: the default base ships exactly the versions pyproject.toml pins, and
# the build installs only the other dependencies (pip fails, naming both versions, on a base with another torch).
# Another base with torch 2.14.1, e.g. a CUDA 12.x build for older drivers:
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime -t allconv .
# `make docker-test` builds this file on a local CPU stand-in for the base (tests/docker/torch-base.Dockerfile).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# GIT_PYTHON_REFRESH: there is no git in the image; MLflow would print GitPython's 15-line help on every run.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GIT_PYTHON_REFRESH=quiet \
    ALLCONV_DATA_DIR=/data \
    ALLCONV_CACHE_DIR=/work/.cache/allconv \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/allconv
# Dependencies first (their own layer: changes only with pyproject.toml), then the package itself without them.
# /tmp/constraints.txt pins the torch and torchvision that the base image has, so pip keeps them.
COPY pyproject.toml ./
RUN python -c "import importlib.util as u; \
t = __import__('tomllib') if u.find_spec('tomllib') else __import__('pip._vendor.tomli', fromlist=['loads']); \
print('\n'.join(t.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && python -c "import importlib.metadata as m; print('\n'.join(sorted({d.name + '==' + d.version \
for d in m.distributions() if d.name in ('torch', 'torchvision')})))" > /tmp/constraints.txt \
    && cat /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt -r /tmp/requirements.txt
COPY . .
RUN pip install --no-deps . \
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

# Ctrl-C's signal: allconv and `mlflow server` stop cleanly on it (a trial is checkpointed and re-queued), also as
# PID 1, where SIGTERM, Docker's default, would be ignored until the kill after the grace period.
STOPSIGNAL SIGINT
ENTRYPOINT ["allconv"]
CMD ["--help"]
