# GPU image: reproduce the STEER paper's runs (README, "Reproduce the paper").
#   docker build -t steer-lab:gpu .
#   docker run --rm --gpus all --ipc=host -v "$PWD/runs:/runs" -v "$PWD/data:/data:ro" \
#       -v "$HOME/.cache/huggingface:/cache/huggingface" steer-lab:gpu +experiment=steer_math seed=2
# Everything after the image name is handed to `python src/run.py` (Hydra overrides, -m sweeps).
# Volumes: /runs (working directory: outputs/ and multirun/ with each run's MLflow store),
# /data (the datasets folder: math/*.parquet, code/*), /cache (Hugging Face hub cache, warm-up cache).
#
# The CUDA *devel* image: vLLM's and FlashInfer's kernels may be compiled at first use, which needs
# nvcc; the CUDA runtime that torch itself uses comes inside the torch wheel that vLLM pins.
FROM nvidia/cuda:12.8.1-devel-ubuntu24.04

# The vLLM release installed for the `vllm` extra; it pins the CUDA build of torch it runs with.
# It must accept the project's transformers range (pyproject.toml).
ARG VLLM_VERSION=0.33.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# make: the README's commands work inside the image too (the test suite expands them with make -n).
# tini: PID 1 that reaps orphans (the code reward's sandbox kills escaped daemons; as PID 1 the
# trainer itself would keep them as zombies). The base image's tag fixes the Ubuntu release; exact
# apt versions would break as its archive moves.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ca-certificates util-linux make tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The heavy layer first (vLLM, its torch and CUDA libraries), so that code changes rebuild in seconds.
RUN pip install "vllm==${VLLM_VERSION}"

WORKDIR /opt/steer-lab
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install -e ".[vllm,dev,data]"
# The rest of the checkout, after the install so that editing it rebuilds in seconds: the test
# suite reads all of it (the Makefile, the Dockerfiles, .ci/run, docs/).
COPY Makefile Dockerfile Dockerfile.cpu .dockerignore ./
COPY conf ./conf
COPY experiments ./experiments
COPY tests ./tests
COPY docs ./docs
COPY scripts ./scripts
COPY .ci ./.ci

# A non-root user (uid 1000, the usual first user of a Linux host, so mounted folders stay writable)
# that owns the checkout (the test suite writes outputs/ beside it); the base image's own uid-1000
# user makes way for it. The tests look for the data at ../shared/data from the project: /data.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 --shell /bin/bash steer \
    && mkdir -p /runs /data /cache/huggingface /cache/steer-lab /opt/shared \
    && ln -s /data /opt/shared/data \
    && chown -R steer:steer /runs /data /cache /opt/steer-lab

# GIT_PYTHON_REFRESH: no git in the image; MLflow would print GitPython's warning at every run.
ENV STEER_DATA_DIR=/data \
    HF_HOME=/cache/huggingface \
    STEER_CACHE=/cache/steer-lab \
    GIT_PYTHON_REFRESH=quiet
VOLUME ["/runs", "/data", "/cache"]
USER 1000:1000
WORKDIR /runs
ENTRYPOINT ["tini", "--", "python", "/opt/steer-lab/src/run.py"]
