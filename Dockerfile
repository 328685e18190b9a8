# syntax=docker/dockerfile:1
#
# deepclust serving image: TorchServe (Java 17) hosting the ONNX engine (onnxruntime-gpu), our Prometheus
# metrics, and the batch commands (`deepclust label`, `deepclust monitor`) for the Kubernetes Job/CronJob.
#
#   GPU (default): docker build -t deepclust:0.1.0-gpu .
#   CPU only:      docker build --build-arg RUNTIME_BASE=ubuntu:24.04 -t deepclust:0.1.0-cpu .
#
# onnxruntime-gpu 1.31.1 (pyproject.toml) is built against CUDA 13.0 and cuDNN 9 (its wheel links
# libcudart.so.13 and libcublas.so.13), so the GPU base is a CUDA 13.0 *runtime* image with cuDNN 9.
# The same wheel falls back to the CPU provider on the CPU base, so one Python environment serves both.
# Both bases are Ubuntu 24.04: the runtime packages below have the same names in either.
# The project needs Python 3.11 (requires-python), which Ubuntu 24.04 does not ship: the interpreter is
# taken from the official Python image of the build stage (glibc 2.36 there, 2.39 here: forward compatible).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG RUNTIME_BASE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------
# Build stage: a venv with the `serve` extra. Only wheels from the index (no compiler needed or present).
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python3.11 -m venv /opt/venv

# Sources only (see .dockerignore): the package is built into a wheel first, so that dependencies can be
# restricted to binary wheels while our own pure-Python package is still built from source.
COPY pyproject.toml README.md ./
COPY deepclust/ deepclust/
COPY serving/ serving/
COPY training/ training/
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && set -- /wheels/deepclust-*.whl \
    && /opt/venv/bin/pip install --only-binary=:all: "$1[serve]" \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib/python3.11/site-packages \
    && /opt/venv/bin/deepclust --help >/dev/null

# ---------------------------------------------------------------------------------------------------------
# Runtime stage: CUDA runtime (or plain Ubuntu), Java 17 JRE, the interpreter, the venv and the model store.
FROM ${RUNTIME_BASE} AS runtime

ARG RUNTIME_BASE
ARG APP_UID=10001
ARG APP_GID=10001

LABEL org.opencontainers.image.title="deepclust" \
      org.opencontainers.image.description="Deep image clustering service (ONNX Runtime on TorchServe)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${RUNTIME_BASE}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Java 17 headless JRE for TorchServe's frontend (no JDK: no javac), CA certificates, and the shared libraries
# the Python interpreter's extension modules link against (ssl, sqlite3, ctypes, lzma, bz2, zlib, expat, uuid).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        openjdk-17-jre-headless \
        ca-certificates \
        libssl3t64 \
        libsqlite3-0 \
        libffi8 \
        liblzma5 \
        libbz2-1.0 \
        zlib1g \
        libexpat1 \
        libuuid1 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /usr/local/bin/python3.11 /usr/local/bin/python3.11
COPY --from=build /usr/local/lib/libpython3.11.so.1.0 /usr/local/lib/libpython3.11.so.1.0
COPY --from=build /usr/local/lib/python3.11/ /usr/local/lib/python3.11/
COPY --from=build /opt/venv/ /opt/venv/

# A fixed numeric UID/GID (Kubernetes runAsUser/fsGroup use the same numbers). The writable directories are
# the only ones the service needs with a read-only root filesystem: /tmp (worker sockets, temp files), the
# cache (built .mar archives, per-instance TorchServe state and logs) and HOME/working directory.
RUN ldconfig \
    && ln -s python3.11 /usr/local/bin/python3 \
    && groupadd --system --gid "${APP_GID}" deepclust \
    && useradd --system --uid "${APP_UID}" --gid "${APP_GID}" --home-dir /var/lib/deepclust \
        --no-create-home --shell /usr/sbin/nologin deepclust \
    && mkdir -p /var/cache/deepclust /var/lib/deepclust \
    && chown "${APP_UID}:${APP_GID}" /var/cache/deepclust /var/lib/deepclust \
    && chmod 1777 /tmp \
    && /opt/venv/bin/python -c "import onnxruntime, ts, deepclust.cli"

# The default model (read-only, owned by root): model.onnx, model.int8.onnx, model.json.
COPY model_store/ /opt/deepclust/model_store/

# `deepclust serve` keeps its per-instance state (TorchServe config, logs, JVM temp files, token key file,
# metrics files) under DEEPCLUST_CACHE/serve/; TorchServe's worker sockets go to /tmp.
# The serving backend when nothing else chooses: `torchserve` (TorchServe's Java frontend + Python workers) or
# `engine` (our front runs the engine in its own worker processes; no JVM is started). `backend:` in the settings
# file (the Kubernetes ConfigMap) and `--backend` take precedence. Build with --build-arg SERVE_BACKEND=engine.
ARG SERVE_BACKEND=torchserve
ENV PATH=/opt/venv/bin:${PATH} \
    DEEPCLUST_SERVE_BACKEND=${SERVE_BACKEND} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/deepclust \
    DEEPCLUST_CACHE=/var/cache/deepclust

WORKDIR /var/lib/deepclust
VOLUME ["/tmp", "/var/cache/deepclust", "/var/lib/deepclust"]

USER 10001:10001

# 8080: inference API (GET /ping, POST /predictions/<model>); 8082: our Prometheus metrics (/metrics).
# The management API stays off.
EXPOSE 8080 8082

# urllib raises on any non-2xx answer, so only a 200 from /ping is healthy (no curl in the image); /ping answers
# 503 until the model has answered a real prediction, on either backend. Without a
# config the service listens on all interfaces, so token authorization is on: the check then sends the
# inference token from the instance's key file (same user, same container).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import glob, json, os, urllib.request as u; r = u.Request('http://127.0.0.1:8080/ping'); k = glob.glob(os.environ['DEEPCLUST_CACHE'] + '/serve/*-8080/key_file.json'); k and r.add_header('Authorization', 'Bearer ' + json.load(open(k[0]))['inference']['key']); u.urlopen(r, timeout=4)"]

# The only place where the service binds to all interfaces (inference API and our metrics endpoint): inside
# a container, loopback is unreachable from outside.
ENTRYPOINT ["deepclust", "serve", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0"]
CMD ["--model-store", "/opt/deepclust/model_store", "--model", "cifar10-lite0", "--port", "8080", "--metrics-port", "8082"]
