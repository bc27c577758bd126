// Package sqstest is an SQS stand-in for tests: it speaks the AWS JSON 1.0 protocol
// that aws-sdk-go-v2's service/sqs sends (X-Amz-Target AmazonSQS.*), with visibility
// timeouts, receive counts, long polling and a redrive policy (maxReceiveCount → a
// dead-letter list), the parts of SQS that a consumer's correctness depends on.
// (goaws, the usual stand-in, speaks only the older query protocol.)
package sqstest

import (
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Queue is one queue.
type Queue struct {
	// MaxReceiveCount moves a message to the dead-letter list when it would be
	// received more often than this; 0 means no redrive policy.
	MaxReceiveCount int

	mu       sync.Mutex
	seq      int
	msgs     []*message
	dead     []string
	deleted  int
	received int
}

type message struct {
	id, body, receipt string
	visibleAt         time.Time
	receives          int
}

// Send enqueues a message body.
func (q *Queue) Send(body string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.seq++
	q.msgs = append(q.msgs, &message{id: fmt.Sprintf("m%d", q.seq), body: body})
}

// Len is the number of messages not deleted (visible or in flight), dead ones aside.
func (q *Queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.msgs)
}

// Dead are the bodies moved to the dead-letter list.
func (q *Queue) Dead() []string {
	q.mu.Lock()
	defer q.mu.Unlock()
	return append([]string(nil), q.dead...)
}

// Deleted is the number of messages deleted.
func (q *Queue) Deleted() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.deleted
}

// ServeHTTP implements http.Handler.
func (q *Queue) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	action, ok := strings.CutPrefix(r.Header.Get("X-Amz-Target"), "AmazonSQS.")
	if !ok || r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/x-amz-json-1.0" ||
		!strings.HasPrefix(r.Header.Get("Authorization"), "AWS4-HMAC-SHA256 Credential=") {
		fail(w, "InvalidAction", fmt.Sprintf("not an SQS JSON request: target %q type %q", r.Header.Get("X-Amz-Target"), r.Header.Get("Content-Type")))
		return
	}
	body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	switch action {
	case "ReceiveMessage":
		var in struct {
			QueueUrl            string
			MaxNumberOfMessages int
			WaitTimeSeconds     int
			VisibilityTimeout   *int
		}
		if err := json.Unmarshal(body, &in); err != nil || in.QueueUrl == "" {
			fail(w, "InvalidParameterValue", fmt.Sprintf("ReceiveMessage %s: %v", body, err))
			return
		}
		if in.MaxNumberOfMessages < 1 || in.MaxNumberOfMessages > 10 {
			in.MaxNumberOfMessages = 1
		}
		visibility := 30 * time.Second
		if in.VisibilityTimeout != nil {
			visibility = time.Duration(*in.VisibilityTimeout) * time.Second
		}
		deadline := time.Now().Add(time.Duration(in.WaitTimeSeconds) * time.Second)
		for {
			msgs := q.receive(in.MaxNumberOfMessages, visibility)
			if len(msgs) > 0 || time.Now().After(deadline) {
				reply(w, map[string]any{"Messages": msgs})
				return
			}
			select {
			case <-r.Context().Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	case "DeleteMessageBatch":
		var in struct {
			QueueUrl string
			Entries  []struct{ Id, ReceiptHandle string }
		}
		if err := json.Unmarshal(body, &in); err != nil || len(in.Entries) == 0 || len(in.Entries) > 10 {
			fail(w, "InvalidParameterValue", fmt.Sprintf("DeleteMessageBatch %s: %v", body, err))
			return
		}
		ok := []map[string]string{}
		bad := []map[string]any{}
		for _, e := range in.Entries {
			if q.delete(e.ReceiptHandle) {
				ok = append(ok, map[string]string{"Id": e.Id})
			} else {
				bad = append(bad, map[string]any{"Id": e.Id, "Code": "ReceiptHandleIsInvalid", "Message": "stale receipt handle", "SenderFault": true})
			}
		}
		reply(w, map[string]any{"Successful": ok, "Failed": bad})
	case "DeleteMessage":
		var in struct{ QueueUrl, ReceiptHandle string }
		if err := json.Unmarshal(body, &in); err != nil || !q.delete(in.ReceiptHandle) {
			fail(w, "ReceiptHandleIsInvalid", "stale receipt handle")
			return
		}
		reply(w, map[string]any{})
	default:
		fail(w, "InvalidAction", "unsupported action "+action)
	}
}

func (q *Queue) receive(max int, visibility time.Duration) []map[string]any {
	q.mu.Lock()
	defer q.mu.Unlock()
	now := time.Now()
	var out []map[string]any
	kept := q.msgs[:0]
	for _, m := range q.msgs {
		if len(out) < max && !m.visibleAt.After(now) {
			if q.MaxReceiveCount > 0 && m.receives >= q.MaxReceiveCount {
				q.dead = append(q.dead, m.body)
				continue
			}
			m.receives++
			q.received++
			m.visibleAt = now.Add(visibility)
			m.receipt = m.id + "-" + strconv.Itoa(m.receives)
			sum := md5.Sum([]byte(m.body))
			out = append(out, map[string]any{"MessageId": m.id, "ReceiptHandle": m.receipt, "Body": m.body, "MD5OfBody": hex.EncodeToString(sum[:]),
				"Attributes": map[string]string{"ApproximateReceiveCount": strconv.Itoa(m.receives)}})
		}
		kept = append(kept, m)
	}
	q.msgs = kept
	return out
}

// delete removes the message whose latest receipt handle is h: a handle from before
// the message became visible again is stale, as in SQS.
func (q *Queue) delete(h string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	for i, m := range q.msgs {
		if m.receipt == h {
			q.msgs = append(q.msgs[:i], q.msgs[i+1:]...)
			q.deleted++
			return true
		}
	}
	return false
}

func reply(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/x-amz-json-1.0")
	json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, code, msg string) {
	w.Header().Set("Content-Type", "application/x-amz-json-1.0")
	w.Header().Set("X-Amzn-Query-Error", "AWS.SimpleQueueService."+code+";Sender")
	w.WriteHeader(http.StatusBadRequest)
	json.NewEncoder(w).Encode(map[string]string{"__type": "com.amazonaws.sqs#" + code, "message": msg})
}
