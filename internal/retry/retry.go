// Package retry is the one backoff policy of both programs: exponential, capped, with
// jitter so that a fleet of agents that lost the same peer at the same moment does not
// come back at the same moment.
package retry

import (
	"context"
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
