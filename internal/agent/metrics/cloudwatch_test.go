package metrics

import (
	"context"
	"fmt"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/containers"
	"github.com/imdsguard/imdsguard/internal/agent/hostid"
	"github.com/imdsguard/imdsguard/internal/agent/metrics/metricstest"
)

// isolateAWS keeps the SDK away from the host's AWS configuration and, above all, from
// the real IMDS: tests never reach 169.254.169.254 from the host.
func isolateAWS(t *testing.T) {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "credentials"))
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	for _, v := range []string{"AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
		"AWS_ENDPOINT_URL_CLOUDWATCH", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} {
		t.Setenv(v, "")
	}
}

func newTestCloudWatch(t *testing.T, url string, opts CloudWatchOptions) *CloudWatch {
	t.Helper()
	isolateAWS(t)
	opts.Namespace = "IMDSGuard"
	opts.Endpoint = url
	opts.Credentials = credentials.NewStaticCredentialsProvider("AKIDTEST", "secret", "")
	opts.Log = zerolog.New(zerolog.NewTestWriter(t))
	c := NewCloudWatch(opts)
	t.Cleanup(func() { c.stop(); <-c.done })
	return c
}

var testID = hostid.Identity{InstanceID: "i-0abc1234def567890", Region: "eu-west-1"}

// The stand-in decodes the SDK's actual request (RPC v2 CBOR) and the numbers,
// names and dimensions arrive as aggregated.
func TestCloudWatchPutMetricDataOnTheWire(t *testing.T) {
	cw := metricstest.NewCloudWatch()
	srv := httptest.NewServer(cw)
	defer srv.Close()
	c := newTestCloudWatch(t, srv.URL, CloudWatchOptions{})

	a := NewAggregator(20, 100)
	pod := ContainerValue(containers.Info{ID: strings.Repeat("ab", 32), Runtime: containers.Containerd,
		Pod: containers.Pod{Namespace: "shop", Name: "web-7d9f8b6c5d-x2x7k", Container: "app"}})
	a.Observe(Observation{Kind: MetadataRequests, Exe: "/usr/bin/curl", User: "root", Container: pod, Count: 3})
	a.Observe(Observation{Kind: MetadataNoToken, Exe: "/usr/bin/curl", User: "root", Container: pod, Count: 2})
	a.Observe(Observation{Kind: MetadataRequests, Exe: "/usr/bin/python3", User: "nobody", Container: Host})
	a.Observe(Observation{Kind: EventsDropped, Count: 5})
	end := time.Date(2026, 11, 23, 10, 1, 0, 0, time.UTC)
	if err := c.Publish(context.Background(), a.Flush(end), testID, true); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if errs := cw.Errors(); len(errs) > 0 {
		t.Fatalf("stand-in refused requests: %v", errs)
	}
	reqs := cw.Requests()
	if len(reqs) != 1 || !strings.Contains(reqs[0].Authorization, "Credential=AKIDTEST/") ||
		!strings.Contains(reqs[0].Authorization, "/eu-west-1/monitoring/aws4_request") {
		t.Fatalf("requests %+v", reqs)
	}
	sums := cw.Sums()
	for k, want := range map[string]float64{
		"MetadataRequests{InstanceId=i-0abc1234def567890}":                             4,
		"MetadataNoToken{InstanceId=i-0abc1234def567890}":                              2,
		"MetadataNoTokenRejected{InstanceId=i-0abc1234def567890}":                      0,
		"EventsDropped{InstanceId=i-0abc1234def567890}":                                5,
		"MetadataRequests{Executable=/usr/bin/curl,InstanceId=i-0abc1234def567890}":    3,
		"MetadataNoToken{Executable=/usr/bin/curl,InstanceId=i-0abc1234def567890}":     2,
		"MetadataRequests{Executable=/usr/bin/python3,InstanceId=i-0abc1234def567890}": 1,
		"MetadataRequests{InstanceId=i-0abc1234def567890,User=root}":                   3,
		"MetadataRequests{InstanceId=i-0abc1234def567890,User=nobody}":                 1,
		"MetadataRequests{Container=pod/shop/web/app,InstanceId=i-0abc1234def567890}":  3,
		"MetadataNoToken{Container=pod/shop/web/app,InstanceId=i-0abc1234def567890}":   2,
		"MetadataRequests{Container=host,InstanceId=i-0abc1234def567890}":              1,
	} {
		if v, ok := sums[k]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", k, v, ok, want)
		}
	}
	// Per instance every kind; per executable, user and container the non-zero ones.
	if len(sums) != 15+(2+1)+(2+1)+(2+1) {
		t.Errorf("%d distinct metrics: %v", len(sums), sums)
	}
	for _, d := range cw.Datums() {
		if d.Namespace != "IMDSGuard" || d.Unit != "Count" || !d.Timestamp.Equal(end) {
			t.Errorf("datum %+v", d)
		}
	}
}

// Over 1000 data points go out in several requests within the API's limits; large
// bodies are gzipped by the SDK and the stand-in decodes them.
func TestCloudWatchBatchesWithinLimits(t *testing.T) {
	cw := metricstest.NewCloudWatch()
	srv := httptest.NewServer(cw)
	defer srv.Close()
	c := newTestCloudWatch(t, srv.URL, CloudWatchOptions{})
	a := NewAggregator(500, 10)
	for i := range 500 {
		// Long paths make the bodies big, to exercise the byte budget and gzip.
		exe := fmt.Sprintf("/opt/%s/bin/app%03d", strings.Repeat("d", 900), i)
		a.Observe(Observation{Kind: MetadataRequests, Exe: exe, User: fmt.Sprintf("u%03d", i)})
		a.Observe(Observation{Kind: MetadataNoToken, Exe: exe, User: fmt.Sprintf("u%03d", i)})
	}
	snap := a.Flush(time.Now())
	want := len(Datums(snap, testID, true))
	if err := c.Publish(context.Background(), snap, testID, true); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if errs := cw.Errors(); len(errs) > 0 {
		t.Fatalf("stand-in refused requests: %v", errs[0])
	}
	if got := len(cw.Datums()); got != want || want < 2000 {
		t.Fatalf("received %d data points, sent %d", got, want)
	}
	reqs := cw.Requests()
	gz := 0
	for _, r := range reqs {
		if r.Datums > 1000 || r.BodyBytes > 1<<20 {
			t.Errorf("request over the limits: %+v", r)
		}
		if r.ContentEncoding == "gzip" {
			gz++
		}
	}
	if len(reqs) < 3 || gz == 0 {
		t.Errorf("%d requests, %d gzipped", len(reqs), gz)
	}
	t.Logf("%d data points in %d requests (%d gzipped)", want, len(reqs), gz)
}

// While the endpoint fails, the sink retries with growing backoff (not in a tight
// loop), keeps at most MaxPending data points (dropping the oldest), and delivers what
// it kept once the endpoint is back.
func TestCloudWatchBackoffAndBoundedMemory(t *testing.T) {
	cw := metricstest.NewCloudWatch()
	cw.SetFailing(true)
	srv := httptest.NewServer(cw)
	defer srv.Close()
	c := newTestCloudWatch(t, srv.URL, CloudWatchOptions{MaxPending: 40, FirstBackoff: 20 * time.Millisecond,
		MaxBackoff: 80 * time.Millisecond, RetryMaxAttempts: 1})
	a := NewAggregator(20, 100)
	start := time.Now()
	for i := range 30 {
		a.Observe(Observation{Kind: MetadataRequests, Exe: "/usr/bin/curl", User: "root", Count: uint64(i + 1)})
		if err := c.Publish(context.Background(), a.Flush(start.Add(time.Duration(i)*time.Second)), testID, true); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	elapsed := time.Since(start)
	pending, dropped := c.Pending()
	// 30 intervals of 18 data points each (15 per instance, 1 per executable, 1 per
	// user, 1 per container): 540 queued, 40 kept.
	if pending != 40 || dropped != 540-40 {
		t.Errorf("pending %d, dropped %d", pending, dropped)
	}
	// With backoff 20→40→80ms, a few hundred ms of outage is a handful of attempts.
	attempts := cw.Failed()
	if attempts == 0 || attempts > int(elapsed/(20*time.Millisecond))+1 {
		t.Errorf("%d attempts in %s: not backing off", attempts, elapsed)
	}
	cw.SetFailing(false)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if p, _ := c.Pending(); p == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("queue not delivered after the endpoint came back")
		}
		time.Sleep(10 * time.Millisecond)
	}
	got := cw.Datums()
	if len(got) != 40 {
		t.Fatalf("delivered %d data points, want the 40 kept", len(got))
	}
	// The newest were kept: the last interval's count (30) is among them.
	found := false
	for _, d := range got {
		if d.MetricName == "MetadataRequests" && len(d.Dimensions) == 1 && d.Value == 30 {
			found = true
		}
	}
	if !found {
		t.Error("newest interval not delivered")
	}
	t.Logf("outage of %s: %d attempts, %d data points dropped, %d delivered after", elapsed, attempts, dropped, len(got))
}

// Without a configured region, nothing is sent until the identity brings one; the
// data waits in the queue.
func TestCloudWatchWaitsForRegion(t *testing.T) {
	cw := metricstest.NewCloudWatch()
	srv := httptest.NewServer(cw)
	defer srv.Close()
	c := newTestCloudWatch(t, srv.URL, CloudWatchOptions{FirstBackoff: 10 * time.Millisecond})
	a := NewAggregator(20, 100)
	a.Observe(Observation{Kind: MetadataRequests, Exe: "/bin/x", User: "root"})
	if err := c.Publish(context.Background(), a.Flush(time.Now()), hostid.Identity{}, false); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if p, _ := c.Pending(); p == 0 || len(cw.Requests()) != 0 {
		t.Fatalf("sent without a region: pending %d, requests %d", p, len(cw.Requests()))
	}
	if err := c.Publish(context.Background(), a.Flush(time.Now()), testID, true); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The first interval went out without InstanceId (unknown then), the second with it.
	sums := cw.Sums()
	if sums["MetadataRequests{}"] != 1 || sums["MetadataRequests{Executable=/bin/x}"] != 1 {
		t.Errorf("sums %v", sums)
	}
	if _, ok := sums["MetadataRequests{InstanceId=i-0abc1234def567890}"]; !ok {
		t.Errorf("second interval missing: %v", sums)
	}
}
