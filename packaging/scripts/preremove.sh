#!/bin/sh
# imdsguard preremove, for both formats:
#   deb prerm:  remove | upgrade NEW-VERSION | deconfigure | failed-upgrade OLD-VERSION
#   rpm %preun: 0 (erase) | 1 (upgrade: the new version is already installed)
# Only a removal stops the agent and unpins its programs; an upgrade leaves it running
# (postinstall of the new version restarts it). Never fails: a removal must go through.
unit=imdsguard.service
bin=/usr/bin/imdsguard
conf=/etc/imdsguard/config.yaml

case "$1" in
remove | 0) ;;
*) exit 0 ;;
esac

if command -v systemctl >/dev/null 2>&1; then
	systemctl disable "$unit" >/dev/null 2>&1 || true
	if [ -d /run/systemd/system ]; then
		systemctl stop "$unit" >/dev/null 2>&1 || true
	fi
fi

# Detach and remove the pinned BPF objects (/sys/fs/bpf/imdsguard), with versions of
# the agent that have `uninstall`; older ones never pinned anything.
supports_uninstall() {
	"$bin" uninstall --help >/dev/null 2>&1 && return 0
	"$bin" help 2>/dev/null | grep -q '^ *imdsguard uninstall'
}
if [ -x "$bin" ] && supports_uninstall; then
	if [ -f "$conf" ]; then
		"$bin" uninstall --config "$conf" || echo "imdsguard: could not remove pinned BPF objects; they go away at the next boot" >&2
	else
		"$bin" uninstall || echo "imdsguard: could not remove pinned BPF objects; they go away at the next boot" >&2
	fi
fi
exit 0
