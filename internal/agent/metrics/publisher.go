package metrics

import (
	"context"
	"errors"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/hostid"
)

// Sink publishes closed intervals. Publish must not block on the network for long: the
// CloudWatch sink queues and sends in the background.
type Sink interface {
	Name() string
	Publish(ctx context.Context, s Snapshot, id hostid.Identity, known bool) error
	// Close publishes what is still pending, within ctx, and releases the sink.
	Close(ctx context.Context) error
}

// IdentitySource tells the instance's identity once known (hostid.Source does).
type IdentitySource interface {
	Get() (hostid.Identity, bool)
}

// Publisher flushes the aggregator into every sink once per interval.
type Publisher struct {
	agg      *Aggregator
	sinks    []Sink
	id       IdentitySource
	interval time.Duration
	log      zerolog.Logger
}

// NewPublisher returns a publisher; id may be nil (no instance dimensions).
func NewPublisher(agg *Aggregator, id IdentitySource, interval time.Duration, log zerolog.Logger, sinks ...Sink) *Publisher {
	return &Publisher{agg: agg, sinks: sinks, id: id, interval: interval, log: log}
}

// Run publishes every interval until ctx is done, then publishes the last, partial
// interval and closes the sinks, giving them up to drain to do so.
func (p *Publisher) Run(ctx context.Context, drain time.Duration) error {
	t := time.NewTicker(p.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			final, cancel := context.WithTimeout(context.Background(), drain)
			defer cancel()
			p.publish(final, time.Now())
			var errs []error
			for _, s := range p.sinks {
				if err := s.Close(final); err != nil {
					errs = append(errs, err)
				}
			}
			return errors.Join(errs...)
		case now := <-t.C:
			p.publish(ctx, now)
		}
	}
}

func (p *Publisher) publish(ctx context.Context, now time.Time) {
	snap := p.agg.Flush(now)
	var id hostid.Identity
	var known bool
	if p.id != nil {
		id, known = p.id.Get()
	}
	for _, s := range p.sinks {
		if err := s.Publish(ctx, snap, id, known); err != nil {
			p.log.Error().Err(err).Str("event", "metrics_publish_failed").Str("sink", s.Name()).
				Msg("publishing metrics")
		}
	}
}
