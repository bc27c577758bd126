package correlator

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

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

func startQueueReplicas(t *testing.T, n int, s3URL, sqsURL, dsn string) *queueReplicas {
	t.Helper()
	t.Setenv("AWS_ACCESS_KEY_ID", trailwatchtest.AccessKeyID)
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	base, _ := os.ReadFile(filepath.Join(sharedCorpus(t), "config.yaml"))
	ctx, cancel := context.WithCancel(context.Background())
	qr := &queueReplicas{t: t, cancel: cancel}
	t.Cleanup(func() { qr.stop() })
	for range n {
		cfg := filepath.Join(t.TempDir(), "c.yaml")
		body := append(slices.Clone(base), []byte("serve:\n  s3:\n    endpoint: "+s3URL+"\n    path_style: true\n"+
			"  sqs:\n    queue_url: "+sqsURL+"/123456789012/trail\n    endpoint: "+sqsURL+"\n    visibility_timeout: 30s\n"+
			"  poll_interval: 200ms\nstore:\n  driver: postgres\n  dsn: \""+dsn+"\"\n")...)
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
	qr := startQueueReplicas(t, 2, s3srv.URL, sqsSrv.URL, dsn)
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
