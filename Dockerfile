# loraserve, serving the demo that ships (demo/base + adapters/) on port 8000.
#   CPU (default):  docker build -t loraserve .
#   CUDA:           docker build -t loraserve:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX_URL=https://pypi.org/simple .   # PyPI's Linux torch is the CUDA build
#                   docker run --gpus all -p 8000:8000 loraserve:cuda
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where pip finds torch: the CPU wheels by default, so a CPU image does not carry GBs of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    DEBIAN_FRONTEND=noninteractive

# make drives the install; g++ builds the fused CPU LoRA op; CUDA images also lack Python (python:*-slim
# images have it).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make g++ \
    && if ! command -v python3 >/dev/null; then apt-get install -y --no-install-recommends python3 python3-venv; fi \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . .
# The same install path as CI (.ci/run): the Makefile creates .venv and installs the project into it.
RUN make install
# Build the fused CPU LoRA op now rather than at the first start (cached under ~/.cache/torch_extensions;
# its name carries the instruction set, so a host without AVX2 builds its own instead of loading this one).
RUN .venv/bin/python -c "from server.lora.cpu_kernel import load_cpu_kernel; load_cpu_kernel()"

EXPOSE 8000
# The process answers once the model is loaded (the app's startup loads it before accepting connections).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD [".venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
CMD [".venv/bin/loraserve", "serve", "--host", "0.0.0.0"]
