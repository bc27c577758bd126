package correlator

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/store"
	"github.com/imdsguard/imdsguard/internal/correlator/trailqueue/sqstest"
	"github.com/imdsguard/imdsguard/internal/correlator/trailwatch/trailwatchtest"
	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
	"github.com/imdsguard/imdsguard/internal/testing/syncbuf"
)

// sharedKey is an instance credential that only its AssumeRole record ties to its
// instance: its calls carry no ec2RoleDelivery, and no fingerprint names it.
const sharedKey = "ASIASHAREDEVIDENCE01"

// assumeRoleRecord is EC2 handing sharedKey to i-0abcabcabcabcabc0.
func assumeRoleRecord(at time.Time) string {
	return fmt.Sprintf(`{"eventVersion":"1.09","eventTime":%q,"eventSource":"sts.amazonaws.com","eventName":"AssumeRole","awsRegion":"us-east-1",
"sourceIPAddress":"ec2.amazonaws.com","userAgent":"ec2.amazonaws.com","userIdentity":{"type":"AWSService","invokedBy":"ec2.amazonaws.com"},
"requestParameters":{"roleArn":"arn:aws:iam::%s:role/shared","roleSessionName":"i-0abcabcabcabcabc0"},
"responseElements":{"credentials":{"accessKeyId":%q,"sessionToken":"x","expiration":%q}},"recipientAccountId":%q}`,
		at.Format(time.RFC3339), ctcorpus.Account, sharedKey, at.Add(6*time.Hour).Format("Jan 2, 2006, 3:04:05 PM"), ctcorpus.Account)
}

// useRecord is a call with sharedKey from an address outside AWS.
func useRecord(at time.Time) string {
	return fmt.Sprintf(`{"eventVersion":"1.09","eventTime":%q,"eventSource":"s3.amazonaws.com","eventName":"ListBuckets","awsRegion":"us-east-1",
"sourceIPAddress":"192.0.2.77","userIdentity":{"type":"AssumedRole","arn":"arn:aws:sts::%s:assumed-role/shared/i-0abcabcabcabcabc0",
"accountId":%q,"accessKeyId":%q},"recipientAccountId":%q}`, at.Format(time.RFC3339), ctcorpus.Account, ctcorpus.Account, sharedKey, ctcorpus.Account)
}

// holdingS3 serves the S3 stand-in but holds GetObject of key first until some other
// object has been served.
type holdingS3 struct {
	s3       *trailwatchtest.S3
	first    string
	once     sync.Once
	holding  chan struct{} // closed when first is held
	released chan struct{} // closed when another object was served
}

func (h *holdingS3) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if strings.HasSuffix(r.URL.Path, "/"+h.first) {
		close(h.holding)
		select {
		case <-h.released:
		case <-r.Context().Done():
			return
		}
		h.s3.ServeHTTP(w, r)
		return
	}
	h.s3.ServeHTTP(w, r)
	if strings.Count(r.URL.Path, "/") > 1 {
		h.once.Do(func() { close(h.released) })
	}
}

// queueReplicas starts n serve replicas on one queue and one PostgreSQL database.
type queueReplicas struct {
	t      *testing.T
	cancel context.CancelFunc
	outs   []*syncbuf.Buffer
	errs   []*syncbuf.Buffer
	done   []chan int
}

// visibility is serve.sqs.visibility_timeout; extra is YAML added to base, the
// corpus's config when nil.
func startQueueReplicas(t *testing.T, n int, s3URL, sqsURL, dsn, visibility, extra string, base []byte) *queueReplicas {
	t.Helper()
	t.Setenv("AWS_ACCESS_KEY_ID", trailwatchtest.AccessKeyID)
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	if base == nil {
		base, _ = os.ReadFile(filepath.Join(sharedCorpus(t), "config.yaml"))
	}
	ctx, cancel := context.WithCancel(context.Background())
	qr := &queueReplicas{t: t, cancel: cancel}
	t.Cleanup(func() { qr.stop() })
	for range n {
		cfg := filepath.Join(t.TempDir(), "c.yaml")
		body := append(slices.Clone(base), []byte("serve:\n  s3:\n    endpoint: "+s3URL+"\n    path_style: true\n"+
			"  sqs:\n    queue_url: "+sqsURL+"/123456789012/trail\n    endpoint: "+sqsURL+"\n    visibility_timeout: "+visibility+"\n"+
			"  poll_interval: 200ms\nstore:\n  driver: postgres\n  dsn: \""+dsn+"\"\n"+extra)...)
		os.WriteFile(cfg, body, 0o600)
		out, errb, done := &syncbuf.Buffer{}, &syncbuf.Buffer{}, make(chan int, 1)
		qr.outs, qr.errs, qr.done = append(qr.outs, out), append(qr.errs, errb), append(qr.done, done)
		go func() { done <- Run(ctx, "", []string{"serve", "--config", cfg}, nil, out, errb) }()
	}
	return qr
}

func (qr *queueReplicas) logs() string {
	var b strings.Builder
	for i, e := range qr.errs {
		fmt.Fprintf(&b, "replica %d:\n%s\n", i, e.String())
	}
	return b.String()
}

// stop ends the replicas and fails the test unless each exited 0.
func (qr *queueReplicas) stop() {
	if qr.cancel == nil {
		return
	}
	qr.cancel()
	qr.cancel = nil
	for i, d := range qr.done {
		if code := <-d; code != 0 {
			qr.t.Errorf("replica %d exit %d: %s", i, code, qr.errs[i].String())
		}
	}
}

// findings counts the findings printed across the replicas, by id.
func (qr *queueReplicas) findings() (map[string]int, map[string]int64) {
	seen, counts := map[string]int{}, map[string]int64{}
	for _, o := range qr.outs {
		for _, f := range decodeFindings(qr.t, o.String()) {
			seen[f.ID]++
			counts[f.ID] = max(counts[f.ID], f.Count)
		}
	}
	return seen, counts
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool, logs func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s\n%s", what, logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The evidence of one finding split across two objects, each read by another replica
// (the AssumeRole that ties the key to an instance in one, the key's use from outside
// AWS in the other): the replicas share what they learned through PostgreSQL, so the
// finding is emitted, once. Each replica alone would judge the key unknown, or unused.
func TestServeSQSReplicasShareEvidence(t *testing.T) {
	dsn := postgresDSN(t)
	at := time.Date(2026, 11, 20, 9, 0, 0, 0, time.UTC)
	fake := trailwatchtest.NewS3("trail")
	learnKey := "AWSLogs/111111111111/CloudTrail/us-east-1/2026/11/20/learn.json"
	useKey := "AWSLogs/111111111111/CloudTrail/us-east-1/2026/11/20/use.json"
	fake.Put(learnKey, `{"Records":[`+assumeRoleRecord(at)+`]}`)
	fake.Put(useKey, `{"Records":[`+useRecord(at.Add(time.Minute))+","+useRecord(at.Add(2*time.Minute))+","+useRecord(at.Add(3*time.Minute))+`]}`)
	s3h := &holdingS3{s3: fake, first: learnKey, holding: make(chan struct{}), released: make(chan struct{})}
	queue := &sqstest.Queue{MaxReceiveCount: 5}
	s3srv, sqsSrv := httptest.NewServer(s3h), httptest.NewServer(queue)
	defer s3srv.Close()
	defer sqsSrv.Close()
	note := func(key string) string {
		return fmt.Sprintf(`{"Records":[{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"trail"},"object":{"key":%q}}}]}`, key)
	}
	qr := startQueueReplicas(t, 2, s3srv.URL, sqsSrv.URL, dsn, "30s", "", nil)
	// One replica takes the first object and is held reading it, so the second object
	// can only go to the other.
	queue.Send(note(learnKey))
	select {
	case <-s3h.holding:
	case <-time.After(30 * time.Second):
		t.Fatalf("no replica took the first object\n%s", qr.logs())
	}
	queue.Send(note(useKey))
	waitFor(t, "both messages deleted", 30*time.Second, func() bool { return queue.Deleted() == 2 }, qr.logs)
	qr.stop()
	readers := 0
	for _, e := range qr.errs {
		if strings.Contains(e.String(), `"event":"log_file_read"`) {
			readers++
		}
	}
	if readers != 2 {
		t.Fatalf("%d replicas read objects, want 2\n%s", readers, qr.logs())
	}
	seen, counts := qr.findings()
	if len(seen) != 1 {
		t.Fatalf("%d findings, want 1: %v\n%s", len(seen), seen, qr.logs())
	}
	for id, n := range seen {
		if n != 1 || counts[id] != 3 {
			t.Fatalf("finding %s printed %d times, count %d; want once, count 3", id, n, counts[id])
		}
	}
}

// PostgreSQL stops (pg_ctl -m fast) under two running replicas and starts again: they
// keep going, say why they wait, lose no object (a message goes only once its findings
// are recorded) and end with every finding of the corpus, each update printed once,
// at the counts detect gives for the whole corpus.
func TestServeSQSSurvivesPostgresRestart(t *testing.T) {
	dir := sharedCorpus(t)
	dsn := postgresDSN(t)
	// A window of a day: serve forgets nothing of the corpus's day, however the
	// objects are split between cycles, so its counts must be detect's.
	base, _ := os.ReadFile(filepath.Join(dir, "config.yaml"))
	day := regexp.MustCompile(`(?m)^window: .*$`).ReplaceAll(base, []byte("window: 24h"))
	cfg := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(cfg, day, 0o600)
	code, out, errs := runCmd(t, "", "detect", "--config", cfg, filepath.Join(dir, "cloudtrail", "AWSLogs"))
	if code != 0 {
		t.Fatalf("detect exit %d: %s", code, errs)
	}
	want := map[string]int64{}
	for _, f := range decodeFindings(t, out) {
		want[f.ID] = f.Count
	}
	fake := trailwatchtest.NewS3("trail")
	var notes []string
	filepath.Walk(filepath.Join(dir, "cloudtrail", "AWSLogs"), func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			data, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(filepath.Join(dir, "cloudtrail"), p)
			fake.Put(filepath.ToSlash(rel), string(data))
			notes = append(notes, fmt.Sprintf(`{"Records":[{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"trail"},"object":{"key":%q}}}]}`, filepath.ToSlash(rel)))
		}
		return nil
	})
	if len(notes) < 4 || len(want) == 0 {
		t.Fatalf("corpus: %d objects, %d findings", len(notes), len(want))
	}
	queue := &sqstest.Queue{}
	s3srv, sqsSrv := httptest.NewServer(fake), httptest.NewServer(queue)
	defer s3srv.Close()
	defer sqsSrv.Close()
	qr := startQueueReplicas(t, 2, s3srv.URL, sqsSrv.URL, dsn, "1s", "", day)
	// Both running (a database down at start is a start that fails, for systemd to retry).
	waitFor(t, "both replicas started", 30*time.Second, func() bool {
		return strings.Count(qr.logs(), `"event":"correlator_starting"`) == 2
	}, qr.logs)
	half := len(notes) / 2
	for _, n := range notes[:half] {
		queue.Send(n)
	}
	waitFor(t, "the first half recorded", 30*time.Second, func() bool { return queue.Deleted() == half }, qr.logs)
	if err := pg.Halt(); err != nil {
		t.Fatal(err)
	}
	resumed := false
	defer func() {
		if !resumed {
			pg.Resume()
		}
	}()
	for _, n := range notes[half:] {
		queue.Send(n)
	}
	waitFor(t, "a replica to report the database down", 30*time.Second, func() bool {
		return strings.Contains(qr.logs(), `"event":"record_failed"`)
	}, qr.logs)
	if queue.Deleted() != half {
		t.Fatalf("%d messages deleted while the database was down", queue.Deleted()-half)
	}
	if err := pg.Resume(); err != nil {
		t.Fatal(err)
	}
	resumed = true
	waitFor(t, "every message recorded after the restart", 60*time.Second, func() bool { return queue.Len() == 0 }, qr.logs)
	qr.stop()
	if queue.Deleted() != len(notes) {
		t.Fatalf("%d messages deleted, want %d", queue.Deleted(), len(notes))
	}
	seen := map[string]int{}
	got := map[string]int64{}
	for _, o := range qr.outs {
		for _, f := range decodeFindings(t, o.String()) {
			seen[fmt.Sprintf("%s/%d", f.ID, f.Count)]++
			got[f.ID] = max(got[f.ID], f.Count)
		}
	}
	for k, n := range seen {
		if n != 1 {
			t.Errorf("update %s printed %d times", k, n)
		}
	}
	for id, c := range want {
		if got[id] != c {
			t.Errorf("finding %s: last printed count %d, detect says %d", id, got[id], c)
		}
	}
	if len(got) != len(want) {
		t.Errorf("%d findings printed, detect gives %d", len(got), len(want))
	}
}

// deleteHoldingQueue serves the SQS stand-in but, until released, holds every
// DeleteMessageBatch until the client goes away, and tells when it holds the first.
type deleteHoldingQueue struct {
	q        *sqstest.Queue
	once     sync.Once
	deleting chan struct{}
	released atomic.Bool
}

func (h *deleteHoldingQueue) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("X-Amz-Target") == "AmazonSQS.DeleteMessageBatch" && !h.released.Load() {
		// The body read, the server notices the client going away.
		_, _ = io.Copy(io.Discard, r.Body)
		h.once.Do(func() { close(h.deleting) })
		<-r.Context().Done()
		return
	}
	h.q.ServeHTTP(w, r)
}

// A replica SIGKILLed after its turn committed and before it deleted its messages:
// the messages come back, and the replica that gets them counts none of their objects
// again (object_already_read). The counts recorded in the ledger are those detect
// gives for the whole corpus, on either engine; no update is printed twice.
func TestServeSQSObjectCountedOnce(t *testing.T) {
	for _, driver := range []string{"sqlite", "postgres"} {
		t.Run(driver, func(t *testing.T) { testObjectCountedOnce(t, driver) })
	}
}

func testObjectCountedOnce(t *testing.T, driver string) {
	dir := sharedCorpus(t)
	dsn := filepath.Join(t.TempDir(), "state.db")
	if driver == "postgres" {
		dsn = postgresDSN(t)
	}
	base, _ := os.ReadFile(filepath.Join(dir, "config.yaml"))
	// A window of a day: serve forgets nothing of the corpus's day.
	day := regexp.MustCompile(`(?m)^window: .*$`).ReplaceAll(base, []byte("window: 24h"))
	detectCfg := filepath.Join(t.TempDir(), "c.yaml")
	os.WriteFile(detectCfg, day, 0o600)
	code, out, errs := runCmd(t, "", "detect", "--config", detectCfg, filepath.Join(dir, "cloudtrail", "AWSLogs"))
	if code != 0 {
		t.Fatalf("detect exit %d: %s", code, errs)
	}
	want := map[string]int64{}
	for _, f := range decodeFindings(t, out) {
		want[f.ID] = f.Count
	}
	fake := trailwatchtest.NewS3("trail")
	queue := &sqstest.Queue{}
	objects := 0
	filepath.Walk(filepath.Join(dir, "cloudtrail", "AWSLogs"), func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			data, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(filepath.Join(dir, "cloudtrail"), p)
			fake.Put(filepath.ToSlash(rel), string(data))
			queue.Send(fmt.Sprintf(`{"Records":[{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"trail"},"object":{"key":%q}}}]}`, filepath.ToSlash(rel)))
			objects++
		}
		return nil
	})
	if objects < 3 || len(want) == 0 {
		t.Fatalf("corpus: %d objects, %d findings", objects, len(want))
	}
	holding := &deleteHoldingQueue{q: queue, deleting: make(chan struct{})}
	s3srv, sqsSrv := httptest.NewServer(fake), httptest.NewServer(holding)
	defer s3srv.Close()
	defer sqsSrv.Close()
	t.Setenv("AWS_ACCESS_KEY_ID", trailwatchtest.AccessKeyID)
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	cfg := filepath.Join(t.TempDir(), "serve.yaml")
	os.WriteFile(cfg, append(slices.Clone(day), []byte("serve:\n  s3:\n    endpoint: "+s3srv.URL+"\n    path_style: true\n"+
		"  sqs:\n    queue_url: "+sqsSrv.URL+"/123456789012/trail\n    endpoint: "+sqsSrv.URL+"\n    visibility_timeout: 1s\n"+
		"  poll_interval: 200ms\nstore:\n  driver: "+driver+"\n  dsn: \""+dsn+"\"\n")...), 0o600)

	// Replica 1, a process of its own, is killed while it deletes its first messages:
	// their objects' counts are committed.
	var out1, err1 syncbuf.Buffer
	child := exec.Command(os.Args[0], "serve", "--config", cfg)
	child.Env = append(os.Environ(), "IMDSGUARD_TEST_CORRELATOR=1")
	child.Stdout, child.Stderr = &out1, &err1
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer child.Process.Kill()
	select {
	case <-holding.deleting:
	case <-time.After(30 * time.Second):
		t.Fatalf("replica 1 never deleted a message:\n%s", err1.String())
	}
	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	child.Wait()
	if queue.Deleted() != 0 || !strings.Contains(err1.String(), `"event":"detect_cycle"`) {
		t.Fatalf("killed replica deleted %d messages; log:\n%s", queue.Deleted(), err1.String())
	}

	// Replica 2 gets every message back after the visibility timeout.
	holding.released.Store(true)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out2, err2 syncbuf.Buffer
	done := make(chan int, 1)
	go func() { done <- Run(ctx, "", []string{"serve", "--config", cfg}, nil, &out2, &err2) }()
	waitFor(t, "every message deleted", 30*time.Second, func() bool { return queue.Len() == 0 }, err2.String)
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("replica 2 exit %d: %s", code, err2.String())
	}
	if !strings.Contains(err2.String(), `"event":"object_already_read"`) {
		t.Errorf("replica 2 logged no object_already_read:\n%s", err2.String())
	}
	db, err := store.Open(context.Background(), driver, dsn, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.SQL().Query(`SELECT finding_id, count FROM published_findings`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	got := map[string]int64{}
	for rows.Next() {
		var id string
		var n int64
		if err := rows.Scan(&id, &n); err != nil {
			t.Fatal(err)
		}
		got[id] = n
	}
	for id, c := range want {
		if got[id] != c {
			t.Errorf("finding %s: recorded count %d, detect says %d", id, got[id], c)
		}
	}
	if len(got) != len(want) {
		t.Errorf("%d findings recorded, detect gives %d", len(got), len(want))
	}
	seen := map[string]int{}
	for _, o := range []string{out1.String(), out2.String()} {
		for _, f := range decodeFindings(t, o) {
			seen[fmt.Sprintf("%s/%d", f.ID, f.Count)]++
		}
	}
	for k, n := range seen {
		if n != 1 {
			t.Errorf("update %s printed %d times", k, n)
		}
	}
}
