package outputs

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// Retry is how an output retries one request: Attempts more tries after the first, the
// wait starting at Backoff and doubling up to MaxBackoff, each wait jittered so that
// replicas do not retry in step.
type Retry struct {
	Retries    int
	Backoff    time.Duration
	MaxBackoff time.Duration
}

// errPermanent marks an error that another attempt cannot fix (a 4xx answer).
type permanentError struct{ err error }

func (e permanentError) Error() string { return e.err.Error() }
func (e permanentError) Unwrap() error { return e.err }

// permanent wraps err so that Do stops retrying.
func permanent(err error) error { return permanentError{err} }

// Do calls try until it succeeds, fails permanently, the retries are spent or ctx ends,
// and returns the last error. onFail is told each failed attempt (1-based).
func (r Retry) Do(ctx context.Context, try func(ctx context.Context) error, onFail func(attempt int, err error)) error {
	wait := r.Backoff
	maxWait := r.MaxBackoff
	if maxWait <= 0 {
		maxWait = time.Minute
	}
	var last error
	for attempt := 0; attempt <= r.Retries; attempt++ {
		if attempt > 0 {
			t := time.NewTimer(jitter(wait))
			select {
			case <-ctx.Done():
				t.Stop()
				return fmt.Errorf("%w (last: %w)", ctx.Err(), last)
			case <-t.C:
			}
			wait = min(wait*2, maxWait)
		}
		err := try(ctx)
		if err == nil {
			return nil
		}
		last = err
		if onFail != nil {
			onFail(attempt+1, err)
		}
		var p permanentError
		if errors.As(err, &p) {
			return p.err
		}
	}
	return last
}

// jitter returns a random wait between d/2 and d.
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2+1)
}
