# Two images from one file:
#   docker build --target api    -t distill-api .     # FastAPI + migrations + CLI, no torch (small)
#   docker build --target worker -t distill-worker .  # Celery worker + PyTorch engine, CUDA build of torch
# docker-compose.yml builds both.

# ---- base: Python, an unprivileged user, and the project's dependency lists -------------------------
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/srv/distill/var

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin distill
WORKDIR /srv/distill

# Dependencies are installed from pyproject.toml before the source is copied, so editing code does not
# invalidate the (large) dependency layers. These lists are plain text read by pip in the stages below.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
open('/tmp/requirements-api.txt', 'w').write('\n'.join(p['dependencies']) + '\n'); \
open('/tmp/requirements-worker.txt', 'w').write('\n'.join(p['optional-dependencies']['worker']) + '\n')"

# ---- api: the REST service; never installs torch ----------------------------------------------------
FROM base AS api

RUN pip install -r /tmp/requirements-api.txt
COPY . .
# An editable install keeps app/ beside migrations/ (Alembic's scripts, found relative to app/), and puts
# the `distill` command on PATH. --no-deps: everything it needs is already installed above.
RUN pip install --no-deps -e . \
    && mkdir -p "$DATA_DIR" && chown distill:distill "$DATA_DIR"
USER distill
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# `distill api` execs uvicorn (app.main:app); API_WORKERS sets the process count (0 = one per CPU).
CMD ["distill", "api", "--host", "0.0.0.0", "--port", "8000"]

# ---- worker: Celery + the PyTorch engine, one process per GPU ---------------------------------------
FROM base AS worker

# Torch first, pinned. On Linux x86_64 the torch wheel on PyPI *is* the CUDA build (it pulls the nvidia-*
# runtime wheels, several GB), which is what a GPU worker wants; the host only needs the NVIDIA driver and
# container toolkit. To pick another CUDA line, build with e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
RUN pip install -r /tmp/requirements-api.txt -r /tmp/requirements-worker.txt
COPY . .
RUN pip install --no-deps -e . \
    && mkdir -p "$DATA_DIR" && chown distill:distill "$DATA_DIR"
# The NVIDIA runtime mounts the driver libraries and nvidia-smi (used by `distill worker --gpus all`).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    QUEUE=gpu
USER distill
CMD ["distill", "worker", "--gpus", "all"]
