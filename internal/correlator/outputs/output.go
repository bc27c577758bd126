package outputs

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
)

// Output is one destination of findings. Deliver runs in the output's own goroutine,
// never on the detection path, and gets each batch once: an output that talks to a
// network retries inside Deliver, per request, so a finding already accepted is not
// sent again when a later one fails.
type Output interface {
	// Name is the output's name in logs and counters ("webhook", "eventbridge", …).
	Name() string
	// Deliver sends b. An error means some of b was not delivered and will not be.
	Deliver(ctx context.Context, b *Batch) error
}

// Batch is what one detection cycle hands the outputs.
type Batch struct {
	// Changed are the findings that are new or whose count grew since they were last
	// published: each (finding, count) appears in one batch only.
	Changed []detector.Finding
	// All are every current finding (the ASFF file is rewritten from them).
	All []detector.Finding
	// Counts are Changed counted by type and severity, once for every metrics output.
	Counts []Count
	// Time is when the batch was made.
	Time time.Time
}

// Count is the number of changed findings of one type and severity.
type Count struct {
	Type       string // short type, e.g. "InstanceCredentialExfiltration.OutsideAWS"
	Severity   string
	Findings   int // not suppressed
	Suppressed int
}

// CountFindings counts fs by short type and severity, in the order each pair first
// appears.
func CountFindings(fs []detector.Finding) []Count {
	idx := map[[2]string]int{}
	var out []Count
	for _, f := range fs {
		k := [2]string{detector.ShortType(f.Type), f.Severity}
		i, ok := idx[k]
		if !ok {
			i = len(out)
			idx[k] = i
			out = append(out, Count{Type: k[0], Severity: k[1]})
		}
		if f.Suppressed {
			out[i].Suppressed++
		} else {
			out[i].Findings++
		}
	}
	return out
}

// Ledger remembers which update of each finding was published, so that a finding goes
// out once per update. Memory is the ledger of one process; a durable ledger makes the
// promise hold across restarts and replicas.
type Ledger interface {
	// Claim records fs as published and returns those whose (id, count) had not been
	// claimed before.
	Claim(ctx context.Context, fs []detector.Finding) ([]detector.Finding, error)
	// Forget drops the findings whose window started before t: the detector no longer
	// holds them, so they cannot come back.
	Forget(ctx context.Context, before time.Time) error
}

// MemoryLedger is a Ledger in memory.
type MemoryLedger struct {
	mu   sync.Mutex
	sent map[string]ledgerEntry
}

type ledgerEntry struct {
	count       int64
	windowStart time.Time
}

// Claim implements Ledger.
func (l *MemoryLedger) Claim(_ context.Context, fs []detector.Finding) ([]detector.Finding, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.sent == nil {
		l.sent = map[string]ledgerEntry{}
	}
	var out []detector.Finding
	for _, f := range fs {
		if e, ok := l.sent[f.ID]; ok && e.count >= f.Count {
			continue
		}
		l.sent[f.ID] = ledgerEntry{count: f.Count, windowStart: f.WindowStart}
		out = append(out, f)
	}
	return out, nil
}

// Forget implements Ledger.
func (l *MemoryLedger) Forget(_ context.Context, before time.Time) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for id, e := range l.sent {
		if e.windowStart.Before(before) {
			delete(l.sent, id)
		}
	}
	return nil
}

// Stats are one output's counters.
type Stats struct {
	Name      string
	Batches   int64 // delivered whole
	Failed    int64 // delivered in part or not at all
	Dropped   int64 // not queued: the queue was full
	Abandoned int64 // still queued when Close's context ended
	Findings  int64 // changed findings in delivered or failed batches
	QueueSize int
}

// Dispatcher hands each batch to every output through a bounded queue per output, and
// runs one delivery goroutine per output. Publish never waits for an output: when an
// output's queue is full the batch is dropped for that output, counted and logged,
// so a dead webhook cannot stall detection or the other outputs.
type Dispatcher struct {
	ledger Ledger
	log    zerolog.Logger
	queues []*queue
	wg     sync.WaitGroup
	stop   context.CancelFunc
}

type queue struct {
	out Output
	ch  chan *Batch
	// abandoned counts batches left in the queue when Close ran out of time.
	batches, failed, dropped, abandoned, findings atomic.Int64
}

// NewDispatcher starts one delivery goroutine per output. queueSize is the number of
// batches each output may hold waiting; ledger nil means a MemoryLedger.
func NewDispatcher(outs []Output, queueSize int, ledger Ledger, log zerolog.Logger) *Dispatcher {
	if ledger == nil {
		ledger = &MemoryLedger{}
	}
	if queueSize < 1 {
		queueSize = 1
	}
	ctx, stop := context.WithCancel(context.Background())
	d := &Dispatcher{ledger: ledger, log: log, stop: stop}
	for _, o := range outs {
		q := &queue{out: o, ch: make(chan *Batch, queueSize)}
		d.queues = append(d.queues, q)
		d.wg.Add(1)
		go d.deliver(ctx, q)
	}
	return d
}

func (d *Dispatcher) deliver(ctx context.Context, q *queue) {
	defer d.wg.Done()
	for b := range q.ch {
		if ctx.Err() != nil {
			q.abandoned.Add(1)
			continue
		}
		start := time.Now()
		err := q.out.Deliver(ctx, b)
		q.findings.Add(int64(len(b.Changed)))
		if err != nil {
			q.failed.Add(1)
			d.log.Error().Str("event", "output_failed").Str("output", q.out.Name()).Int("findings", len(b.Changed)).Err(err).Msg("findings not delivered")
			continue
		}
		q.batches.Add(1)
		d.log.Debug().Str("event", "output_delivered").Str("output", q.out.Name()).Int("findings", len(b.Changed)).Dur("took", time.Since(start)).Msg("findings delivered")
	}
}

// Publish claims the findings of all that are new or updated and queues them, with all,
// for every output. It returns the claimed findings.
func (d *Dispatcher) Publish(ctx context.Context, all []detector.Finding, now time.Time) ([]detector.Finding, error) {
	changed, err := d.ledger.Claim(ctx, all)
	if err != nil {
		return nil, fmt.Errorf("claim findings: %w", err)
	}
	d.Queue(changed, all, now)
	return changed, nil
}

// Queue hands findings already claimed (changed, out of all) to every output: for a
// caller that claims them in a transaction of its own.
func (d *Dispatcher) Queue(changed, all []detector.Finding, now time.Time) {
	// A batch with no change still goes out: the ASFF file is rewritten from all.
	b := &Batch{Changed: changed, All: all, Counts: CountFindings(changed), Time: now}
	for _, q := range d.queues {
		select {
		case q.ch <- b:
		default:
			q.dropped.Add(1)
			d.log.Error().Str("event", "output_queue_full").Str("output", q.out.Name()).Int("findings", len(changed)).Int("queue_size", cap(q.ch)).
				Msg("output is behind: batch dropped for it")
		}
	}
}

// Forget passes to the ledger: see Ledger.Forget.
func (d *Dispatcher) Forget(ctx context.Context, before time.Time) error {
	return d.ledger.Forget(ctx, before)
}

// Stats returns each output's counters, in the order the outputs were given.
func (d *Dispatcher) Stats() []Stats {
	out := make([]Stats, len(d.queues))
	for i, q := range d.queues {
		out[i] = Stats{Name: q.out.Name(), Batches: q.batches.Load(), Failed: q.failed.Load(), Dropped: q.dropped.Load(), Abandoned: q.abandoned.Load(),
			Findings: q.findings.Load(), QueueSize: len(q.ch)}
	}
	return out
}

// Close stops accepting batches and waits for the queued ones to be delivered until ctx
// ends; then it cancels the deliveries under way and returns an error naming the
// outputs that had batches left. Publish must not be called after Close.
func (d *Dispatcher) Close(ctx context.Context) error {
	for _, q := range d.queues {
		close(q.ch)
	}
	done := make(chan struct{})
	go func() { d.wg.Wait(); close(done) }()
	select {
	case <-done:
		d.stop()
		return nil
	case <-ctx.Done():
	}
	d.stop()
	<-done
	var errs []error
	for _, q := range d.queues {
		if n := q.abandoned.Load(); n > 0 {
			errs = append(errs, fmt.Errorf("output %s: %d batches left undelivered", q.out.Name(), n))
		}
	}
	if len(errs) == 0 {
		errs = append(errs, fmt.Errorf("outputs: delivery cut short: %w", ctx.Err()))
	}
	return errors.Join(errs...)
}
