# Test-only stand-in for the official PyTorch base (pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime), which cannot be
# pulled where no image registry is reachable: Debian bookworm (debootstrap) with Python in /opt/venv first on PATH
# (`python` and `pip`, as in the official image) and PyPI's torch/torchvision builds pinned by pyproject.toml (CUDA
# wheels: they run on CPU too). Built and cached by scripts/docker-test.sh, never shipped.
ARG DEBIAN_IMAGE=allconv-test/debian:bookworm
FROM ${DEBIAN_IMAGE}

ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
# The host's CA bundle: outgoing HTTPS may pass a proxy that re-signs it. Only this test image (and so the project
# image built on it in the test) trusts it.
COPY host-ca.crt /etc/ssl/certs/host-ca.crt
ENV PIP_CERT=/etc/ssl/certs/host-ca.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca.crt \
    SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt \
    PIP_INDEX_URL=${PIP_INDEX_URL} \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_DEFAULT_TIMEOUT=120 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:${PATH}

RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir -q "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
