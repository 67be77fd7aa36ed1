#!/usr/bin/env bash
# make docker: build the heimdex-clip image where a Docker engine runs.
#
# Environment:
#   MODEL, PRETRAINED  the artifact to bake (default ViT-B-32, openai)
#   ARTIFACT           an already exported artifact directory (may be a symlink): baked as is,
#                      no export in the build (air-gapped). Empty: the build exports MODEL.
#   BASE_IMAGE         base of every stage (default: the Dockerfile's pinned python slim image)
#   TAG                image tag (default heimdex-clip:MODEL-PRETRAINED)
#   DOCKER_LOCAL=1     no engine or registry here: install docker.io + debootstrap if missing,
#                      start a dockerd for the build and stop it afterwards, and build on a
#                      local Debian base (as make docker-test does)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/docker_lib.sh
source scripts/docker_lib.sh

MODEL=${MODEL:-ViT-B-32}
PRETRAINED=${PRETRAINED:-openai}
ARTIFACT=${ARTIFACT:-}
TAG=${TAG:-heimdex-clip:$MODEL-$PRETRAINED}
BASE_IMAGE=${BASE_IMAGE:-}

trap 'rm -rf build/docker; engine_stop' EXIT
trap 'exit 130' INT TERM
if [ "${DOCKER_LOCAL:-0}" = 1 ]; then
    engine_install
    engine_start
    if [ -z "$BASE_IMAGE" ]; then local_base_image; BASE_IMAGE=$LOCAL_BASE_TAG; fi
fi
engine_running || die "no Docker engine answers: start one, or run with DOCKER_LOCAL=1"

stage_build_inputs "$ARTIFACT"
if [ -n "$ARTIFACT" ]; then
    say "building $TAG from the exported $ARTIFACT"
else
    say "building $TAG: the build exports $MODEL (pretrained=$PRETRAINED) with PyTorch"
fi
started=$SECONDS
build_image "$TAG" "$BASE_IMAGE" "$MODEL" "$PRETRAINED" "$([ -n "$ARTIFACT" ] && echo 1 || echo 0)"
say "built $TAG in $((SECONDS - started)) s: $(docker image inspect -f '{{.Size}}' "$TAG" \
    | awk '{printf "%.0f MB", $1 / 1e6}')"
