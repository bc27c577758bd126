#!/bin/sh
# imdsguard postinstall, for both formats:
#   deb postinst: configure [most-recently-configured-version] | abort-upgrade | abort-remove ...
#   rpm %post:    1 (install) | 2 (upgrade)
# Idempotent, and correct without a running systemd (image builds, chroots): then the
# service is only enabled, and starts at the next boot.
set -e

unit=imdsguard.service

case "$1" in
configure)
	# deb passes the version that was configured before, if any.
	if [ -n "$2" ]; then action=upgrade; else action=install; fi
	;;
1) action=install ;;
2) action=upgrade ;;
abort-upgrade | abort-remove | abort-deconfigure)
	# deb rolled back to this version after a failed upgrade or removal: run it again.
	action=upgrade
	;;
*) exit 0 ;;
esac

install -d -m 0700 /var/lib/imdsguard

command -v systemctl >/dev/null 2>&1 || {
	echo "imdsguard: systemctl not found; start 'imdsguard run --config /etc/imdsguard/config.yaml' with your init system" >&2
	exit 0
}
running=no
[ -d /run/systemd/system ] && running=yes

[ "$running" = yes ] && systemctl daemon-reload >/dev/null 2>&1 || true

if [ "$action" = install ]; then
	# enable only makes symlinks: it works in a chroot too. An upgrade keeps whatever
	# the operator chose.
	systemctl enable "$unit" >/dev/null 2>&1 ||
		echo "imdsguard: could not enable $unit; run: systemctl enable $unit" >&2
fi

[ "$running" = yes ] || exit 0

if [ "$action" = install ]; then
	systemctl start "$unit" ||
		echo "imdsguard: $unit did not start; see 'imdsguard preflight' and 'journalctl -u $unit'" >&2
else
	# Restart a running agent on the new binary. Its pinned programs keep guarding
	# while the new one starts, so there is no unguarded window.
	systemctl try-restart "$unit" ||
		echo "imdsguard: $unit did not restart; see 'journalctl -u $unit'" >&2
fi
exit 0
