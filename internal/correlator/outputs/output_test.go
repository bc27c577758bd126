package outputs

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
)

// recorder is an output that keeps what it was given; with block set it waits for it
// (or for the delivery to be cancelled) before each batch.
type recorder struct {
	name    string
	block   chan struct{}
	mu      sync.Mutex
	batches []*Batch
	got     chan struct{}
}

func newRecorder(name string, blocked bool) *recorder {
	r := &recorder{name: name, got: make(chan struct{}, 100)}
	if blocked {
		r.block = make(chan struct{})
	}
	return r
}

func (r *recorder) Name() string { return r.name }

func (r *recorder) Deliver(ctx context.Context, b *Batch) error {
	if r.block != nil {
		select {
		case <-r.block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	r.mu.Lock()
	r.batches = append(r.batches, b)
	r.mu.Unlock()
	r.got <- struct{}{}
	return nil
}

func (r *recorder) wait(t *testing.T) {
	t.Helper()
	select {
	case <-r.got:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: no batch delivered", r.name)
	}
}

func TestDispatcherPublishesEachUpdateOnce(t *testing.T) {
	r := newRecorder("rec", false)
	d := NewDispatcher([]Output{r}, 4, nil, zerolog.Nop())
	ctx := context.Background()
	now := time.Now()
	fs := sample()
	if changed, err := d.Publish(ctx, fs, now); err != nil || len(changed) != 2 {
		t.Fatalf("%v %d", err, len(changed))
	}
	r.wait(t)
	// Same counts: nothing new (the batch still goes out, empty, for the ASFF file).
	if changed, _ := d.Publish(ctx, sample(), now); len(changed) != 0 {
		t.Fatalf("republished %d", len(changed))
	}
	r.wait(t)
	// f1 grows: only it goes out again; the batch still carries every finding.
	fs = sample()
	fs[0].Count++
	if changed, _ := d.Publish(ctx, fs, now); len(changed) != 1 || changed[0].ID != "f1" {
		t.Fatalf("%+v", changed)
	}
	r.wait(t)
	if err := d.Close(ctx); err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.batches) != 3 || len(r.batches[1].Changed) != 0 || len(r.batches[2].Changed) != 1 || len(r.batches[2].All) != 2 {
		t.Fatalf("%d batches", len(r.batches))
	}
	// Counted once, for every metrics output alike.
	c := r.batches[0].Counts
	if len(c) != 2 || c[0] != (Count{Type: "InstanceCredentialExfiltration.OutsideAWS", Severity: detector.High, Findings: 1}) ||
		c[1] != (Count{Type: "ResourceCredentialExfiltration.OutsideAWS", Severity: detector.High, Suppressed: 1}) {
		t.Fatalf("counts %+v", c)
	}
}

func TestDispatcherForget(t *testing.T) {
	l := &MemoryLedger{}
	ctx := context.Background()
	fs := sample()
	l.Claim(ctx, fs)
	l.Forget(ctx, fs[0].WindowStart.Add(time.Nanosecond))
	if again, _ := l.Claim(ctx, fs); len(again) != 2 {
		t.Fatalf("forgotten findings not claimable: %d", len(again))
	}
}

// A stuck output neither stalls Publish nor the other outputs; its queue overflows
// and the overflow is counted.
func TestDispatcherStuckOutputIsOffThePath(t *testing.T) {
	stuck := newRecorder("stuck", true)
	fine := newRecorder("fine", false)
	d := NewDispatcher([]Output{stuck, fine}, 2, nil, zerolog.Nop())
	ctx := context.Background()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 6 {
			fs := sample()
			fs[0].Count = int64(10 + i)
			d.Publish(ctx, fs, time.Now())
			fine.wait(t)
			for i == 0 && d.Stats()[0].QueueSize > 0 { // the stuck output took the first batch
				time.Sleep(time.Millisecond)
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("Publish waited for a stuck output")
	}
	st := d.Stats()
	// 6 batches: one taken by the stuck goroutine, two queued, three dropped.
	if st[0].Name != "stuck" || st[0].Dropped != 3 || st[1].Dropped != 0 || st[1].Batches != 6 {
		t.Fatalf("%+v", st)
	}
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	err := d.Close(cctx)
	if err == nil || !strings.Contains(err.Error(), "stuck") {
		t.Fatalf("close: %v", err)
	}
	if st := d.Stats(); st[0].Abandoned != 2 || st[0].Failed != 1 {
		t.Fatalf("%+v", st[0])
	}
}
