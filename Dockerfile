# toolrl on CPU: the same locked package set as CI. Build: docker build -t toolrl .
# Run the default job: docker run --rm --shm-size=4g toolrl
# (vLLM and the weight push use /dev/shm; Docker's 64 MB default is too small.)
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /toolrl
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY launch ./launch
COPY toolrl ./toolrl
COPY conf ./conf
COPY tests ./tests
# torch 2.13.0+cpu is not on PyPI: pass the PyTorch CPU wheel index, or a folder of wheels.
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
RUN PIP_EXTRA_INDEX_URL="$PIP_EXTRA_INDEX_URL" PIP_FIND_LINKS="$PIP_FIND_LINKS" bash launch/setup.sh
ENV TOOLRL_CACHE=/toolrl/.cache
CMD [".venv/bin/python", "-m", "toolrl.main"]
