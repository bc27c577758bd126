package netns_test

import (
	"runtime"
	"testing"
	"time"
)

// BenchmarkNetnsEndpoint measures a namespace's endpoint: serve is the time from Serve
// (what Ensure runs for a connect event) to the namespace published with its listeners
// accepting; remove is the time from the kill of the namespace's last process to its
// endpoint unpublished and closed. Process creation is outside both.
func BenchmarkNetnsEndpoint(b *testing.B) {
	e := start(b, b.N+1)
	var serve, remove time.Duration
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		p := newNetnsProc(b, false)
		b.StartTimer()
		start := time.Now()
		if _, err := e.m.Serve(p.pid(), 0); err != nil {
			b.Fatal(err)
		}
		serve += time.Since(start)
		b.StopTimer()
		removed := e.m.Stats().Removed
		start = time.Now()
		p.kill()
		for e.m.Stats().Removed == removed {
			time.Sleep(100 * time.Microsecond)
		}
		remove += time.Since(start)
	}
	b.ReportMetric(float64(serve.Microseconds())/1000/float64(b.N), "serve-ms")
	b.ReportMetric(float64(remove.Microseconds())/1000/float64(b.N), "remove-ms")
}

// BenchmarkNetns100Served measures what 100 served namespaces cost the agent's process
// (listeners, accept goroutines, pidfds): the Go runtime's live memory per namespace.
func BenchmarkNetns100Served(b *testing.B) {
	const n = 100
	for i := 0; i < b.N; i++ {
		e := start(b, n)
		procs := make([]*proc, n)
		for j := range procs {
			procs[j] = newNetnsProc(b, false)
		}
		before := goMemKB()
		goroutines := runtime.NumGoroutine()
		for _, p := range procs {
			if _, err := e.m.Serve(p.pid(), 0); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(goMemKB()-before)/n, "kB/namespace")
		b.ReportMetric(float64(runtime.NumGoroutine()-goroutines)/n, "goroutines/namespace")
		e.shutdown(b)
		for _, p := range procs {
			p.kill()
		}
	}
}

// goMemKB is what the Go runtime holds live after a collection: heap objects and
// goroutine stacks. (Resident memory moves by whole pages and with the collector's
// pace: too coarse for a few kB each.) The kernel's socket memory is not counted.
func goMemKB() int {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int((ms.HeapAlloc + ms.StackInuse) / 1024)
}
