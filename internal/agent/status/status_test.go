package status

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/hostid"
	"github.com/imdsguard/imdsguard/internal/agent/metrics"
	"github.com/imdsguard/imdsguard/internal/agent/netns"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// The socket answers root only, so this needs root.
func TestPrivilegedStatusOverSocket(t *testing.T) {
	testbed.RequirePrivileged(t)
	path := filepath.Join(t.TempDir(), "run", "status.sock")
	agg := metrics.NewAggregator(20, 100)
	seen := time.Now().Add(-90 * time.Second)
	agg.Observe(metrics.Observation{Kind: metrics.MetadataRequests, Exe: "/usr/bin/curl", User: "root", Time: seen})
	agg.Observe(metrics.Observation{Kind: metrics.MetadataNoToken, Exe: "/usr/bin/curl", User: "root", Time: seen})
	agg.Observe(metrics.Observation{Kind: metrics.MetadataDenied, Exe: "/tmp/evil", User: "nobody", Container: "pod/shop/web/app"})
	id := hostid.Identity{InstanceID: "i-0abc", Region: "eu-west-1", AccountID: "123456789012"}
	srv, err := Listen(path, Source{Processes: agg.Processes, Identity: func() (hostid.Identity, bool) { return id, true }},
		zerolog.New(zerolog.NewTestWriter(t)))
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, %v", fi.Mode(), err)
	}
	// A second agent must not steal a live socket.
	if _, err := Listen(path, Source{Processes: agg.Processes}, zerolog.Nop()); err == nil ||
		!strings.Contains(err.Error(), "another agent") {
		t.Errorf("second Listen: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := Fetch(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if r.Identity == nil || r.Identity.InstanceID != "i-0abc" || len(r.Processes) != 2 {
		t.Fatalf("report %+v", r)
	}
	var buf bytes.Buffer
	if err := WriteTable(&buf, r); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	// instance line, blank, header, two rows; the denied process was seen last.
	if len(lines) != 5 || !strings.HasPrefix(lines[2], "EXE") || !strings.HasPrefix(lines[3], "/tmp/evil") {
		t.Fatalf("table:\n%s", out)
	}
	if f := strings.Fields(lines[4]); len(f) < 12 || f[0] != "/usr/bin/curl" || f[1] != "root" || f[2] != "unknown" ||
		f[3] != "1" || f[4] != "1" || f[10] != "1m" {
		t.Errorf("curl row %q", lines[4])
	}
	if f := strings.Fields(lines[3]); f[2] != "pod/shop/web/app" || f[8] != "1" {
		t.Errorf("denied row %q", lines[3])
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	// A stale socket (agent crashed) is replaced.
	srv2, err := Listen(path, Source{Processes: agg.Processes}, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	srv2.ln.(interface{ SetUnlinkOnClose(bool) }).SetUnlinkOnClose(false)
	srv2.ln.Close()
	srv3, err := Listen(path, Source{Processes: agg.Processes}, zerolog.Nop())
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	srv3.Close()
}

func TestFetchWithoutAgent(t *testing.T) {
	_, err := Fetch(context.Background(), filepath.Join(t.TempDir(), "none.sock"))
	if err == nil || !strings.Contains(err.Error(), "is `imdsguard run` running") {
		t.Errorf("Fetch without agent: %v", err)
	}
}

func TestEmptyTable(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteTable(&buf, Report{Time: time.Now()}); err != nil || !strings.Contains(buf.String(), "no IMDS use") {
		t.Errorf("%q %v", buf.String(), err)
	}
}

func TestNamespacesTable(t *testing.T) {
	now := time.Now()
	var buf bytes.Buffer
	r := Report{Time: now, Namespaces: []netns.Endpoint{
		{Cookie: 4099, Inode: 4026532177, PID: 812, Since: now.Add(-90 * time.Second), Families: netns.Families{IPv4: true, IPv6: true}},
		{Cookie: 4100, Inode: 4026532246, PID: 900, Since: now.Add(-5 * time.Second), Families: netns.Families{IPv6: true}},
	}}
	if err := WriteTable(&buf, r); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, want := range []string{"no IMDS use", "2 network namespaces served", "NETNS COOKIE", "4099", "4026532177", "812", "ipv4,ipv6", "1m ago", "4100", "ipv6", "5s ago"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}
