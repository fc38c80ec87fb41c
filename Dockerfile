# Refit: one image for the Ray head, Serve workers and training workers (KubeRay).
#
#   docker build -t refit:0.1.0 .                                       # CPU torch
#   docker build -t refit:0.1.0-gpu --build-arg VARIANT=-gpu .          # CUDA torch
#   docker build --build-arg PRETRAINED="resnet18:IMAGENET1K_V1 resnet50:DEFAULT" ...
#
# The base is Ray's own image at the exact Ray and Python versions the project pins; it runs as
# its non-root user `ray` (uid 1000). No secrets are baked in: S3 credentials and API tokens
# come from Kubernetes Secrets at run time.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
# "" for CPU, "-gpu" for the CUDA image
ARG VARIANT=""
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${VARIANT}

ARG VARIANT=""
# Where CPU torch comes from; the -gpu image takes PyPI's CUDA wheels.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# torchvision weights to pre-populate the torch hub cache with (space-separated
# backbone:WEIGHTS), for clusters without internet.
ARG PRETRAINED=""

# jemalloc: glibc malloc costs about a fifth of CPU inference throughput.
USER 0
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2=5.* \
    && rm -rf /var/lib/apt/lists/*
USER 1000

ENV TORCH_HOME=/home/ray/.cache/torch \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    REFIT_SERVE__HOST=0.0.0.0

WORKDIR /home/ray/refit

# The same pinned installs as `make setup`: torch and torchvision together, then the project.
RUN if [ -z "${VARIANT}" ]; then \
        pip install --index-url "${TORCH_CPU_INDEX}" "torch==2.13.0" "torchvision==0.28.0"; \
    else \
        pip install "torch==2.13.0" "torchvision==0.28.0"; \
    fi

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 training ./training
COPY --chown=1000:100 service ./service
# PRETRAINED is a list: word splitting is wanted there
# hadolint ignore=SC2086
RUN pip install . \
    && ln -s "$(command -v refit-haproxy)" /home/ray/refit/refit-haproxy \
    && if [ -n "${PRETRAINED}" ]; then refit weights prefetch ${PRETRAINED}; fi

# Ray Serve starts HAProxy through Refit's launcher: Ray's config narrowed (stats page and
# exporter on loopback, admin socket mode 600, body limits refused at HAProxy).
ENV RAY_SERVE_HAPROXY_BINARY_PATH=/home/ray/refit/refit-haproxy

# jemalloc for every process Ray starts in this container (Ray's workers inherit it).
ENV LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2

EXPOSE 8000
CMD ["refit", "--help"]
