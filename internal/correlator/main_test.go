package correlator

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/correlator/outputs/outputstest"
	"github.com/imdsguard/imdsguard/internal/correlator/trailqueue/sqstest"
	"github.com/imdsguard/imdsguard/internal/correlator/trailwatch/trailwatchtest"
	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
	"github.com/imdsguard/imdsguard/internal/testing/findingtest"
	"github.com/imdsguard/imdsguard/internal/testing/pgtest"
	"github.com/imdsguard/imdsguard/internal/testing/syncbuf"
)

// corpusDir holds the labelled corpus as tools/gen-corpus writes it.
var corpusDir string

func TestMain(m *testing.M) {
	// The test binary doubles as the correlator, for tests that must kill a replica.
	if os.Getenv("IMDSGUARD_TEST_CORRELATOR") == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
		code := Run(ctx, "", os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	dir, err := os.MkdirTemp("", "corpus")
	if err != nil {
		panic(err)
	}
	if err := ctcorpus.WriteDir(dir, 1, nil); err != nil {
		panic(err)
	}
	// Settled files: serve's directory lister reads them all in its first cycle.
	past := time.Now().Add(-time.Minute)
	filepath.Walk(dir, func(p string, info os.FileInfo, err error) error { os.Chtimes(p, past, past); return nil })
	corpusDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	if pg != nil {
		if err := pg.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stop postgres:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// pg is the PostgreSQL of this test binary, started by the first test that needs it.
var (
	pg     *pgtest.Server
	pgErr  error
	pgOnce sync.Once
)

// postgresDSN gives the test a new database on the shared server. Without PostgreSQL
// installed the test is skipped, except under make test, where it must run.
func postgresDSN(t *testing.T) string {
	t.Helper()
	pgOnce.Do(func() { pg, pgErr = pgtest.Start() })
	if errors.Is(pgErr, pgtest.ErrNoPostgres) && os.Getenv("IMDSGUARD_PRIVILEGED") != "1" {
		t.Skip(pgErr)
	}
	if pgErr != nil {
		t.Fatal(pgErr)
	}
	dsn, err := pg.NewDatabase(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return dsn
}

func sharedCorpus(*testing.T) string { return corpusDir }

func runCmd(t *testing.T, stdin string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := Run(context.Background(), "", args, strings.NewReader(stdin), &out, &errb)
	return code, out.String(), errb.String()
}

func decodeFindings(t *testing.T, s string) []detector.Finding { return findingtest.Decode(t, s) }

func readLabels(t *testing.T, dir string) []ctcorpus.Label {
	data, err := os.ReadFile(filepath.Join(dir, "labels.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	var ls []ctcorpus.Label
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		var l ctcorpus.Label
		json.Unmarshal([]byte(line), &l)
		ls = append(ls, l)
	}
	return ls
}

func TestDetectCorpusFiles(t *testing.T) {
	dir := sharedCorpus(t)
	code, out, errs := runCmd(t, "", "detect", "--config", filepath.Join(dir, "config.yaml"), filepath.Join(dir, "cloudtrail"))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	fs := decodeFindings(t, out)
	have := map[string]detector.Finding{}
	for _, f := range fs {
		have[f.AccessKeyID+" "+f.SourceIP+" "+f.Type] = f
	}
	for _, l := range readLabels(t, dir) {
		if l.Type == "" {
			continue
		}
		f, ok := have[l.AccessKeyID+" "+l.SourceIP+" "+l.Type]
		if !ok || f.Severity != l.Severity || f.Suppressed != l.Suppressed {
			t.Errorf("positive %s from %s (%s %s) not found right: %+v", l.AccessKeyID, l.SourceIP, detector.ShortType(l.Type), l.Severity, f)
		}
	}
	if !strings.Contains(errs, `"event":"record_skipped"`) || !strings.Contains(errs, `"malformed":3`) {
		t.Errorf("malformed records not reported: %s", errs)
	}
}

func TestDetectStdinAndFingerprintsFlag(t *testing.T) {
	dir := sharedCorpus(t)
	lake, err := os.ReadFile(filepath.Join(dir, "cloudtrail", "lake-export.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	rec := `{"eventVersion":"1.09","userIdentity":{"type":"AssumedRole","arn":"arn:aws:sts::111111111111:assumed-role/web/x","accountId":"111111111111","accessKeyId":"` + ctcorpus.KeyA1 + `","sessionContext":{"sessionIssuer":{"userName":"web"}}},"eventTime":"2026-11-20T09:00:00Z","eventSource":"sts.amazonaws.com","eventName":"GetCallerIdentity","sourceIPAddress":"192.0.2.99"}`
	cfg := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(cfg, []byte("ip_ranges: "+filepath.Join(dir, "ip-ranges.json")+"\n"), 0o600)
	code, out, errs := runCmd(t, string(lake)+rec+"\n", "detect", "--config", cfg, "--fingerprints", filepath.Join(dir, "fingerprints.jsonl"), "-")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	var got *detector.Finding
	for _, f := range decodeFindings(t, out) {
		if f.SourceIP == "192.0.2.99" {
			got = &f
		}
	}
	if got == nil || got.Type != detector.TypeOutsideAWS || got.InstanceID != ctcorpus.InstA1 || len(got.Processes) != 1 || got.Processes[0].Exe != "/usr/bin/curl" {
		t.Fatalf("finding from the fingerprinted key: %+v\n%s", got, out)
	}
}

func TestConfigErrorNamesKeyAndLine(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(cfg, []byte("window: 1h\negress_cidrs: [\"300.1.1.1/32\"]\n"), 0o600)
	code, _, errs := runCmd(t, "", "detect", "--config", cfg, "/nonexistent")
	if code != 1 || !strings.Contains(errs, cfg+":2: egress_cidrs[0]: not a CIDR or address") {
		t.Fatalf("exit %d: %s", code, errs)
	}
	if code, _, errs := runCmd(t, "", "investigate"); code != 2 || !strings.Contains(errs, "--access-key") {
		t.Fatalf("exit %d: %s", code, errs)
	}
}

func TestInvestigateJSON(t *testing.T) {
	dir := sharedCorpus(t)
	code, out, errs := runCmd(t, "", "investigate", "--config", filepath.Join(dir, "config.yaml"), "--access-key", ctcorpus.KeyA1, "--format", "json", filepath.Join(dir, "cloudtrail"))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	var s struct {
		Issued struct {
			InstanceID string `json:"instance_id"`
		}
		Sources  []struct{ Address string }
		Findings []detector.Finding
	}
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatal(err, out)
	}
	if s.Issued.InstanceID != ctcorpus.InstA1 || len(s.Sources) < 6 || len(s.Findings) != 2 {
		t.Fatalf("%+v", s)
	}
	code, out, _ = runCmd(t, "", "investigate", "--config", filepath.Join(dir, "config.yaml"), "--access-key", ctcorpus.KeyA1, filepath.Join(dir, "cloudtrail"))
	if code != 0 || !strings.Contains(out, "pid 4242 /usr/bin/curl") {
		t.Fatalf("text: %s", out)
	}
}

func TestServeFollowsDirectoryWebhookASFFAndCheckpoint(t *testing.T) {
	dir := sharedCorpus(t)
	var mu sync.Mutex
	posted := map[string]int{}
	fail := 1
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if fail > 0 { // the first post fails: retried
			fail--
			http.Error(w, "down", http.StatusBadGateway)
			return
		}
		var f detector.Finding
		json.NewDecoder(r.Body).Decode(&f)
		posted[f.ID]++
	}))
	defer hook.Close()
	work := t.TempDir()
	watched := filepath.Join(work, "trail")
	os.MkdirAll(watched, 0o755)
	cfg := filepath.Join(work, "c.yaml")
	asff := filepath.Join(work, "findings.asff.json")
	body, _ := os.ReadFile(filepath.Join(dir, "config.yaml"))
	body = append(body, []byte("serve:\n  directory: "+watched+"\n  checkpoint: "+filepath.Join(work, "cp.json")+"\n  poll_interval: 100ms\n"+
		"outputs:\n  asff_file: "+asff+"\n  metrics_file: "+filepath.Join(work, "metrics.emf")+"\n  webhook:\n    url: "+hook.URL+"\n    backoff: 1ms\n")...)
	os.WriteFile(cfg, body, 0o600)

	serve := func(until func(out string) bool) string {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var out, errb syncbuf.Buffer
		done := make(chan int)
		go func() { done <- Run(ctx, "", []string{"serve", "--config", cfg}, nil, &out, &errb) }()
		deadline := time.After(20 * time.Second)
		for !until(out.String()) {
			select {
			case code := <-done:
				t.Fatalf("serve exited %d: %s", code, errb.String())
			case <-deadline:
				t.Fatalf("serve: timed out; out:\n%s\nerr:\n%s", out.String(), errb.String())
			case <-time.After(50 * time.Millisecond):
			}
		}
		cancel()
		if code := <-done; code != 0 {
			t.Fatalf("serve exit %d: %s", code, errb.String())
		}
		return out.String()
	}
	// Files arrive: copied in with a rename, as a delivery agent would.
	src := filepath.Join(dir, "cloudtrail")
	filepath.Walk(src, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			data, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(src, p)
			dst := filepath.Join(watched, rel)
			os.MkdirAll(filepath.Dir(dst), 0o755)
			os.WriteFile(dst+".part", data, 0o644)
			os.Rename(dst+".part", dst)
		}
		return nil
	})
	past := time.Now().Add(-time.Minute)
	filepath.Walk(watched, func(p string, info os.FileInfo, err error) error { os.Chtimes(p, past, past); return nil })
	out := serve(func(out string) bool {
		mu.Lock()
		defer mu.Unlock()
		return strings.Count(out, "\n") >= 13 && len(posted) >= 12
	})
	fs := decodeFindings(t, out)
	if len(fs) != 13 {
		t.Fatalf("%d findings:\n%s", len(fs), out)
	}
	mu.Lock()
	if len(posted) != 12 { // every unsuppressed finding, once
		t.Errorf("webhook got %d findings: %v", len(posted), posted)
	}
	for id, n := range posted {
		if n != 1 {
			t.Errorf("finding %s posted %d times", id, n)
		}
	}
	mu.Unlock()
	var doc struct{ Findings []map[string]any }
	data, _ := os.ReadFile(asff)
	if json.Unmarshal(data, &doc); len(doc.Findings) != 13 {
		t.Errorf("asff file has %d findings", len(doc.Findings))
	}
	// Restart: the checkpoint says everything was read; a new file is read alone.
	rec := `{"eventVersion":"1.09","userIdentity":{"type":"AssumedRole","arn":"arn:aws:sts::111111111111:assumed-role/web/x","accountId":"111111111111","accessKeyId":"` + ctcorpus.KeyA1 + `"},"eventTime":"2026-11-20T09:00:00Z","eventSource":"s3.amazonaws.com","eventName":"ListBuckets","sourceIPAddress":"192.0.2.123"}`
	os.WriteFile(filepath.Join(watched, "late.json"), []byte(`{"Records":[`+rec+`]}`), 0o644)
	os.Chtimes(filepath.Join(watched, "late.json"), past, past)
	out = serve(func(out string) bool { return strings.Contains(out, "192.0.2.123") })
	if fs := decodeFindings(t, out); len(fs) != 1 || fs[0].SourceIP != "192.0.2.123" || fs[0].Processes[0].Exe != "/usr/bin/curl" {
		t.Fatalf("after restart: %s", out)
	}
}

func TestServeFollowsS3(t *testing.T) {
	dir := sharedCorpus(t)
	fake := trailwatchtest.NewS3("trail")
	src := filepath.Join(dir, "cloudtrail", "AWSLogs")
	n := 0
	filepath.Walk(src, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			data, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(filepath.Join(dir, "cloudtrail"), p)
			fake.Put(filepath.ToSlash(rel), string(data))
			n++
		}
		return nil
	})
	srv := httptest.NewServer(fake)
	defer srv.Close()
	// The SDK's default chain, kept to this test: static keys, no IMDS, no files.
	t.Setenv("AWS_ACCESS_KEY_ID", trailwatchtest.AccessKeyID)
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	work := t.TempDir()
	cfg := filepath.Join(work, "c.yaml")
	body, _ := os.ReadFile(filepath.Join(dir, "config.yaml"))
	body = append(body, []byte("serve:\n  s3:\n    bucket: trail\n    prefix: AWSLogs/\n    endpoint: "+srv.URL+"\n    path_style: true\n"+
		"  checkpoint: "+filepath.Join(work, "cp.json")+"\n  poll_interval: 100ms\n")...)
	os.WriteFile(cfg, body, 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errb syncbuf.Buffer
	done := make(chan int)
	go func() { done <- Run(ctx, "", []string{"serve", "--config", cfg}, nil, &out, &errb) }()
	deadline := time.After(20 * time.Second)
	// The JSON-lines export is not in the bucket: 4 gzip files hold 4/5 of the corpus.
	for !strings.Contains(errb.String(), `"event":"detect_cycle","files":`+strconv.Itoa(n)) {
		select {
		case code := <-done:
			t.Fatalf("serve exited %d: %s", code, errb.String())
		case <-deadline:
			t.Fatalf("timed out: %s", errb.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	if len(decodeFindings(t, out.String())) == 0 {
		t.Fatalf("no findings from S3: %s", errb.String())
	}
	cp, _ := os.ReadFile(filepath.Join(work, "cp.json"))
	if strings.Count(string(cp), ".json.gz") != n {
		t.Fatalf("checkpoint: %s", cp)
	}
}

func TestDetectGoesOnPastBadFiles(t *testing.T) {
	dir := sharedCorpus(t)
	bad := t.TempDir()
	gz, err := filepath.Glob(filepath.Join(dir, "cloudtrail", "AWSLogs", "*", "CloudTrail", "*", "*", "*", "*", "*part1.json.gz"))
	if err != nil || len(gz) != 1 {
		t.Fatalf("glob: %v %v", gz, err)
	}
	data, _ := os.ReadFile(gz[0])
	os.WriteFile(filepath.Join(bad, "cut.json.gz"), data[:len(data)/2], 0o644)
	os.WriteFile(filepath.Join(bad, "garbage.json"), []byte("not json at all\n{\"Records\": 7}\n"), 0o644)
	code, out, errs := runCmd(t, "", "detect", "--config", filepath.Join(dir, "config.yaml"),
		filepath.Join(bad, "cut.json.gz"), filepath.Join(bad, "missing.json"), filepath.Join(bad, "garbage.json"), filepath.Join(dir, "cloudtrail"))
	if code != 1 || !strings.Contains(errs, "missing.json") {
		t.Fatalf("a missing input must fail the run after the others were read: exit %d\n%s", code, errs)
	}
	if !strings.Contains(errs, `"event":"file_truncated","file":"`+filepath.Join(bad, "cut.json.gz")) || !strings.Contains(errs, `"event":"detect_done"`) {
		t.Fatalf("truncation not reported: %s", errs)
	}
	if len(decodeFindings(t, out)) < 13 {
		t.Fatalf("findings lost: %s", out)
	}
}

func TestDetectPutsCloudWatchMetrics(t *testing.T) {
	dir := sharedCorpus(t)
	var mu sync.Mutex
	calls := 0
	cw := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasSuffix(r.URL.Path, "/operation/PutMetricData") {
			http.Error(w, "unexpected", http.StatusBadRequest)
			return
		}
		mu.Lock()
		calls++
		mu.Unlock()
		w.Header().Set("Smithy-Protocol", "rpc-v2-cbor")
		w.Header().Set("Content-Type", "application/cbor")
		w.Write([]byte{0xa0}) // an empty CBOR map
	}))
	defer cw.Close()
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	cfg := filepath.Join(t.TempDir(), "c.yaml")
	body, _ := os.ReadFile(filepath.Join(dir, "config.yaml"))
	os.WriteFile(cfg, append(body, []byte("outputs:\n  cloudwatch:\n    namespace: imdsguard\n    endpoint: "+cw.URL+"\n")...), 0o600)
	code, _, errs := runCmd(t, "", "detect", "--config", cfg, filepath.Join(dir, "cloudtrail"))
	if code != 0 || strings.Contains(errs, "output_failed") {
		t.Fatalf("exit %d: %s", code, errs)
	}
	mu.Lock()
	defer mu.Unlock()
	if calls != 1 {
		t.Fatalf("PutMetricData called %d times", calls)
	}
}

func TestCheckConfigAndUpdateIPRanges(t *testing.T) {
	dir := t.TempDir()
	ranges := filepath.Join(dir, "ip-ranges.json")
	os.WriteFile(ranges, []byte(ctcorpus.IPRangesJSON), 0o644)
	cfg := filepath.Join(dir, "c.yaml")
	os.WriteFile(cfg, []byte("ip_ranges: "+ranges+"\n"), 0o600)
	if code, out, errs := runCmd(t, "", "check-config", cfg); code != 0 || !strings.Contains(out, "ok") {
		t.Fatalf("check-config: %d %s %s", code, out, errs)
	}
	bad := filepath.Join(dir, "bad.json")
	os.WriteFile(bad, []byte(`{"prefixes":[]}`), 0o644)
	if code, _, errs := runCmd(t, "", "update-ip-ranges", "--config", cfg, bad); code != 1 || !strings.Contains(errs, "no prefixes") {
		t.Fatalf("bad update: %d %s", code, errs)
	}
	newer := filepath.Join(dir, "new.json")
	os.WriteFile(newer, []byte(strings.Replace(ctcorpus.IPRangesJSON, "1763596800", "1763700000", 1)), 0o644)
	if code, out, errs := runCmd(t, "", "update-ip-ranges", "--config", cfg, newer); code != 0 || !strings.Contains(out, "syncToken 1763700000") {
		t.Fatalf("update: %d %s %s", code, out, errs)
	}
	if data, _ := os.ReadFile(ranges); !strings.Contains(string(data), "1763700000") {
		t.Fatal("not installed")
	}
}

// A webhook that never answers holds up neither detection nor the other outputs:
// EventBridge and Security Hub get every finding once, through the real SDK, and
// serve stops after outputs.shutdown_grace.
func TestServeOutputsOffTheDetectionPath(t *testing.T) {
	dir := sharedCorpus(t)
	hung := make(chan struct{})
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-hung:
		case <-r.Context().Done():
		}
	}))
	defer hook.Close()
	defer close(hung)
	eb, sh := &outputstest.EventBridge{FailFirstEntry: true}, &outputstest.SecurityHub{FailFirstFinding: true}
	ebSrv, shSrv := httptest.NewServer(eb), httptest.NewServer(sh)
	defer ebSrv.Close()
	defer shSrv.Close()
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	work := t.TempDir()
	cfg := filepath.Join(work, "c.yaml")
	body, _ := os.ReadFile(filepath.Join(dir, "config.yaml"))
	body = append(body, []byte("serve:\n  directory: "+filepath.Join(dir, "cloudtrail")+"\n  poll_interval: 100ms\n"+
		"outputs:\n  shutdown_grace: 200ms\n  webhook:\n    url: "+hook.URL+"\n    timeout: 1h\n"+
		"  eventbridge:\n    event_bus: default\n    endpoint: "+ebSrv.URL+"\n    backoff: 1ms\n"+
		"  security_hub:\n    enabled: true\n    endpoint: "+shSrv.URL+"\n    backoff: 1ms\n")...)
	os.WriteFile(cfg, body, 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errb syncbuf.Buffer
	done := make(chan int)
	go func() { done <- Run(ctx, "", []string{"serve", "--config", cfg}, nil, &out, &errb) }()
	deadline := time.After(20 * time.Second)
	for len(eb.Entries()) < 12 || len(sh.Findings()) < 13 || strings.Count(out.String(), "\n") < 13 {
		select {
		case code := <-done:
			t.Fatalf("serve exited %d: %s", code, errb.String())
		case <-deadline:
			t.Fatalf("timed out: %d events, %d imports, out:\n%s\nerr:\n%s", len(eb.Entries()), len(sh.Findings()), out.String(), errb.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("serve exit %d: %s", code, errb.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not stop after outputs.shutdown_grace")
	}
	if !strings.Contains(errb.String(), `"event":"outputs_cut_short"`) || !strings.Contains(errb.String(), "webhook") {
		t.Errorf("no word of the undelivered webhook: %s", errb.String())
	}
	if r := append(eb.Refused(), sh.Refused()...); len(r) > 0 {
		t.Fatalf("stand-ins refused: %v", r)
	}
	events := map[string]int{}
	for _, e := range eb.Entries() {
		var d struct{ ID string }
		json.Unmarshal([]byte(e["Detail"].(string)), &d)
		events[d.ID]++
	}
	imports := map[string]int{}
	for _, f := range sh.Findings() {
		imports[f["Id"].(string)]++
	}
	for _, f := range decodeFindings(t, out.String()) {
		if n := imports[f.ID]; n != 1 {
			t.Errorf("finding %s imported %d times", f.ID, n)
		}
		if want := map[bool]int{true: 0, false: 1}[f.Suppressed]; events[f.ID] != want {
			t.Errorf("finding %s (suppressed %v) put %d times", f.ID, f.Suppressed, events[f.ID])
		}
	}
}

// Two replicas on one PostgreSQL read the same trail: between them, each finding is
// printed and put on EventBridge once.
func TestServeReplicasPublishEachFindingOnce(t *testing.T) {
	dir := sharedCorpus(t)
	dsn := postgresDSN(t)
	eb := &outputstest.EventBridge{}
	ebSrv := httptest.NewServer(eb)
	defer ebSrv.Close()
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	base, _ := os.ReadFile(filepath.Join(dir, "config.yaml"))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type replica struct {
		out, errb syncbuf.Buffer
		done      chan int
	}
	rs := make([]*replica, 2)
	for i := range rs {
		work := t.TempDir()
		cfg := filepath.Join(work, "c.yaml")
		body := append(slices.Clone(base), []byte("serve:\n  directory: "+filepath.Join(dir, "cloudtrail")+"\n  checkpoint: "+filepath.Join(work, "cp.json")+
			"\n  poll_interval: 100ms\nstore:\n  driver: postgres\n  dsn: \""+dsn+"\"\n"+
			"outputs:\n  eventbridge:\n    event_bus: default\n    endpoint: "+ebSrv.URL+"\n")...)
		os.WriteFile(cfg, body, 0o600)
		r := &replica{done: make(chan int, 1)}
		rs[i] = r
		go func() { r.done <- Run(ctx, "", []string{"serve", "--config", cfg}, nil, &r.out, &r.errb) }()
	}
	deadline := time.After(30 * time.Second)
	// A replica that starts after the other saved its state restores it (and its
	// checkpoint) and has nothing left to read: it never logs a cycle of its own. Wait
	// for both to run and for the findings, then for a few more polls.
	for !strings.Contains(rs[0].errb.String(), `"event":"correlator_starting"`) || !strings.Contains(rs[1].errb.String(), `"event":"correlator_starting"`) ||
		len(eb.Entries()) < 12 {
		select {
		case <-deadline:
			t.Fatalf("timed out; %d events\nreplica 0:\n%s\nreplica 1:\n%s", len(eb.Entries()), rs[0].errb.String(), rs[1].errb.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	time.Sleep(500 * time.Millisecond) // five polls: a second publication, if there were one, would be out by now
	cancel()
	for i, r := range rs {
		if code := <-r.done; code != 0 {
			t.Fatalf("replica %d exit %d: %s", i, code, r.errb.String())
		}
	}
	seen := map[string]int{}
	for _, r := range rs {
		for _, f := range decodeFindings(t, r.out.String()) {
			seen[f.ID]++
		}
	}
	if len(seen) != 13 {
		t.Fatalf("%d distinct findings printed", len(seen))
	}
	for id, n := range seen {
		if n != 1 {
			t.Errorf("finding %s printed %d times", id, n)
		}
	}
	if n := len(eb.Entries()); n != 12 {
		t.Errorf("%d events put, want 12", n)
	}
}

// Two replicas share one queue and one PostgreSQL: each object is read once, each
// finding printed once between them, and a poison message goes to the dead-letter
// list with a log line instead of looping.
func TestServeSQSReplicas(t *testing.T) {
	dir := sharedCorpus(t)
	dsn := postgresDSN(t)
	fake := trailwatchtest.NewS3("trail")
	queue := &sqstest.Queue{MaxReceiveCount: 2}
	var keys []string
	src := filepath.Join(dir, "cloudtrail", "AWSLogs")
	filepath.Walk(src, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			data, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(filepath.Join(dir, "cloudtrail"), p)
			key := filepath.ToSlash(rel)
			fake.Put(key, string(data))
			keys = append(keys, key)
		}
		return nil
	})
	s3srv, sqsSrv := httptest.NewServer(fake), httptest.NewServer(queue)
	defer s3srv.Close()
	defer sqsSrv.Close()
	for i, k := range keys {
		ev := fmt.Sprintf(`{"Records":[{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"trail"},"object":{"key":%q,"size":%d}}}]}`,
			strings.ReplaceAll(k, " ", "+"), 100)
		if i%2 == 1 { // half arrive through SNS
			ev = fmt.Sprintf(`{"Type":"Notification","Message":%q}`, ev)
		}
		queue.Send(ev)
	}
	queue.Send(`{"Records":[{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"trail"},"object":{"key":"AWSLogs/gone.json.gz","size":1}}}]}`)
	t.Setenv("AWS_ACCESS_KEY_ID", trailwatchtest.AccessKeyID)
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	base, _ := os.ReadFile(filepath.Join(dir, "config.yaml"))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type replica struct {
		out, errb syncbuf.Buffer
		done      chan int
	}
	rs := make([]*replica, 2)
	for i := range rs {
		cfg := filepath.Join(t.TempDir(), "c.yaml")
		body := append(slices.Clone(base), []byte("serve:\n  s3:\n    endpoint: "+s3srv.URL+"\n    path_style: true\n"+
			"  sqs:\n    queue_url: "+sqsSrv.URL+"/123456789012/trail\n    endpoint: "+sqsSrv.URL+"\n    visibility_timeout: 1s\n"+
			"  poll_interval: 200ms\nstore:\n  driver: postgres\n  dsn: \""+dsn+"\"\n")...)
		os.WriteFile(cfg, body, 0o600)
		r := &replica{done: make(chan int, 1)}
		rs[i] = r
		go func() { r.done <- Run(ctx, "", []string{"serve", "--config", cfg}, nil, &r.out, &r.errb) }()
	}
	deadline := time.After(30 * time.Second)
	for queue.Len() > 0 || len(queue.Dead()) < 1 {
		select {
		case <-deadline:
			t.Fatalf("queue: %d left, %d dead\nreplica 0:\n%s\nreplica 1:\n%s", queue.Len(), len(queue.Dead()), rs[0].errb.String(), rs[1].errb.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	cancel()
	for i, r := range rs {
		if code := <-r.done; code != 0 {
			t.Fatalf("replica %d exit %d: %s", i, code, r.errb.String())
		}
	}
	if queue.Deleted() != len(keys) {
		t.Errorf("%d messages deleted, want %d", queue.Deleted(), len(keys))
	}
	for _, k := range keys {
		if n := fake.Gets(k); n != 1 {
			t.Errorf("%s read %d times", k, n)
		}
	}
	seen := map[string]int{}
	logs := ""
	for _, r := range rs {
		logs += r.errb.String()
		for _, f := range decodeFindings(t, r.out.String()) {
			seen[f.ID]++
		}
	}
	if len(seen) == 0 {
		t.Fatal("no findings")
	}
	for id, n := range seen {
		if n != 1 {
			t.Errorf("finding %s printed %d times", id, n)
		}
	}
	if !strings.Contains(logs, `"event":"poison_message"`) || !strings.Contains(logs, "gone.json.gz") {
		t.Errorf("no poison log line:\n%s", logs)
	}
}

// blockingS3 serves the S3 stand-in, but holds the n-th GetObject until the client goes
// away, and tells when it holds one.
type blockingS3 struct {
	s3      *trailwatchtest.S3
	mu      sync.Mutex
	gets    int
	blockAt int
	holding chan struct{}
}

func (b *blockingS3) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if strings.Count(r.URL.Path, "/") > 1 { // a GetObject
		b.mu.Lock()
		b.gets++
		hold := b.gets == b.blockAt
		b.mu.Unlock()
		if hold {
			close(b.holding)
			<-r.Context().Done()
			return
		}
	}
	b.s3.ServeHTTP(w, r)
}

// A replica SIGKILLed in the middle of an object has recorded nothing and deleted
// nothing: after the visibility timeout another replica gets every message, reads every
// object and prints every finding once.
func TestServeSQSReplicaKilledMidObject(t *testing.T) {
	dir := sharedCorpus(t)
	fake := trailwatchtest.NewS3("trail")
	queue := &sqstest.Queue{MaxReceiveCount: 5}
	var keys []string
	filepath.Walk(filepath.Join(dir, "cloudtrail", "AWSLogs"), func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			data, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(filepath.Join(dir, "cloudtrail"), p)
			fake.Put(filepath.ToSlash(rel), string(data))
			keys = append(keys, filepath.ToSlash(rel))
			queue.Send(fmt.Sprintf(`{"Records":[{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"trail"},"object":{"key":%q}}}]}`, filepath.ToSlash(rel)))
		}
		return nil
	})
	if len(keys) < 3 {
		t.Fatalf("corpus has %d objects", len(keys))
	}
	s3h := &blockingS3{s3: fake, blockAt: 3, holding: make(chan struct{})}
	s3srv, sqsSrv := httptest.NewServer(s3h), httptest.NewServer(queue)
	defer s3srv.Close()
	defer sqsSrv.Close()
	env := []string{"AWS_ACCESS_KEY_ID=" + trailwatchtest.AccessKeyID, "AWS_SECRET_ACCESS_KEY=secret", "AWS_EC2_METADATA_DISABLED=true",
		"AWS_CONFIG_FILE=" + filepath.Join(t.TempDir(), "none"), "AWS_SHARED_CREDENTIALS_FILE=" + filepath.Join(t.TempDir(), "none")}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	base, _ := os.ReadFile(filepath.Join(dir, "config.yaml"))
	cfg := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(cfg, append(slices.Clone(base), []byte("serve:\n  s3:\n    endpoint: "+s3srv.URL+"\n    path_style: true\n"+
		"  sqs:\n    queue_url: "+sqsSrv.URL+"/123456789012/trail\n    endpoint: "+sqsSrv.URL+"\n    visibility_timeout: 1s\n"+
		"  poll_interval: 200ms\n")...), 0o600)

	// Replica 1, a process of its own, is killed while it holds its third object.
	var out1, err1 syncbuf.Buffer
	child := exec.Command(os.Args[0], "serve", "--config", cfg)
	child.Env = append(os.Environ(), "IMDSGUARD_TEST_CORRELATOR=1")
	child.Stdout, child.Stderr = &out1, &err1
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer child.Process.Kill()
	select {
	case <-s3h.holding:
	case <-time.After(30 * time.Second):
		t.Fatalf("replica 1 never reached its third object:\n%s", err1.String())
	}
	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	child.Wait()
	if queue.Deleted() != 0 || out1.String() != "" {
		t.Fatalf("killed replica deleted %d messages, printed %q", queue.Deleted(), out1.String())
	}

	// Replica 2 gets the messages back after the visibility timeout.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out2, err2 syncbuf.Buffer
	done := make(chan int, 1)
	go func() { done <- Run(ctx, "", []string{"serve", "--config", cfg}, nil, &out2, &err2) }()
	deadline := time.After(30 * time.Second)
	for queue.Len() > 0 {
		select {
		case <-deadline:
			t.Fatalf("%d messages left:\n%s", queue.Len(), err2.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("replica 2 exit %d: %s", code, err2.String())
	}
	if queue.Deleted() != len(keys) || len(queue.Dead()) != 0 {
		t.Fatalf("deleted %d of %d, dead %d", queue.Deleted(), len(keys), len(queue.Dead()))
	}
	seen := map[string]int{}
	for _, f := range decodeFindings(t, out2.String()) {
		seen[f.ID]++
	}
	if len(seen) == 0 {
		t.Fatal("no findings after the redelivery")
	}
	for id, n := range seen {
		if n != 1 {
			t.Errorf("finding %s printed %d times", id, n)
		}
	}
}

// A restarted serve keeps its windows and counts (in the database, with its checkpoint):
// a record read after the restart adds to the finding counted before it, and nothing
// already published goes out again.
func TestServeRestartKeepsCounts(t *testing.T) {
	dir := sharedCorpus(t)
	work := t.TempDir()
	watched := filepath.Join(work, "trail")
	os.MkdirAll(watched, 0o755)
	cfg := filepath.Join(work, "c.yaml")
	body, _ := os.ReadFile(filepath.Join(dir, "config.yaml"))
	body = append(body, []byte("serve:\n  directory: "+watched+"\n  checkpoint: "+filepath.Join(work, "cp.json")+"\n  poll_interval: 100ms\n"+
		"store:\n  dsn: "+filepath.Join(work, "state.db")+"\n")...)
	os.WriteFile(cfg, body, 0o600)
	rec := func(at string) string {
		return `{"eventVersion":"1.09","userIdentity":{"type":"AssumedRole","arn":"arn:aws:sts::111111111111:assumed-role/web/x","accountId":"111111111111","accessKeyId":"` +
			ctcorpus.KeyA1 + `"},"eventTime":"` + at + `","eventSource":"s3.amazonaws.com","eventName":"ListBuckets","sourceIPAddress":"192.0.2.123"}`
	}
	past := time.Now().Add(-time.Minute)
	put := func(name, at string) {
		p := filepath.Join(watched, name)
		os.WriteFile(p, []byte(`{"Records":[`+rec(at)+`]}`), 0o644)
		os.Chtimes(p, past, past)
	}
	serve := func() string {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var out, errb syncbuf.Buffer
		done := make(chan int, 1)
		go func() { done <- Run(ctx, "", []string{"serve", "--config", cfg}, nil, &out, &errb) }()
		deadline := time.After(20 * time.Second)
		for !strings.Contains(errb.String(), `"event":"detect_cycle"`) {
			select {
			case code := <-done:
				t.Fatalf("serve exited %d: %s", code, errb.String())
			case <-deadline:
				t.Fatalf("no cycle: %s", errb.String())
			case <-time.After(20 * time.Millisecond):
			}
		}
		cancel()
		if code := <-done; code != 0 {
			t.Fatalf("serve exit %d: %s", code, errb.String())
		}
		return out.String()
	}
	// An old checkpoint file (before the database kept it) says old.json was read:
	// the first start takes it over, so old.json is not read again.
	put("old.json", "2026-11-20T08:50:00Z")
	info, _ := os.Stat(filepath.Join(watched, "old.json"))
	oldCP := fmt.Sprintf(`{"done":{"dir:%s":{"old.json":"%d-%d"}}}`, watched, info.Size(), info.ModTime().UnixNano())
	os.WriteFile(filepath.Join(work, "cp.json"), []byte(oldCP), 0o600)
	put("a.json", "2026-11-20T09:00:00Z")
	first := decodeFindings(t, serve())
	if len(first) != 1 || first[0].Count != 1 {
		t.Fatalf("first run: %+v", first)
	}
	put("b.json", "2026-11-20T09:10:00Z")
	second := decodeFindings(t, serve())
	if len(second) != 1 || second[0].ID != first[0].ID || second[0].Count != 2 {
		t.Fatalf("after restart: %+v", second)
	}
	// The database holds the checkpoint now: the file is left as it was.
	if b, _ := os.ReadFile(filepath.Join(work, "cp.json")); string(b) != oldCP {
		t.Fatalf("checkpoint file written: %s", b)
	}
}
