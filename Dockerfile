# CPU image by default; for CUDA: docker build --build-arg BASE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04 .
ARG BASE=python:3.11-slim
FROM ${BASE}
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN if ! command -v python3 >/dev/null; then apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-pip python3-venv && rm -rf /var/lib/apt/lists/*; fi
WORKDIR /opt/poisonscan
COPY pyproject.toml README.md ./
COPY poisonscan ./poisonscan
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install . && /opt/venv/bin/poisonscan --help
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /work
ENTRYPOINT ["poisonscan"]
CMD ["--help"]
