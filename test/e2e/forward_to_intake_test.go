package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator"
	"github.com/imdsguard/imdsguard/internal/correlator/iddoc"
	"github.com/imdsguard/imdsguard/internal/correlator/intake"
	"github.com/imdsguard/imdsguard/internal/testing/syncbuf"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// TestPrivilegedAgentForwardsToIntake: a client fetches role credentials through the
// broker; the agent spools the fingerprint and forwards it, with the bed's signed
// identity document, to the intake; the intake verifies and stores it; then `serve`, on
// that database, names the client process in the finding CloudTrail raises. No output
// and no stored byte carries the secret.
func TestPrivilegedAgentForwardsToIntake(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	dir := t.TempDir()
	awsCert := filepath.Join(dir, "aws.pem")
	if err := os.WriteFile(awsCert, bed.SigningCertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	certs, err := iddoc.ParseCertificates(bed.SigningCertPEM)
	if err != nil {
		t.Fatal(err)
	}
	dbPath := filepath.Join(dir, "fingerprints.db")
	store, err := intake.OpenSQLite(dbPath, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	h := intake.NewHandler(intake.Options{Store: store, AWSCertificates: certs, AllowedAccounts: []string{bed.AccountID}, Log: zerolog.Nop()})
	// The agent runs in the bed's network namespace: the intake listens on its loopback.
	var ln net.Listener
	if err := testbed.InNetns(bed.NetnsPath, func() error {
		var err error
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	srv, err := intake.NewServer(intake.ServerConfig{Listen: ln.Addr().String(), PlainHTTP: true, PurgeGrace: time.Hour}, h, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()

	agent, err := bed.StartAgent("fingerprints:\n  correlator:\n    url: http://" + ln.Addr().String() + "/v1/fingerprints\n")
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	client, err := testbed.ClientBinary()
	if err != nil {
		t.Fatal(err)
	}
	r := bed.RunCommand(context.Background(), "sdk", "", testbed.Placement{}, client, "sdk")
	if r.Err != nil {
		t.Fatal(r.Err)
	}
	var got []wire.Fingerprint
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		got = store.ByAccessKey(bed.Creds.AccessKeyID)
		if len(got) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no fingerprint reached the intake; counts %+v; agent log:\n%s", h.Counts(), agent.Log())
		}
	}
	if err := agent.Stop(); err != nil {
		t.Fatalf("agent stop: %v", err)
	}
	cancel()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	store.Close()
	fp := got[0]
	if len(got) != 1 || fp.Process.PID != r.PID || fp.Process.Exe != r.Exe || fp.Instance.ID != bed.InstanceID || fp.Instance.AccountID != bed.AccountID {
		t.Fatalf("stored fingerprint %+v; want pid %d exe %s instance %s", got, r.PID, r.Exe, bed.InstanceID)
	}
	if c := h.Counts(); c.Accepted != 1 || c.Refused["bad_signature"] != 0 {
		t.Fatalf("intake counts %+v", c)
	}

	// serve, on the database the intake filled, names the process.
	watched := filepath.Join(dir, "trail")
	os.MkdirAll(watched, 0o755)
	ranges := filepath.Join(dir, "ip-ranges.json")
	os.WriteFile(ranges, []byte(`{"syncToken":"1","createDate":"2026-11-20-00-00-00","prefixes":[{"ip_prefix":"3.0.0.0/8","region":"us-east-1","service":"AMAZON","network_border_group":"us-east-1"}],"ipv6_prefixes":[]}`), 0o600)
	cfg := filepath.Join(dir, "c.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("ip_ranges: %s\nserve:\n  directory: %s\n  poll_interval: 100ms\nintake:\n  listen: 127.0.0.1:0\n  plain_http: true\n  aws_certificates: [%s]\n  allowed_accounts: [%q]\n  database: %s\n",
		ranges, watched, awsCert, bed.AccountID, dbPath)), 0o600)
	trail := filepath.Join(watched, "trail.json")
	os.WriteFile(trail, []byte(fmt.Sprintf(`{"Records":[{"eventVersion":"1.08","eventTime":%q,"eventSource":"s3.amazonaws.com","eventName":"ListBuckets","awsRegion":"us-east-1","sourceIPAddress":"198.51.100.23","userIdentity":{"type":"AssumedRole","arn":"arn:aws:sts::%s:assumed-role/%s/%s","accountId":%q,"accessKeyId":%q},"eventID":"e1","eventType":"AwsApiCall"}]}`,
		time.Now().UTC().Format(time.RFC3339), bed.AccountID, testbed.Role, bed.InstanceID, bed.AccountID, bed.Creds.AccessKeyID)), 0o644)
	past := time.Now().Add(-time.Minute)
	os.Chtimes(trail, past, past)
	sctx, scancel := context.WithCancel(context.Background())
	defer scancel()
	var out, errb syncbuf.Buffer
	done := make(chan int, 1)
	go func() { done <- correlator.Run(sctx, "", []string{"serve", "--config", cfg}, nil, &out, &errb) }()
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(out.String(), bed.Creds.AccessKeyID); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no finding; out:\n%s\nerr:\n%s", out.String(), errb.String())
		}
	}
	scancel()
	if code := <-done; code != 0 {
		t.Fatalf("serve exit %d: %s", code, errb.String())
	}
	fs := decodeFindings(t, out.String())
	if len(fs) != 1 || len(fs[0].Processes) != 1 || fs[0].Processes[0].PID != r.PID || fs[0].Processes[0].Exe != r.Exe {
		t.Fatalf("finding does not name the client (pid %d, %s): %s", r.PID, r.Exe, out.String())
	}
	db, _ := os.ReadFile(dbPath)
	wal, _ := os.ReadFile(dbPath + "-wal")
	checkNoSecrets(t, "fingerprint database", string(db)+string(wal), bed)
	checkNoSecrets(t, "agent log", agent.Log(), bed)
	checkNoSecrets(t, "serve output", out.String()+errb.String(), bed)
	if regexp.MustCompile(`"event":"intake_refused"`).MatchString(errb.String()) {
		t.Fatalf("serve refused something: %s", errb.String())
	}
}
