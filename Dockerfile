# saeforge node image: joins a Ray cluster as head or worker and runs saeforge jobs.
#   CPU (default):  docker build -t saeforge .
#   CUDA:           docker build -t saeforge:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#                     --build-arg TORCH_SPEC="torch==2.6.0 --index-url https://download.pytorch.org/whl/cu124" .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=""
ENV DEBIAN_FRONTEND=noninteractive \
    VENV=/opt/saeforge/.venv \
    PATH=/opt/saeforge/.venv/bin:$PATH \
    RAY_USAGE_STATS_ENABLED=0 \
    WANDB_MODE=offline \
    PYTHONUNBUFFERED=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/saeforge
# A GPU build of torch goes in first; scripts/setup.sh keeps a torch it finds in the venv.
RUN python3 -m venv "$VENV" && if [ -n "$TORCH_SPEC" ]; then "$VENV/bin/pip" install --no-cache-dir $TORCH_SPEC; fi

COPY pyproject.toml constraints.txt README.md Makefile ./
COPY scripts ./scripts
COPY trainer ./trainer
COPY activation_cache ./activation_cache
COPY cluster ./cluster
COPY conf ./conf
RUN bash scripts/setup.sh && rm -rf /root/.cache/pip

# Ray head:   docker run --net=host saeforge ray start --head --block --dashboard-host=0.0.0.0
# Ray worker: docker run --net=host saeforge ray start --address=<head>:6379 --block
CMD ["saeforge", "--help"]
