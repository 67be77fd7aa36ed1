# syntax=docker/dockerfile:1
# heimdex-clip worker image.
#   stage "export":  torch (CPU) + open_clip turn the model into the verified INT8 ONNX artifact
#   stage "runtime": the slim worker image: onnxruntime + numpy + Pillow (+ db extra), no torch
#
#   docker build -t heimdex-clip .                                   # openai weights (needs a hub)
#   docker build --build-arg PRETRAINED=none -t heimdex-clip:test .  # offline: random init, tests only
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS export
ARG MODEL=ViT-B-32
ARG PRETRAINED=openai
# PyTorch's CPU wheels: the default index would resolve multi-GB CUDA builds.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY runtime runtime
COPY export export
COPY migrations migrations
RUN pip install --no-cache-dir . ./export \
 && pip wheel --no-cache-dir --no-deps -w /wheels .
# The export fails (and so does the build) unless every parity/accuracy gate passes.
RUN python -m heimdex_clip_export --model "${MODEL}" --pretrained "${PRETRAINED}" \
        --models-dir /artifacts

FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CLIP_MODEL_DIR=/opt/heimdex-clip/models
COPY --from=export /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/heimdex_clip-*.whl)[db]" && rm -rf /wheels \
 && useradd --create-home --uid 10001 heimdex \
 && python -c "import sys, heimdex_clip; assert 'torch' not in sys.modules"
COPY --from=export /artifacts /opt/heimdex-clip/models
USER heimdex
ENTRYPOINT ["heimdex-clip"]
CMD ["info"]
