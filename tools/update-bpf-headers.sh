#!/usr/bin/env bash
# Copies the libbpf helper headers that bpf/ compiles against into bpf/headers, so the
# build does not depend on whichever libbpf-dev a machine has. Run after upgrading libbpf.
set -euo pipefail
src=${LIBBPF_INCLUDE:-/usr/include/bpf}
dst=$(dirname "$0")/../bpf/headers/bpf
mkdir -p "$dst"
for f in bpf_helpers.h bpf_helper_defs.h bpf_endian.h bpf_core_read.h; do
  cp "$src/$f" "$dst/$f"
done
echo "copied libbpf headers from $src to $dst"
