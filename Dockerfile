# heimdex-clip: a torch-free CLIP embedding worker with the model baked in.
#
#   stage "build":   a venv with the heimdex-clip wheel and its db extra, the database client
#                    only (no embedded server; build-only pip settings)
#   stage "model":   the artifact: exported here with PyTorch's CPU build + open_clip (the build
#                    fails when an export gate fails), or taken from MODELS_DIR (air-gapped)
#   stage "runtime": that venv + the artifact on a slim base, non-root, no torch, no compilers
#
# Written for the classic builder as well as BuildKit: no RUN --mount, COPY --chmod or heredocs.
# See docs/docker.md; `make docker` and `make docker-test` drive it.
#
#   docker build -t heimdex-clip .                                    # export openai weights
#   docker build --build-arg MODELS_DIR=build/docker/models \
#                --build-arg PRETRAINED=none -t heimdex-clip:test .   # already exported artifact

# Every stage starts from this image. Offline, pass a local Python 3.11 base (make docker-test
# builds one from Debian packages).
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

FROM ${BASE_IMAGE} AS build
# Optional pip settings for the build only (a proxy's CA bundle, an index): make stages them in
# build/docker/. The bracket wildcards let the files be absent; pyproject.toml is always there.
COPY pyproject.toml build/docker/pip.con[f] build/docker/ca-bundle.cr[t] /build/pip/
ENV PIP_CONFIG_FILE=/build/pip/pip.conf \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime runtime
COPY export export
# The runtime, its db extra (client only: the embedded server is the demo's `embedded`
# extra, never the image's) and the search service's (serve) as wheels only: nothing is
# compiled, so no compiler is needed.
RUN pip wheel --no-deps -w /wheels . \
 && pip install --only-binary=:all: "$(ls /wheels/heimdex_clip-*.whl)[db,metrics,serve]" \
 && python -c "import sys, heimdex_clip.cli, heimdex_clip.db.cli, heimdex_clip.serve.app; \
assert 'torch' not in sys.modules"

FROM build AS model
ARG MODEL=ViT-B-32
ARG PRETRAINED=openai
# A directory of the build context holding already exported <MODEL>__<PRETRAINED>/ artifacts.
# Empty: export here (needs PyTorch's CPU wheels and, for real weights, a model hub).
ARG MODELS_DIR=
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# With MODELS_DIR empty this copies a placeholder (the classic builder cannot skip a COPY).
COPY ${MODELS_DIR:-models/README.md} /prebuilt/
RUN set -eu; \
    if [ -n "${MODELS_DIR}" ]; then \
        echo "using the artifacts exported beforehand in ${MODELS_DIR}"; \
        mkdir -p /artifacts && cp -a /prebuilt/. /artifacts/; \
    else \
        pip install --index-url "${TORCH_INDEX_URL}" -r export/requirements-torch.txt; \
        pip install ./export; \
        python -m heimdex_clip_export --model "${MODEL}" --pretrained "${PRETRAINED}" \
            --models-dir /artifacts; \
    fi; \
    CLIP_MODEL_NAME="${MODEL}" CLIP_PRETRAINED="${PRETRAINED}" \
        heimdex-clip --model-dir /artifacts info \
    || { echo "the artifact for MODEL=${MODEL} PRETRAINED=${PRETRAINED} does not load" >&2; \
         exit 1; }

# The runtime venv without the installers (nothing is installed at run time).
FROM build AS venv
RUN pip uninstall -q -y pip setuptools

FROM ${BASE_IMAGE} AS runtime
ARG MODEL=ViT-B-32
ARG PRETRAINED=openai
# One writable place (HOME) plus TMPDIR: with --read-only, mount a volume or tmpfs on each;
# nothing else is written. The database is DATABASE_URL (no embedded server in the image).
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/heimdex-clip \
        --shell /usr/sbin/nologin heimdex \
 && install -d -o heimdex -g heimdex -m 0750 /var/lib/heimdex-clip
COPY --from=venv /opt/venv /opt/venv
COPY --from=model /artifacts /opt/heimdex-clip/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/heimdex-clip \
    XDG_DATA_HOME=/var/lib/heimdex-clip \
    XDG_CACHE_HOME=/tmp/cache \
    XDG_RUNTIME_DIR=/tmp \
    TMPDIR=/tmp \
    CLIP_ENABLED=true \
    CLIP_MODEL_DIR=/opt/heimdex-clip/models \
    CLIP_MODEL_NAME=${MODEL} \
    CLIP_PRETRAINED=${PRETRAINED} \
    CLIP_DEVICE=cpu \
    CLIP_PRECISION=int8 \
    CLIP_CACHE_DIR=/tmp/clip_cache
USER 10001:10001
WORKDIR /var/lib/heimdex-clip
# Healthy = the baked model loads and its sha256 matches the manifest (info exits 2 otherwise).
HEALTHCHECK --interval=5m --timeout=60s --start-period=60s --retries=3 \
    CMD ["heimdex-clip", "info", "--json"]
ENTRYPOINT ["heimdex-clip"]
# `docker run -p 8080:8080 -e CLIP_SERVE_HOST=0.0.0.0 ... serve` runs the search service.
EXPOSE 8080
# The embedding worker: pending scenes from DATABASE_URL, SIGTERM finishes the batch and exits.
CMD ["backfill", "--follow", "--all-owners"]
