#!/usr/bin/env bash
# Build the gift-dist image and try it (CLI help, the CPU demo) where no container registry is reachable: the
# base image is a Debian made with debootstrap from the Debian mirror and imported into podman; Python packages
# come from the package index, plus a local wheel folder when WHEELS is set (e.g. a CPU torch of the pinned
# version, as on the project's CI machines). Needs root, podman and debootstrap (Debian packages).
#
#   WHEELS=/opt/wheels CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt docker/build_offline.sh
#   (TAG, WORK, MIRROR and SUITE may be set too)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/gift_image}
TAG=${TAG:-localhost/gift-dist:offline}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
BASE_TAG=localhost/debian-$SUITE-minbase:latest
mkdir -p "$WORK"

if ! podman image exists "$BASE_TAG"; then
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase "$SUITE" "$WORK/rootfs" "$MIRROR"
  tar -C "$WORK/rootfs" -c . | podman import - "$BASE_TAG"
  rm -rf "$WORK/rootfs"
fi

# pip inside the build: a local wheel folder (WHEELS) and the CA bundle of an intercepting proxy (CA_BUNDLE),
# when the machine has them; mounted for the build only, nothing of them stays in the image.
mounts=()
printf '[global]\n' > "$WORK/pip.conf"
if [[ -n "${WHEELS:-}" ]]; then
  printf 'find-links = %s\n' "$WHEELS" >> "$WORK/pip.conf"
  mounts+=(--volume "$WHEELS:$WHEELS:ro")
fi
if [[ -n "${CA_BUNDLE:-}" ]]; then
  printf 'cert = /etc/pip-ca.crt\n' >> "$WORK/pip.conf"
  mounts+=(--volume "$CA_BUNDLE:/etc/pip-ca.crt:ro")
fi
mounts+=(--volume "$WORK/pip.conf:/etc/pip.conf:ro")
# chroot isolation: RUN steps need no OCI runtime, so the build also works inside a sandbox whose cgroups or
# capabilities an OCI runtime refuses (a CI VM, a container).
podman build --isolation chroot --network host -f docker/Dockerfile --build-arg BASE_IMAGE="$BASE_TAG" \
  "${mounts[@]}" -t "$TAG" .

# Run the image's entrypoint: through podman where containers can start, else chrooted into the image's files.
if podman run --rm --network host "$TAG" --help; then
  podman run --rm --network host -e DS_ACCELERATOR=cpu "$TAG" demo --output /tmp/demo
else
  echo "podman run is not possible here: running the image's files with chroot instead" >&2
  root=$(podman image mount "$TAG")
  trap 'podman image unmount "$TAG" >/dev/null' EXIT
  # What a container runtime would provide: /proc, /dev, a hosts file (torchrun's rendezvous resolves
  # localhost), and, the image's files being read-only here, a scratch /tmp for the demo's output and caches.
  mount --bind /proc "$root/proc"
  mount --rbind /dev "$root/dev"
  mount --bind /etc/hosts "$root/etc/hosts"
  mount -t tmpfs tmpfs "$root/tmp"
  trap 'umount "$root/tmp" "$root/etc/hosts" "$root/proc"; umount -R "$root/dev"; podman image unmount "$TAG" >/dev/null' EXIT
  chroot "$root" /usr/bin/tini -g -- /opt/venv/bin/gift-dist --help
  chroot "$root" /usr/bin/env DS_ACCELERATOR=cpu HOME=/tmp /usr/bin/tini -g -- /opt/venv/bin/gift-dist demo \
    --output /tmp/demo
fi
