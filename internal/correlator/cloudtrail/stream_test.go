package cloudtrail

import (
	"io"
	"runtime"
	"testing"

	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
)

// TestStreamingKeepsMemoryFlat reads a ~35 MB log file from a pipe (it never exists
// whole) and checks that the heap stays far below the file's size.
func TestStreamingKeepsMemoryFlat(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	pr, pw := io.Pipe()
	go func() {
		_, err := ctcorpus.Large(pw, 30000, 200, 1)
		pw.CloseWithError(err)
	}()
	runtime.GC()
	var peak uint64
	var ms runtime.MemStats
	var n int64
	st := Read("large.json", pr, func(r *Record, _ Pos) {
		if n++; n%2000 == 0 {
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapInuse)
		}
	}, func(p Problem) { t.Errorf("problem: %v", p) })
	if st.Records != 30000 {
		t.Fatalf("records %d", st.Records)
	}
	if peak > 24<<20 {
		t.Fatalf("heap in use reached %d MB while streaming", peak>>20)
	}
	t.Logf("peak heap in use %.1f MB for %d records", float64(peak)/1e6, n)
}
