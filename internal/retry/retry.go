// Package retry is the one backoff policy of both programs: exponential, capped, with
// jitter so that a fleet of agents that lost the same peer at the same moment does not
// come back at the same moment.
package retry

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// Backoff hands out waits between attempts: Min, then doubling up to Max, each drawn
// uniformly from [d/2, d] ("equal jitter"). The zero value waits 100 ms up to 30 s.
type Backoff struct {
	Min, Max time.Duration
	next     time.Duration
}

// Next returns the wait before the next attempt and doubles the one after it.
func (b *Backoff) Next() time.Duration {
	lo, hi := b.Min, b.Max
	if lo <= 0 {
		lo = 100 * time.Millisecond
	}
	if hi < lo {
		hi = max(lo, 30*time.Second)
	}
	if b.next < lo {
		b.next = lo
	}
	d := b.next
	b.next = min(2*d, hi)
	return d/2 + rand.N(d/2+1)
}

// Reset starts the next failure over at Min, after a success.
func (b *Backoff) Reset() { b.next = 0 }

// Sleep waits d or until ctx is done, and says which.
func Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Policy retries one operation: Retries more tries after the first, waiting as Backoff
// says between them (Min Backoff, doubling up to MaxBackoff, default a minute).
type Policy struct {
	Retries    int
	Backoff    time.Duration
	MaxBackoff time.Duration
}

type permanentError struct{ err error }

func (e permanentError) Error() string { return e.err.Error() }
func (e permanentError) Unwrap() error { return e.err }

// Permanent marks an error another attempt cannot fix (a 4xx answer): Do stops at it.
func Permanent(err error) error { return permanentError{err} }

// Do calls try until it succeeds, fails permanently, the retries are spent or ctx ends,
// and returns the last error. onFail, when set, is told each failed attempt (1-based).
func (p Policy) Do(ctx context.Context, try func(ctx context.Context) error, onFail func(attempt int, err error)) error {
	b := Backoff{Min: p.Backoff, Max: p.MaxBackoff}
	if b.Max <= 0 {
		b.Max = max(time.Minute, b.Min)
	}
	var last error
	for attempt := 0; attempt <= p.Retries; attempt++ {
		if attempt > 0 {
			if err := Sleep(ctx, b.Next()); err != nil {
				return fmt.Errorf("%w (last: %w)", err, last)
			}
		}
		err := try(ctx)
		if err == nil {
			return nil
		}
		last = err
		if onFail != nil {
			onFail(attempt+1, err)
		}
		var perm permanentError
		if errors.As(err, &perm) {
			return perm.err
		}
	}
	return last
}
