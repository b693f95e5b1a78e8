# syntax=docker/dockerfile:1
# The tunefleet image for Ray clusters on Kubernetes (KubeRay head, workers, RayJob submitter,
# RayService): CUDA, Python 3.11, the pinned dependencies of pyproject.toml, a non-root user.
# Build from the repository root (no GPU needed to build):
#   docker build -t registry.example.com/ml/tunefleet:0.1.0 .
#   docker push registry.example.com/ml/tunefleet:0.1.0
#
# The CUDA base matches torch's own CUDA (torch 2.14.1 wheels: CUDA 13.0). The devel flavour carries
# nvcc, which DeepSpeed needs to JIT-compile its CUDA ops on first use; torch brings its own runtime
# libraries, so only the driver comes from the node (NVIDIA container toolkit / GPU operator).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 (the version tunefleet's pins were measured with); bash and wget for KubeRay's
# container command and default probes; a compiler for DeepSpeed's ops.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv python3.11-dev build-essential ninja-build \
      bash wget ca-certificates tini \
 && apt-get purge -y software-properties-common gpg-agent \
 && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*

# The user the pods run as (runAsUser/runAsGroup 1000 in k8s/). Ubuntu images ship `ubuntu` with that uid.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 tunefleet \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash tunefleet

# A virtual environment first on PATH; KubeRay starts Ray through `bash -lc`, so a login shell gets it too.
ENV VIRTUAL_ENV=/opt/tunefleet
ENV PATH=/opt/tunefleet/bin:${PATH}
RUN python3.11 -m venv ${VIRTUAL_ENV} \
 && pip install --upgrade "pip>=24" "setuptools>=68" wheel \
 && echo 'export PATH=/opt/tunefleet/bin:$PATH' > /etc/profile.d/tunefleet.sh

WORKDIR /tmp/tunefleet-src
# Dependencies first, in their own layer: only a pyproject.toml change rebuilds it. The pins are
# pyproject.toml's (torch/torchvision as a pair, transformers, Ray, DeepSpeed, ...).
COPY pyproject.toml README.md ./
RUN mkdir cluster training serving \
 && touch cluster/__init__.py training/__init__.py serving/__init__.py \
 && pip install . \
 && pip uninstall -y tunefleet
# Then the code itself.
COPY cluster cluster
COPY training training
COPY serving serving
RUN pip install --no-deps . \
 && pip check \
 && cd / && rm -rf /tmp/tunefleet-src \
 && python -c "import cluster.cli, training.run, serving.app"

# Every path the pods write to is a volume there (k8s/: /tmp, ~/.cache, /dev/shm, the run storage),
# so the root filesystem can be read-only.
ENV HOME=/home/tunefleet \
    HF_HOME=/home/tunefleet/.cache/huggingface \
    TORCH_EXTENSIONS_DIR=/home/tunefleet/.cache/torch_extensions \
    TRITON_CACHE_DIR=/home/tunefleet/.cache/triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    RAY_USAGE_STATS_ENABLED=0 \
    TUNEFLEET_NO_PROGRESS=1
USER 1000:1000
WORKDIR /home/tunefleet
# Ray GCS, dashboard / Jobs API, Ray client, Ray Serve HTTP.
EXPOSE 6379 8265 10001 8000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["tunefleet", "--help"]
