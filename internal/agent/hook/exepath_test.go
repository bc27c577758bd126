package hook

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// The kernel walks the executable's path across mount points (stacked and bind mounts
// included) and keeps the last EXE_DEPTH components of a deeper one, saying so.
func TestPrivilegedHookWalksExePath(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	_, events := startHook(t, bed)
	dir, err := os.MkdirTemp("", "exewalk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	deep := filepath.Join(dir, "a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t")
	// Runs curl copies from a 23-component path, and from a stacked tmpfs with a bind
	// mount on top, in a mount namespace of its own that dies with it.
	script := `set -e
C=$(command -v curl); U=http://169.254.169.254/latest/meta-data/
mkdir -p ` + deep + `; cp $C ` + deep + `/cdeep; ` + deep + `/cdeep -s -m 2 $U >/dev/null || true
unshare -m sh -c "set -e; mount --make-rprivate /; M=` + dir + `/m; mkdir -p \$M; mount -t tmpfs t \$M
mkdir \$M/x; mount -t tmpfs t \$M/x; mount -t tmpfs t \$M/x; mkdir -p \$M/x/y/z; mount --bind \$M/x/y/z \$M/x/y/z
cp $C \$M/x/y/z/cmnt; \$M/x/y/z/cmnt -s -m 2 $U >/dev/null || true"
`
	ctx := context.Background()
	r := bed.RunCommand(ctx, "walk", "", testbed.Placement{}, "sh", "-c", script)
	if r.Err != nil {
		t.Fatal(r.Err)
	}
	marker := bed.RunCommand(ctx, "marker", "", testbed.Placement{}, "curl", "-sf", "-m", "5",
		"http://"+testbed.IMDSv4.String()+"/latest/meta-data/instance-id")
	if marker.Err != nil {
		t.Fatal(marker.Err)
	}
	_, before := waitFor(t, events, marker.PID)
	got := map[string]Event{}
	for _, e := range before {
		got[e.Comm] = e
	}
	parts := strings.Split(strings.TrimPrefix(deep, "/"), "/")
	want := map[string]struct {
		path      string
		truncated bool
	}{
		"cdeep": {"/" + strings.Join(append(parts[len(parts)-15:], "cdeep"), "/"), true},
		"cmnt":  {filepath.Join(dir, "m/x/y/z/cmnt"), false},
	}
	for comm, w := range want {
		e, ok := got[comm]
		if !ok {
			t.Errorf("%s: no event; saw %+v", comm, before)
			continue
		}
		if e.ExePath != w.path || e.ExeTruncated != w.truncated {
			t.Errorf("%s: exe %q (truncated %v), want %q (%v)", comm, e.ExePath, e.ExeTruncated, w.path, w.truncated)
		}
	}
}
