package trailqueue

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/trailqueue/sqstest"
	"github.com/imdsguard/imdsguard/internal/correlator/trailwatch/trailwatchtest"
	"github.com/imdsguard/imdsguard/internal/testing/syncbuf"
)

// S3Event is a notification as S3 sends it to SQS.
func S3Event(bucket, key string, size int) string {
	return fmt.Sprintf(`{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","awsRegion":"us-east-1","eventName":"ObjectCreated:Put","s3":{"s3SchemaVersion":"1.0","bucket":{"name":%q,"arn":"arn:aws:s3:::%s"},"object":{"key":%q,"size":%d}}}]}`,
		bucket, bucket, key, size)
}

func TestParseNotification(t *testing.T) {
	direct := S3Event("trail", "AWSLogs/1/CloudTrail/us-east-1/2026/11/20/a+b%3D.json.gz", 10)
	sns := fmt.Sprintf(`{"Type":"Notification","MessageId":"x","TopicArn":"arn:aws:sns:us-east-1:1:t","Message":%q}`, direct)
	cases := []struct {
		body string
		want []Object
		err  string
	}{
		{direct, []Object{{"trail", "AWSLogs/1/CloudTrail/us-east-1/2026/11/20/a b=.json.gz", 10, ""}}, ""},
		{sns, []Object{{"trail", "AWSLogs/1/CloudTrail/us-east-1/2026/11/20/a b=.json.gz", 10, ""}}, ""},
		{`{"s3Bucket":"trail","s3ObjectKey":["k1","k2"]}`, []Object{{"trail", "k1", 0, ""}, {"trail", "k2", 0, ""}}, ""},
		{`{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"trail"}`, nil, ""},
		{`{"Records":[{"eventSource":"aws:s3","eventName":"ObjectRemoved:Delete","s3":{"bucket":{"name":"b"},"object":{"key":"k"}}}]}`, nil, ""},
		{`not json`, nil, "not a JSON notification"},
		{`{"hello":1}`, nil, "neither"},
		{`{"Records":[{"eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"%zz"}}}]}`, nil, "Records[0]: bad bucket or key"},
	}
	for _, c := range cases {
		got, err := ParseNotification(c.body)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%.60s: err %v, want %q", c.body, err, c.err)
			}
			continue
		}
		if err != nil || fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("%.60s: %v %v, want %v", c.body, got, err, c.want)
		}
	}
}

type bed struct {
	q    *sqstest.Queue
	s3   *trailwatchtest.S3
	c    *Consumer
	log  *syncbuf.Buffer
	mu   sync.Mutex
	read []string
}

func newBed(t *testing.T) *bed {
	b := &bed{q: &sqstest.Queue{MaxReceiveCount: 3}, s3: trailwatchtest.NewS3("trail"), log: &syncbuf.Buffer{}}
	qs, ss := httptest.NewServer(b.q), httptest.NewServer(b.s3)
	t.Cleanup(qs.Close)
	t.Cleanup(ss.Close)
	creds := credentials.NewStaticCredentialsProvider(trailwatchtest.AccessKeyID, "secret", "")
	b.c = &Consumer{
		SQS:      sqs.New(sqs.Options{Region: "us-east-1", BaseEndpoint: aws.String(qs.URL), Credentials: creds}),
		S3:       s3.New(s3.Options{Region: "us-east-1", BaseEndpoint: aws.String(ss.URL), Credentials: creds, UsePathStyle: true}),
		QueueURL: qs.URL + "/123456789012/trail", VisibilityTimeout: time.Second, MaxObjectBytes: 1 << 20,
		Read: func(name string, r io.Reader) error {
			data, err := io.ReadAll(r)
			b.mu.Lock()
			b.read = append(b.read, name+"="+string(data))
			b.mu.Unlock()
			return err
		},
		Log: zerolog.New(b.log),
	}
	return b
}

func TestConsumerDeletesOnlyRecorded(t *testing.T) {
	b := newBed(t)
	b.s3.Put("AWSLogs/a.json", "A")
	b.s3.Put("AWSLogs/b.json", "B")
	b.q.Send(S3Event("trail", "AWSLogs/a.json", 1))
	b.q.Send(fmt.Sprintf(`{"Type":"Notification","Message":%q}`, S3Event("trail", "AWSLogs/b.json", 1)))
	ctx := context.Background()
	// Recording fails: nothing is deleted, both come back after the visibility timeout.
	n, err := b.c.Poll(ctx, func(context.Context, []Object) error { return errors.New("database down") })
	if n != 2 || err == nil || b.q.Deleted() != 0 {
		t.Fatalf("read %d, err %v, deleted %d", n, err, b.q.Deleted())
	}
	recorded := 0
	deadline := time.Now().Add(10 * time.Second)
	for b.q.Len() > 0 && time.Now().Before(deadline) {
		if _, err := b.c.Poll(ctx, func(context.Context, []Object) error { recorded++; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	if b.q.Len() != 0 || b.q.Deleted() != 2 || recorded != 1 {
		t.Fatalf("left %d, deleted %d, recorded %d", b.q.Len(), b.q.Deleted(), recorded)
	}
	if got := strings.Join(b.read, " "); got != "s3://trail/AWSLogs/a.json=A s3://trail/AWSLogs/b.json=B s3://trail/AWSLogs/a.json=A s3://trail/AWSLogs/b.json=B" {
		t.Fatalf("read %s", got)
	}
}

func TestConsumerPoisonGoesToRedrive(t *testing.T) {
	b := newBed(t)
	b.s3.Put("AWSLogs/good.json", "G")
	b.s3.Put("AWSLogs/huge.json", strings.Repeat("x", 100))
	b.c.MaxObjectBytes = 50
	b.q.Send(S3Event("trail", "AWSLogs/missing.json", 1))
	b.q.Send(S3Event("trail", "AWSLogs/huge.json", 100))
	b.q.Send("garbage")
	b.q.Send(S3Event("trail", "AWSLogs/good.json", 1))
	ctx := context.Background()
	deadline := time.Now().Add(15 * time.Second)
	for len(b.q.Dead()) < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("dead %v, left %d", b.q.Dead(), b.q.Len())
		}
		if _, err := b.c.Poll(ctx, func(context.Context, []Object) error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	if b.q.Len() != 0 || b.q.Deleted() != 1 {
		t.Fatalf("left %d, deleted %d", b.q.Len(), b.q.Deleted())
	}
	logs := b.log.String()
	for _, want := range []string{"missing.json", "more than 50", "not a JSON notification", `"receive_count":3`} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %q", want)
		}
	}
	if strings.Count(logs, `"event":"poison_message"`) != 9 {
		t.Errorf("%d poison lines, want 3 per message", strings.Count(logs, `"event":"poison_message"`))
	}
}
