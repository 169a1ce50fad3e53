#!/usr/bin/env bash
# Build the CPU image steer-lab:cpu from Dockerfile.cpu with the container engine at hand, docker or
# podman (README, "Build the images"). Where Docker Hub and PyTorch's CPU index answer, this runs
# exactly the README's `docker build -f Dockerfile.cpu -t steer-lab:cpu .` (podman: the same words).
# Where they do not, it says so and takes, step by step, the path measured on a machine that has
# only a Debian mirror and an HTTPS proxy with its own certificate authority:
#   engine   podman's default runtime settings fail (setrlimit, cgroups): scripts/containers.conf;
#   base     python:3.11.13-slim-bookworm cannot be pulled: a local base built from the Debian mirror
#            (debootstrap bookworm, Debian's python3.11 in a venv at /opt/venv), as --build-arg BASE_IMAGE;
#   packages PyTorch's CPU index does not answer: torch from pip's configured index (TORCH_INDEX=),
#            with the host's pip configuration and CA bundle as the build secrets pip_conf and
#            ca_bundle, and (podman) the local folders that configuration names mounted read-only.
# One line per decision, starting "build_image:". Knobs (environment):
#   ENGINE=docker|podman   BASE=auto|pull|local   PACKAGES=auto|standard|host   TAG=steer-lab:cpu
#   LOCAL_BASE=localhost/steer-lab-base:bookworm-python3.11   DEBIAN_MIRROR=<the host's apt mirror>
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKERFILE=Dockerfile.cpu
TAG="${TAG:-steer-lab:cpu}"
BASE="${BASE:-auto}"
PACKAGES="${PACKAGES:-auto}"
LOCAL_BASE="${LOCAL_BASE:-localhost/steer-lab-base:bookworm-python3.11}"
BASE_IMAGE="$(sed -n 's/^ARG BASE_IMAGE=//p' "$DOCKERFILE")"
TORCH_INDEX="$(sed -n 's/^ARG TORCH_INDEX=//p' "$DOCKERFILE")"

say() { echo "build_image: $*"; }
die() { echo "build_image: error: $*" >&2; exit 1; }
work="$(mktemp -d "${TMPDIR:-/tmp}/steer-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- engine: docker when its daemon answers, else podman ---------------------------------------
if [[ -z "${ENGINE:-}" ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
  elif command -v podman >/dev/null; then ENGINE=podman
  else die "no container engine: docker (with its daemon running) or podman is needed (Debian: apt-get install podman runc)"; fi
fi
command -v "$ENGINE" >/dev/null || die "ENGINE=$ENGINE is not installed"
say "engine: $ENGINE ($("$ENGINE" --version | head -1))"
[[ "$BASE" =~ ^(auto|pull|local)$ ]] || die "BASE=$BASE; allowed: auto, pull, local"
[[ "$PACKAGES" =~ ^(auto|standard|host)$ ]] || die "PACKAGES=$PACKAGES; allowed: auto, standard, host"

# --- base: the Dockerfile's default image, pulled; else a local one from the Debian mirror -------
debian_mirror() {
  local found
  found="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '$1 == "URIs:" || $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) { print $i; exit } }')"
  echo "${found:-http://deb.debian.org/debian}"
}

build_local_base() {
  [[ $EUID -eq 0 ]] || die "building the local base image needs root (debootstrap); run as root or give BASE_IMAGE of an image you have"
  command -v debootstrap >/dev/null || die "building the local base image needs debootstrap (Debian: apt-get install debootstrap)"
  local mirror="${DEBIAN_MIRROR:-$(debian_mirror)}" root="$work/rootfs" start=$SECONDS
  say "base: building $LOCAL_BASE from $mirror (debootstrap --variant=minbase bookworm + python3-venv)"
  debootstrap --variant=minbase --include=python3-venv,passwd,ca-certificates bookworm "$root" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -5 "$work/debootstrap.log" >&2; die "debootstrap from $mirror failed (log above)"; }
  # Debian's python3.11 in a venv, so that `python` and `pip` are on PATH as in the python:3.11 images.
  chroot "$root" python3 -m venv /opt/venv
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | "$ENGINE" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python"]' - "$LOCAL_BASE" >/dev/null
  say "base: $LOCAL_BASE built in $((SECONDS - start)) s"
}

build_args=()
pull_log="$work/pull.log"
if [[ "$BASE" != local ]] && "$ENGINE" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  say "base: $BASE_IMAGE (already present)"
elif [[ "$BASE" != local ]] && timeout 600 "$ENGINE" pull "$BASE_IMAGE" >"$pull_log" 2>&1; then
  say "base: $BASE_IMAGE (pulled)"
elif [[ "$BASE" == pull ]]; then
  die "cannot pull $BASE_IMAGE: $(tail -1 "$pull_log")"
else
  [[ "$BASE" == local ]] || say "base: cannot pull $BASE_IMAGE ($(tail -1 "$pull_log" | cut -c1-160))"
  if "$ENGINE" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    say "base: $LOCAL_BASE (built earlier from the Debian mirror; remove it to rebuild)"
  else
    build_local_base
  fi
  BASE_IMAGE="$LOCAL_BASE"
  build_args+=(--build-arg "BASE_IMAGE=$LOCAL_BASE")
fi

# --- the engine's runtime: podman as installed may fail to start any container here ------------
if ! "$ENGINE" run --rm "$BASE_IMAGE" true >"$work/run.log" 2>&1; then
  if [[ "$ENGINE" == podman && -z "${CONTAINERS_CONF:-}" ]] &&
     CONTAINERS_CONF="$PWD/scripts/containers.conf" podman run --rm "$BASE_IMAGE" true >/dev/null 2>&1; then
    export CONTAINERS_CONF="$PWD/scripts/containers.conf"
    say "engine: podman cannot start containers with its defaults ($(tail -1 "$work/run.log" | cut -c1-120));" \
      "using CONTAINERS_CONF=scripts/containers.conf (nofile/nproc limits, runc)"
  else
    die "$ENGINE cannot start a container of $BASE_IMAGE: $(tail -1 "$work/run.log")"
  fi
fi

# --- packages: PyPI and PyTorch's CPU index as the Dockerfile says, else the host's pip setup ----
if [[ "$PACKAGES" == auto ]]; then
  if python3 - "$TORCH_INDEX/torch/" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=10)
PY
  then PACKAGES=standard
  else
    say "packages: $TORCH_INDEX does not answer from here"
    PACKAGES=host
  fi
fi
if [[ "$PACKAGES" == standard ]]; then
  say "packages: PyPI, torch from $TORCH_INDEX (as the Dockerfile says)"
else
  # The host's pip configuration (files and PIP_* variables, as `pip config list` merges them) made
  # into one file whose CA bundle is the ca_bundle secret; local paths it names are mounted at the
  # same paths (podman; docker's build has no mounts of host folders, so they are left out there).
  python3 - "$ENGINE" "$work" <<'PY' || die "could not read the host's pip configuration"
import ast, os, subprocess, sys
engine, work = sys.argv[1], sys.argv[2]
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings = {}
for line in sorted(listed.splitlines(), key=lambda l: l.startswith(":env:")):  # PIP_* variables win
    key, _, value = line.partition("=")
    settings[key.partition(".")[2]] = ast.literal_eval(value)
ca = settings.pop("cert", None) or next((os.environ[v] for v in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
                                         if os.environ.get(v)), "/etc/ssl/certs/ca-certificates.crt")
settings.pop("config-file", None)
mounts, dropped, lines = set(), [], ["[global]"]
for name, value in settings.items():
    kept = []
    for token in value.split():
        path = token[len("file://"):] if token.startswith("file://") else token if token.startswith("/") else None
        if path is None:
            kept.append(token)
        elif engine == "podman" and os.path.exists(path):
            # a local index's pages link to files beside it (../../files/...): mount its parent
            mounts.add(os.path.dirname(path.rstrip("/")) if name.endswith("index-url") else path)
            kept.append(token)
        else:
            dropped.append(token)
    if kept:
        lines.append(f"{name} = {' '.join(kept)}")
lines.append("cert = /run/secrets/ca_bundle")
open(f"{work}/pip.conf", "w").write("\n".join(lines) + "\n")
open(f"{work}/ca", "w").write(ca)
open(f"{work}/mounts", "w").write("".join(f"{m}\n" for m in sorted(mounts)))
open(f"{work}/dropped", "w").write(" ".join(dropped))
PY
  ca="$(cat "$work/ca")"
  [[ -r "$ca" ]] || die "the CA bundle $ca is not readable"
  build_args+=(--build-arg "TORCH_INDEX=" --secret "id=pip_conf,src=$work/pip.conf" --secret "id=ca_bundle,src=$ca")
  while read -r mount; do build_args+=(--volume "$mount:$mount:ro"); done <"$work/mounts"
  say "packages: the host's pip configuration and CA bundle $ca as build secrets, torch from pip's" \
    "configured index; mounted read-only: $(tr '\n' ' ' <"$work/mounts")"
  [[ ! -s "$work/dropped" ]] || say "packages: $ENGINE cannot mount host folders in a build; left out: $(cat "$work/dropped")"
fi

# --- build ---------------------------------------------------------------------------------------
command=("$ENGINE" build -f "$DOCKERFILE" -t "$TAG" "${build_args[@]}" .)
say "running: ${command[*]}"
start=$SECONDS
[[ "$ENGINE" != docker ]] || export DOCKER_BUILDKIT=1  # build secrets need BuildKit
"${command[@]}"
seconds=$((SECONDS - start))
size="$("$ENGINE" image inspect --format '{{.Size}}' "$TAG")"
torch="$("$ENGINE" run --rm --entrypoint python "$TAG" -c 'import torch; print(torch.__version__)')"
say "built $TAG in ${seconds} s with $ENGINE: $(awk -v b="$size" 'BEGIN { printf "%.2f GB", b / 1e9 }'), torch $torch" \
  "(load average $(cut -d' ' -f1-3 /proc/loadavg))"
