package retry

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestBackoffDoublesCapsAndJitters(t *testing.T) {
	b := Backoff{Min: 100 * time.Millisecond, Max: time.Second}
	want := []time.Duration{100, 200, 400, 800, 1000, 1000}
	seen := map[time.Duration]bool{}
	for i, w := range want {
		w *= time.Millisecond
		d := b.Next()
		if d < w/2 || d > w {
			t.Fatalf("attempt %d: wait %v outside [%v, %v]", i, d, w/2, w)
		}
		seen[d] = true
	}
	b.Reset()
	if d := b.Next(); d > 100*time.Millisecond {
		t.Fatalf("after Reset: %v", d)
	}
	// Jitter: a thousand draws at the cap are not all the same.
	distinct := map[time.Duration]bool{}
	for range 1000 {
		distinct[b.Next()] = true
	}
	if len(distinct) < 10 {
		t.Fatalf("only %d distinct waits: no jitter", len(distinct))
	}
}

func TestBackoffZeroValueHasSaneBounds(t *testing.T) {
	var b Backoff
	for range 20 {
		if d := b.Next(); d <= 0 || d > 30*time.Second {
			t.Fatalf("wait %v", d)
		}
	}
}

func TestSleepStopsOnCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Sleep(ctx, time.Hour); err == nil {
		t.Fatal("Sleep ignored a cancelled context")
	}
	if err := Sleep(context.Background(), time.Millisecond); err != nil {
		t.Fatal(err)
	}
}

func TestPolicyStopsAtPermanentAndCountsRetries(t *testing.T) {
	p := Policy{Retries: 3, Backoff: time.Millisecond}
	calls := 0
	err := p.Do(context.Background(), func(context.Context) error { calls++; return errors.New("busy") }, nil)
	if err == nil || calls != 4 {
		t.Fatalf("transient: %d calls, %v; want 4 and the last error", calls, err)
	}
	calls = 0
	var told []int
	err = p.Do(context.Background(), func(context.Context) error {
		calls++
		return Permanent(errors.New("403 refused"))
	}, func(attempt int, _ error) { told = append(told, attempt) })
	if calls != 1 || err == nil || err.Error() != "403 refused" || len(told) != 1 {
		t.Fatalf("permanent: %d calls, %v, told %v", calls, err, told)
	}
	calls = 0
	if err := p.Do(context.Background(), func(context.Context) error {
		calls++
		if calls < 3 {
			return errors.New("busy")
		}
		return nil
	}, nil); err != nil || calls != 3 {
		t.Fatalf("recovering: %d calls, %v", calls, err)
	}
}
