// Package trailqueue consumes the S3 ObjectCreated notifications of a CloudTrail bucket
// from SQS, the way organisation trails are consumed at scale: several replicas share
// one queue, SQS hands each message to one of them at a time, and a message is deleted
// only once the findings of its objects are recorded. A crashed replica's messages come
// back after the visibility timeout; an object that cannot be read is left to the
// queue's redrive policy, with a log line.
package trailqueue

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/sqs"
	"github.com/aws/aws-sdk-go-v2/service/sqs/types"
	"github.com/rs/zerolog"
)

// Object is one S3 object a notification names.
type Object struct {
	Bucket, Key string
	Size        int64  // 0 when the notification does not say
	ETag        string // as GetObject gave it, once read
}

// ParseNotification returns the objects of one SQS message body: an S3 event
// notification (direct, or wrapped in an SNS envelope) or CloudTrail's own SNS
// notification. Non-ObjectCreated records and S3's test event give none.
func ParseNotification(body string) ([]Object, error) {
	var env struct {
		Type    string `json:"Type"`
		Message string `json:"Message"`
		// S3 event notification.
		Records []struct {
			EventSource string `json:"eventSource"`
			EventName   string `json:"eventName"`
			S3          struct {
				Bucket struct {
					Name string `json:"name"`
				} `json:"bucket"`
				Object struct {
					Key  string `json:"key"`
					Size int64  `json:"size"`
				} `json:"object"`
			} `json:"s3"`
		} `json:"Records"`
		// S3's test event, sent when notifications are configured.
		Event string `json:"Event"`
		// CloudTrail's SNS notification.
		S3Bucket    string   `json:"s3Bucket"`
		S3ObjectKey []string `json:"s3ObjectKey"`
	}
	if err := json.Unmarshal([]byte(body), &env); err != nil {
		return nil, fmt.Errorf("not a JSON notification: %w", err)
	}
	if env.Type == "Notification" && env.Message != "" {
		return ParseNotification(env.Message)
	}
	if env.Event == "s3:TestEvent" {
		return nil, nil
	}
	var out []Object
	if env.S3Bucket != "" {
		for _, k := range env.S3ObjectKey {
			out = append(out, Object{Bucket: env.S3Bucket, Key: k})
		}
		return out, nil
	}
	if env.Records == nil {
		return nil, errors.New("neither an S3 event, an SNS envelope nor a CloudTrail notification")
	}
	for i, r := range env.Records {
		if r.EventSource != "aws:s3" || !strings.HasPrefix(r.EventName, "ObjectCreated:") {
			continue
		}
		// S3 event keys are URL-encoded, spaces as '+'.
		key, err := url.QueryUnescape(r.S3.Object.Key)
		if err != nil || r.S3.Bucket.Name == "" || key == "" {
			return nil, fmt.Errorf("Records[%d]: bad bucket or key %q", i, r.S3.Object.Key) //nolint:staticcheck // names the JSON key
		}
		out = append(out, Object{Bucket: r.S3.Bucket.Name, Key: key, Size: r.S3.Object.Size})
	}
	return out, nil
}

// Consumer receives notifications and reads the objects they name.
type Consumer struct {
	SQS      *sqs.Client
	S3       *s3.Client
	QueueURL string
	// VisibilityTimeout is how long a received message stays hidden from the other
	// replicas; it must exceed the time to read its objects and record the findings.
	VisibilityTimeout time.Duration
	// Wait is the long-poll wait of ReceiveMessage (at most 20s).
	Wait time.Duration
	// MaxObjectBytes: a larger object is poison (CloudTrail files are well below).
	MaxObjectBytes int64
	// Read consumes one object (the cloudtrail reader: it never fails on content).
	Read func(name string, r io.Reader) error
	// Counted, when set, tells whether an object's records were already counted (a
	// replica that died after recording them and before deleting their message):
	// such an object is not read again, and its message is deleted.
	Counted func(ctx context.Context, o Object) (bool, error)
	Log     zerolog.Logger
}

// Poll receives up to 10 messages, reads their objects, calls record with every object
// read (it must make their counts and findings durable) and then deletes the messages
// whose objects were all read. It returns how many objects it read.
func (c *Consumer) Poll(ctx context.Context, record func(ctx context.Context, read []Object) error) (int, error) {
	out, err := c.SQS.ReceiveMessage(ctx, &sqs.ReceiveMessageInput{
		QueueUrl: aws.String(c.QueueURL), MaxNumberOfMessages: 10,
		WaitTimeSeconds:             int32(min(c.Wait, 20*time.Second) / time.Second),
		VisibilityTimeout:           int32(c.VisibilityTimeout / time.Second),
		MessageSystemAttributeNames: []types.MessageSystemAttributeName{types.MessageSystemAttributeNameApproximateReceiveCount},
	})
	if err != nil {
		return 0, fmt.Errorf("receive from %s: %w", c.QueueURL, err)
	}
	var done []types.DeleteMessageBatchRequestEntry
	// Every object read goes to record, those of a message that failed later too:
	// their records are counted, and the message's redelivery must not count them again.
	p := &pollRead{}
	for i, m := range out.Messages {
		err := c.handle(ctx, m, p)
		if err != nil {
			if ctx.Err() != nil {
				return len(p.objects), ctx.Err()
			}
			receives, _ := strconv.Atoi(m.Attributes[string(types.MessageSystemAttributeNameApproximateReceiveCount)])
			c.Log.Error().Str("event", "poison_message").Str("message_id", aws.ToString(m.MessageId)).Int("receive_count", receives).Err(err).
				Msg("message left on the queue: after the redrive policy's maxReceiveCount it goes to the dead-letter queue (configure one)")
			continue
		}
		done = append(done, types.DeleteMessageBatchRequestEntry{Id: aws.String(strconv.Itoa(i)), ReceiptHandle: m.ReceiptHandle})
	}
	if len(out.Messages) == 0 {
		return 0, nil
	}
	// The findings of what was read are recorded before any message goes: a replica
	// that dies here has its messages redelivered, and the ledger keeps their findings
	// from going out twice.
	read := len(p.objects)
	if err := record(ctx, p.objects); err != nil {
		return read, fmt.Errorf("record findings: %w", err)
	}
	if len(done) == 0 {
		return read, nil
	}
	del, err := c.SQS.DeleteMessageBatch(ctx, &sqs.DeleteMessageBatchInput{QueueUrl: aws.String(c.QueueURL), Entries: done})
	if err != nil {
		return read, fmt.Errorf("delete messages: %w", err)
	}
	for _, f := range del.Failed {
		// Most likely the visibility timeout ran out and another replica has it now.
		c.Log.Warn().Str("event", "delete_failed").Str("code", aws.ToString(f.Code)).Str("reason", aws.ToString(f.Message)).
			Msg("message not deleted: it will be read again (raise serve.sqs.visibility_timeout?)")
	}
	return read, nil
}

// pollRead is what one Poll has read.
type pollRead struct {
	objects []Object
	seen    map[Object]bool // by bucket, key and ETag (Size zero)
}

// handle reads every object of one message.
func (c *Consumer) handle(ctx context.Context, m types.Message, p *pollRead) error {
	objs, err := ParseNotification(aws.ToString(m.Body))
	if err != nil {
		return err
	}
	for _, o := range objs {
		if err := c.readObject(ctx, o, p); err != nil {
			return err
		}
	}
	return nil
}

func (c *Consumer) readObject(ctx context.Context, o Object, p *pollRead) error {
	name := "s3://" + o.Bucket + "/" + o.Key
	if c.MaxObjectBytes > 0 && o.Size > c.MaxObjectBytes {
		return fmt.Errorf("%s: %d bytes, more than %d", name, o.Size, c.MaxObjectBytes)
	}
	out, err := c.S3.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(o.Bucket), Key: aws.String(o.Key)})
	if err != nil {
		return fmt.Errorf("get %s: %w", name, err)
	}
	defer out.Body.Close()
	if c.MaxObjectBytes > 0 && aws.ToInt64(out.ContentLength) > c.MaxObjectBytes {
		return fmt.Errorf("%s: %d bytes, more than %d", name, aws.ToInt64(out.ContentLength), c.MaxObjectBytes)
	}
	id := Object{Bucket: o.Bucket, Key: o.Key, ETag: aws.ToString(out.ETag)}
	counted := p.seen[id] // the same object named twice in one receive (SQS delivers at least once)
	if !counted && c.Counted != nil {
		if counted, err = c.Counted(ctx, id); err != nil {
			return err
		}
	}
	if counted {
		c.Log.Info().Str("event", "object_already_read").Str("file", name).Str("etag", id.ETag).
			Msg("object already counted (its message was redelivered): not read again")
		return nil
	}
	var r io.Reader = out.Body
	if c.MaxObjectBytes > 0 {
		r = io.LimitReader(out.Body, c.MaxObjectBytes)
	}
	if err := c.Read(name, r); err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	if p.seen == nil {
		p.seen = map[Object]bool{}
	}
	p.seen[id] = true
	p.objects = append(p.objects, id)
	return nil
}
