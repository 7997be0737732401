# toolrl images: every install step is launch/setup.sh, so an image installs as a fresh
# machine does (the cpu image the lock CI installs, the gpu image the package's gpu extra).
#
#   docker build --target cpu -t toolrl:cpu .   # runs the default job, no GPU needed:
#   docker run --rm --shm-size=4g toolrl:cpu
#   docker build --target gpu -t toolrl:gpu .   # the gpu extra (vllm, torch with CUDA):
#   docker run --rm --gpus all --shm-size=16g toolrl:gpu python -m toolrl.main model.path=...
#
# --shm-size: vLLM and the weight push use /dev/shm; Docker's 64 MB default is too small.
# torch 2.13.0+cpu is not on PyPI: pass the PyTorch CPU wheel index or a folder of wheels
# (--build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).

# what both images install: the package, its configs, its lock and its tests
FROM scratch AS source
COPY pyproject.toml README.md /toolrl/
COPY requirements /toolrl/requirements
COPY launch /toolrl/launch
COPY toolrl /toolrl/toolrl
COPY conf /toolrl/conf
COPY tests /toolrl/tests

FROM python:3.11-slim AS cpu
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /toolrl
COPY --from=source /toolrl ./
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
RUN PIP_EXTRA_INDEX_URL="$PIP_EXTRA_INDEX_URL" PIP_FIND_LINKS="$PIP_FIND_LINKS" \
    TOOLRL_KIND=cpu bash launch/setup.sh
ENV TOOLRL_CACHE=/toolrl/.cache PATH=/toolrl/.venv/bin:$PATH
CMD ["python", "-m", "toolrl.main"]

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    python3-dev gcc g++ libnuma1 && rm -rf /var/lib/apt/lists/*
WORKDIR /toolrl
COPY --from=source /toolrl ./
ARG PIP_EXTRA_INDEX_URL=""
RUN PIP_EXTRA_INDEX_URL="$PIP_EXTRA_INDEX_URL" TOOLRL_KIND=gpu bash launch/setup.sh
ENV TOOLRL_CACHE=/toolrl/.cache PATH=/toolrl/.venv/bin:$PATH
CMD ["python", "-m", "toolrl.main", "rollout.num_gpus_per_worker=1", \
     "trainer.train_group.num_gpus_per_worker=1", "trainer.train_group.world_size=1"]
