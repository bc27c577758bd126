#!/bin/sh
# imdsguard postremove, for both formats:
#   deb postrm:  remove | purge | upgrade NEW-VERSION | disappear | failed-upgrade | abort-install | abort-upgrade
#   rpm %postun: 0 (erase) | 1 (upgrade)
# purge (deb only) removes the agent's state; rpm has no purge, so an erased rpm
# leaves /var/lib/imdsguard to the operator. Never fails.
case "$1" in
purge)
	rm -rf /var/lib/imdsguard /run/imdsguard
	;;
remove | 0) ;;
*) exit 0 ;;
esac

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
