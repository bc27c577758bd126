package e2e

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/iddoc"
	"github.com/imdsguard/imdsguard/internal/correlator/intake"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// gate stands between the agent and the intake: down (503, nothing stored), lossy (the
// batch is stored but the answer is lost, so the agent must send it again), or open.
type gate struct {
	mode atomic.Int32 // 0 down, 1 lossy once, 2 open
	next http.Handler
}

func (g *gate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch g.mode.Load() {
	case 0:
		http.Error(w, `{"error":"down"}`, http.StatusServiceUnavailable)
	case 1:
		g.next.ServeHTTP(httptest.NewRecorder(), r) // stored, answer dropped
		g.mode.Store(2)
		http.Error(w, `{"error":"lost"}`, http.StatusServiceUnavailable)
	default:
		g.next.ServeHTTP(w, r)
	}
}

// TestPrivilegedSpoolSurvivesOutageAndKill: the correlator is down while clients fetch
// credentials; the agent is killed with SIGKILL with its spool full and restarted; then
// the correlator stores a batch but the answer is lost. Every fingerprint arrives, none
// twice.
func TestPrivilegedSpoolSurvivesOutageAndKill(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	certs, err := iddoc.ParseCertificates(bed.SigningCertPEM)
	if err != nil {
		t.Fatal(err)
	}
	store, err := intake.OpenSQLite(t.TempDir()+"/fp.db", zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	h := intake.NewHandler(intake.Options{Store: store, AWSCertificates: certs, AllowedAccounts: []string{bed.AccountID}, Log: zerolog.Nop()})
	g := &gate{next: h}
	var ln net.Listener
	if err := testbed.InNetns(bed.NetnsPath, func() error {
		var err error
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: g}
	go srv.Serve(ln)
	defer srv.Close()

	extra := "fingerprints:\n  correlator:\n    url: http://" + ln.Addr().String() + "/v1/fingerprints\n"
	agent, err := bed.StartAgent(extra)
	if err != nil {
		t.Fatal(err)
	}
	client, err := testbed.ClientBinary()
	if err != nil {
		t.Fatal(err)
	}
	const clients = 4
	pids := map[int]bool{}
	for i := 0; i < clients; i++ {
		r := bed.RunCommand(context.Background(), "sdk", "", testbed.Placement{}, client, "sdk")
		if r.Err != nil {
			t.Fatal(r.Err)
		}
		pids[r.PID] = true
	}
	// Spooled (the local copy is written after the spool), then the agent dies hard.
	for deadline := time.Now().Add(10 * time.Second); countLines(agent.FingerprintsPath) < clients; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d fingerprints spooled, want %d", countLines(agent.FingerprintsPath), clients)
		}
	}
	agent.Kill()
	if h.Counts().Accepted != 0 {
		t.Fatal("the correlator was down, yet took fingerprints")
	}
	g.mode.Store(1)
	agent, err = bed.StartAgent(extra)
	if err != nil {
		t.Fatal(err)
	}
	defer agent.Stop()
	for deadline := time.Now().Add(30 * time.Second); len(store.ByAccessKey(bed.Creds.AccessKeyID)) < clients; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d fingerprints arrived; counts %+v\n%s", len(store.ByAccessKey(bed.Creds.AccessKeyID)), clients, h.Counts(), agent.Log())
		}
	}
	// The lost answer made the agent send the same batch again: counted as duplicates,
	// stored once.
	for deadline := time.Now().Add(30 * time.Second); h.Counts().Duplicates == 0; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the batch whose answer was lost was never sent again; counts %+v", h.Counts())
		}
	}
	got := store.ByAccessKey(bed.Creds.AccessKeyID)
	seen := map[string]bool{}
	for _, fp := range got {
		if seen[fp.ID] || !pids[fp.Process.PID] {
			t.Errorf("fingerprint %s (pid %d) doubled or from no client", fp.ID, fp.Process.PID)
		}
		seen[fp.ID] = true
	}
	if len(got) != clients {
		t.Errorf("%d fingerprints stored, want %d", len(got), clients)
	}
}

func countLines(path string) int {
	data, _ := os.ReadFile(path)
	return strings.Count(string(data), "\n")
}
