# saeforge node image: the same image runs the Ray head and every worker; `saeforge submit` sends
# jobs to it (docs/cluster.md). A job brings its own copy of the project
# (Ray's working_dir); the image supplies Python, torch, DeepSpeed, Ray and the packaged model and text.
#   CPU (default):  docker build -t saeforge .
#   CUDA:           docker build -t saeforge:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#                     --build-arg TORCH_SPEC="torch==2.6.0 --index-url https://download.pytorch.org/whl/cu124" \
#                     --build-arg DS_ACCELERATOR=cuda .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# A pip requirement for a GPU build of torch, installed before everything else (empty: the CPU
# build that constraints.txt pins).
ARG TORCH_SPEC=""
# DeepSpeed's accelerator: cpu, or cuda for a CUDA base (an empty value is an error in DeepSpeed).
ARG DS_ACCELERATOR=cpu
ENV DEBIAN_FRONTEND=noninteractive \
    VENV=/opt/saeforge/.venv \
    PATH=/opt/saeforge/.venv/bin:$PATH \
    DS_ACCELERATOR=${DS_ACCELERATOR} \
    RAY_USAGE_STATS_ENABLED=0 \
    WANDB_MODE=offline \
    PYTHONUNBUFFERED=1

# python3 for the CUDA bases, which have none; compilers for DeepSpeed's sdist and its JIT ops.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/saeforge
# scripts/setup.sh keeps a torch it finds in the venv, so a GPU build goes in first.
RUN python3 -m venv "$VENV" && if [ -n "$TORCH_SPEC" ]; then "$VENV/bin/pip" install --no-cache-dir $TORCH_SPEC; fi

# pip extras the set-up installs (scripts/setup.sh): none, the runtime alone. A node runs jobs,
# never the tests: the test extra would add pytest, SAELens, SeaweedFS and Debian's chromium.
ARG SAEFORGE_EXTRAS=""

# What the set-up installs from (editable: the three packages and conf/ stay here), then the code.
COPY pyproject.toml constraints.txt README.md Makefile ./
COPY scripts ./scripts
COPY trainer ./trainer
COPY activation_cache ./activation_cache
COPY cluster ./cluster
COPY interp ./interp
COPY conf ./conf
# Set even when empty: scripts/setup.sh installs the test extra only where the variable is unset.
RUN SAEFORGE_EXTRAS="${SAEFORGE_EXTRAS}" bash scripts/setup.sh && rm -rf /root/.cache/pip

# 6379: the GCS (workers join here); 8265: dashboard and Jobs API (`saeforge submit --address`);
# 10001: Ray Client (`cluster.address=ray://head:10001`).
EXPOSE 6379 8265 10001

# Head:   docker run --net=host --shm-size=8g -e RAY_AUTH_MODE=token -e RAY_AUTH_TOKEN -e AWS_ACCESS_KEY_ID \
#           -e AWS_SECRET_ACCESS_KEY saeforge ray start --head --block --port=6379 --dashboard-host=0.0.0.0
# Worker: docker run --net=host --shm-size=8g (the same -e ...) saeforge ray start --address=<head>:6379 --block
CMD ["saeforge", "--help"]
