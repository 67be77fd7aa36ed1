# Shared by scripts/docker_build.sh and scripts/docker_test.sh (sourced, not run).
#
# A Docker engine on a machine that has none running and no image registry:
#   engine_install      docker.io + debootstrap from Debian, when missing
#   engine_start        its own dockerd, unless one already answers (engine_stop undoes it)
#   local_base_image    a Python 3.11 bookworm base from Debian packages (debootstrap + import),
#                       its root filesystem cached as a tarball across runs
#   stage_build_inputs  build/docker/: the host's CA bundle + a pip.conf (build stage only) and
#                       the artifact copied as real files (a symlinked directory is resolved)
#   build_image         the classic builder (no BuildKit here), host network for pip

DOCKER_STATE_DIR="${DOCKER_STATE_DIR:-/tmp/heimdex-clip-docker}"
DOCKER_CACHE_DIR="${DOCKER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/heimdex-clip/docker}"
BASE_PACKAGES="python3,python3-venv,python3-pip,ca-certificates"
LOCAL_BASE_TAG="heimdex-clip-base:bookworm"
ENGINE_STARTED_BY_US=0

say() { printf '[docker] %s\n' "$*"; }
die() { printf '[docker] ERROR: %s\n' "$*" >&2; exit 1; }

engine_install() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "needs ${missing[*]} (apt-get install as root)"
    say "installing ${missing[*]} from Debian"
    local started=$SECONDS
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    say "installed in $((SECONDS - started)) s"
}

engine_running() { docker info >/dev/null 2>&1; }

engine_start() {
    if engine_running; then
        say "using the Docker engine already running (it is left running)"
        return 0
    fi
    command -v dockerd >/dev/null || die "no dockerd: run engine_install first"
    mkdir -p "$DOCKER_STATE_DIR"
    # No default bridge and no iptables rules: containers use --network=none or host.
    dockerd --pidfile "$DOCKER_STATE_DIR/dockerd.pid" --bridge=none --iptables=false \
        >"$DOCKER_STATE_DIR/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    ENGINE_STARTED_BY_US=1
    local waited=0
    until engine_running; do
        kill -0 "$DOCKERD_PID" 2>/dev/null || {
            tail -n 20 "$DOCKER_STATE_DIR/dockerd.log" >&2; die "dockerd exited"; }
        [ $waited -ge 60 ] && { tail -n 20 "$DOCKER_STATE_DIR/dockerd.log" >&2;
                                die "dockerd not ready after 30 s"; }
        sleep 0.5; waited=$((waited + 1))
    done
    say "started dockerd (pid $DOCKERD_PID, log $DOCKER_STATE_DIR/dockerd.log)"
}

engine_stop() {
    [ "$ENGINE_STARTED_BY_US" -eq 1 ] || return 0
    ENGINE_STARTED_BY_US=0
    kill -TERM "$DOCKERD_PID" 2>/dev/null || return 0
    local waited=0
    while kill -0 "$DOCKERD_PID" 2>/dev/null && [ $waited -lt 60 ]; do
        sleep 0.5; waited=$((waited + 1))
    done
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then
        say "dockerd did not stop within 30 s: killing it"
        kill -KILL "$DOCKERD_PID" 2>/dev/null || true
    fi
    wait "$DOCKERD_PID" 2>/dev/null || true
    say "stopped dockerd (pid $DOCKERD_PID)"
}

# The Debian mirror apt already uses (deb822 sources first, then sources.list).
debian_mirror() {
    local uri
    uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' \
            /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

local_base_image() {
    if docker image inspect "$LOCAL_BASE_TAG" >/dev/null 2>&1; then
        say "base image $LOCAL_BASE_TAG already in the engine"
        return 0
    fi
    local tarball="$DOCKER_CACHE_DIR/bookworm-minbase-$(echo "$BASE_PACKAGES" | tr ',' '-').tar"
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || die "no debootstrap: run engine_install first"
        local root mirror started=$SECONDS
        mirror=$(debian_mirror)
        root=$(mktemp -d "$DOCKER_STATE_DIR/rootfs.XXXXXX")
        say "debootstrap bookworm (minbase + $BASE_PACKAGES) from $mirror"
        debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$root" "$mirror" \
            >"$DOCKER_STATE_DIR/debootstrap.log" 2>&1 \
            || { tail -n 20 "$DOCKER_STATE_DIR/debootstrap.log" >&2; die "debootstrap failed"; }
        # Leave apt's package cache and lists out of the image.
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        mkdir -p "$DOCKER_CACHE_DIR"
        tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$root"
        say "base root filesystem built in $((SECONDS - started)) s, cached as $tarball"
    else
        say "base root filesystem from the cache: $tarball"
    fi
    docker import --change 'CMD ["python3"]' "$tarball" "$LOCAL_BASE_TAG" >/dev/null
    say "imported $LOCAL_BASE_TAG ($(docker image inspect -f '{{.Size}}' "$LOCAL_BASE_TAG" \
        | awk '{printf "%.0f MB", $1 / 1e6}'))"
}

# build/docker/ holds what the build may read besides the sources (see .dockerignore).
#   $1: an exported artifact directory (may be a symlink) or empty to export in the build.
stage_build_inputs() {
    local artifact="${1:-}" stage=build/docker
    rm -rf "$stage"
    mkdir -p "$stage"
    local ca="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
    if [ -f "$ca" ]; then
        # The host's trust store, so pip in the build stage trusts what the host trusts
        # (an HTTPS proxy's CA included). Only the build stage reads it.
        cp -L "$ca" "$stage/ca-bundle.crt"
        printf '[global]\ncert = /build/pip/ca-bundle.crt\ntimeout = 180\n' >"$stage/pip.conf"
    fi
    if [ -n "$artifact" ]; then
        [ -f "$artifact/manifest.json" ] || die "$artifact holds no manifest.json"
        local name real
        name=$(basename "$artifact")
        real=$(readlink -f "$artifact")
        mkdir -p "$stage/models/$name"
        # Real files (a symlinked artifact is resolved). The fp32 reference graphs and
        # OpenVINO's QDQ graph stay out: the image runs ONNX Runtime's CPU provider.
        tar -C "$real" --dereference --exclude='*.fp32.onnx' --exclude='*.fp32.onnx.data' \
            --exclude='*.qdq.onnx' \
            -cf - . | tar -C "$stage/models/$name" -xf -
        chmod -R a+rX "$stage/models"
        say "staged $artifact ($real) as $stage/models/$name: $(du -sh "$stage/models/$name" \
            | cut -f1)"
    fi
}

# build_image TAG BASE_IMAGE MODEL PRETRAINED USE_STAGED_MODELS(0|1)
build_image() {
    local tag=$1 base=$2 model=$3 pretrained=$4 staged=$5 args=()
    [ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
    [ "$staged" = 1 ] && args+=(--build-arg MODELS_DIR=build/docker/models)
    DOCKER_BUILDKIT=0 docker build --network=host --force-rm -t "$tag" \
        --build-arg "MODEL=$model" --build-arg "PRETRAINED=$pretrained" "${args[@]}" .
}
