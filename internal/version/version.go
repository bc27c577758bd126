// Package version says which build is running: the version the Makefile stamps in
// (-ldflags -X), else the module version Go recorded, else "dev".
package version

import "runtime/debug"

// String returns stamped when set, else what the build recorded.
func String(stamped string) string {
	if stamped != "" {
		return stamped
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}
