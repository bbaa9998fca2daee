# stoker on a CUDA GPU: docker build -t stoker . && docker run --gpus all stoker stoker monitor --once
# A training run with its data and runs on the host:
#   docker run --gpus all --ipc=host -v "$PWD/data:/app/data" -v "$PWD/runs:/app/runs" stoker \
#     stoker train recipes/pretrain/tiny.yaml
# --ipc=host (or --shm-size=8g): the DataLoader workers stoker starts on a GPU share memory.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install -q --upgrade pip

# PyPI's Linux torch wheels are CUDA builds (they carry their own CUDA runtime libraries; the
# host needs only the NVIDIA driver). Another CUDA: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://pypi.org/simple
RUN pip install -q "$TORCH" --index-url "$TORCH_INDEX"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install -q ".[gpu,track]"
COPY recipes ./recipes
COPY scripts ./scripts
COPY docs ./docs

CMD ["stoker", "--help"]
