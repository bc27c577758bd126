#!/bin/sh
# Installs imdsguard into an image being baked (the Packer template runs it; it works in
# a chroot too). Environment:
#   PACKAGE  path of the imdsguard .rpm or .deb on this machine (required)
#   CONFIG   path of a config.yaml to install as /etc/imdsguard/config.yaml (optional;
#            without it the package's commented defaults stay)
# The service is enabled, not started by force: it starts, before the network, on
# every boot of the image.
set -eu

: "${PACKAGE:?set PACKAGE to the imdsguard .rpm or .deb}"
CONFIG=${CONFIG:-}

case "$PACKAGE" in
*.rpm)
	if command -v dnf >/dev/null 2>&1; then
		dnf install -y "$PACKAGE"
	elif command -v yum >/dev/null 2>&1; then
		yum install -y "$PACKAGE"
	else
		rpm -U --replacepkgs "$PACKAGE"
	fi
	;;
*.deb)
	# Keep a config that is already there (an earlier bake step, or cloud-init).
	DEBIAN_FRONTEND=noninteractive apt-get install -y -o Dpkg::Options::=--force-confold "$PACKAGE"
	;;
*)
	echo "install-imdsguard: $PACKAGE is neither .rpm nor .deb" >&2
	exit 1
	;;
esac

if [ -n "$CONFIG" ]; then
	# Refuse a bad config now, at bake time, rather than at the first boot.
	imdsguard check-config "$CONFIG" >/dev/null
	install -m 0600 -o root -g root "$CONFIG" /etc/imdsguard/config.yaml
fi

if command -v systemctl >/dev/null 2>&1; then
	systemctl enable imdsguard.service
fi
# Report what the image's kernel offers; a failure here is for the baker to read, the
# service reports the same at each start.
imdsguard preflight --no-imds || echo "install-imdsguard: preflight found problems (see above)" >&2
