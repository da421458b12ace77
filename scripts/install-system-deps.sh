#!/usr/bin/env bash
# Installs the Debian packages gcvm needs (QEMU, libvirt, dnsmasq, mmdebstrap, headers for
# libvirt-python, veritysetup for the image's dm-verity hash tree). Runs apt only when something
# is missing, so repeated `make` calls cost nothing.
set -euo pipefail
PKGS=(
  qemu-system-x86 qemu-utils ovmf
  libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu libvirt-dev pkg-config
  dnsmasq-base iproute2 iptables openssh-client
  mmdebstrap e2fsprogs cryptsetup-bin
  libxml2-utils gcc
  # the pods runtime (`gcvm up --runtime pods`): podman with runc (crun fails on hybrid cgroups)
  podman runc
)
missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "gcvm needs these Debian packages: ${missing[*]}" >&2
  echo "hint: run 'sudo $0' (or install them with apt-get)" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
