#!/bin/sh
# Prints the package version for this checkout, from `git describe`:
#   tag v1.2.3                      -> 1.2.3
#   4 commits after v1.2.3          -> 1.2.3+4.gabc1234
#   no tag yet                      -> 0.0.0+<commits>.gabc1234
#   uncommitted changes             -> ... with .dirty appended
# "+" sorts after the release in both dpkg and rpm, so every later commit upgrades
# the one before it; a "-" would be read as a release (rpm) or revision (deb).
set -eu
d=$(git describe --tags --match 'v[0-9]*' --dirty 2>/dev/null || true)
dirty=
case "$d" in *-dirty) dirty=.dirty; d=${d%-dirty} ;; esac
if [ -z "$d" ]; then
	git diff --quiet HEAD 2>/dev/null || dirty=.dirty
	echo "0.0.0+$(git rev-list --count HEAD).g$(git rev-parse --short=7 HEAD)$dirty"
	exit 0
fi
d=${d#v}
case "$d" in
*-*-g*)
	tag=${d%-*-g*}
	rest=${d#"$tag"-}
	echo "$tag+${rest%%-g*}.g${rest#*-g}$dirty"
	;;
*) echo "$d$dirty" ;;
esac
