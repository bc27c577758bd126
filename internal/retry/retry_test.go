package retry

import (
	"context"
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
