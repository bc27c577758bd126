// Command bench-correlator measures the correlator's detection throughput on a large
// generated CloudTrail file against a baseline that only decodes the same records, in
// one run, and the heap in use while doing it (it must not grow with the file):
//
//	go run ./tools/bench-correlator [-records 300000] [-instances 2000] [-rounds 3]
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/cloudtrail"
	"github.com/imdsguard/imdsguard/internal/correlator/config"
	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/correlator/fpstore"
	"github.com/imdsguard/imdsguard/internal/correlator/ipranges"
	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
)

func main() {
	records := flag.Int("records", 300000, "records in the generated file")
	instances := flag.Int("instances", 2000, "instances (keys) in the file")
	rounds := flag.Int("rounds", 3, "alternating rounds of baseline and detection")
	flag.Parse()
	if err := run(*records, *instances, *rounds); err != nil {
		fmt.Fprintf(os.Stderr, "bench-correlator: %v\n", err)
		os.Exit(1)
	}
}

func run(records, instances, rounds int) error {
	dir, err := os.MkdirTemp("", "bench-correlator")
	if err != nil {
		return fmt.Errorf("create temp dir: %w", err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "large.json")
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create file: %w", err)
	}
	fps, err := ctcorpus.Large(f, records, instances, 1)
	if err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close file: %w", err)
	}
	info, _ := os.Stat(path)
	size := info.Size()
	fmt.Printf("file: %d records, %.1f MB, %d instances, GOMAXPROCS %d\n", records, float64(size)/1e6, instances, runtime.GOMAXPROCS(0))

	store := fpstore.NewMemory()
	for _, fp := range fps {
		store.Add(fp)
	}
	ranges, err := ipranges.Parse(strings.NewReader(ctcorpus.IPRangesJSON))
	if err != nil {
		return err
	}
	cfg, err := config.Parse([]byte(strings.Replace(ctcorpus.ConfigYAML, "IPRANGES", "/x", 1)))
	if err != nil {
		return err
	}

	baseline := func() (int64, int, error) {
		f, err := os.Open(path)
		if err != nil {
			return 0, 0, err
		}
		defer f.Close()
		st := cloudtrail.Read(path, f, func(*cloudtrail.Record, cloudtrail.Pos) {}, nil)
		return st.Records, 0, nil
	}
	detect := func() (int64, int, error) {
		f, err := os.Open(path)
		if err != nil {
			return 0, 0, err
		}
		defer f.Close()
		d := detector.New(detector.OptionsFrom(cfg, ranges, store, zerolog.Nop()))
		st := cloudtrail.Read(path, f, func(r *cloudtrail.Record, _ cloudtrail.Pos) { d.Observe(r) }, nil)
		return st.Records, len(d.Findings()), nil
	}
	var base, full []float64
	var peakBase, peakFull uint64
	var nFindings int
	for i := 0; i < rounds; i++ {
		r, peak, _, err := measure(baseline)
		if err != nil {
			return err
		}
		base = append(base, r)
		peakBase = max(peakBase, peak)
		r, peak, n, err := measure(detect)
		if err != nil {
			return err
		}
		full = append(full, r)
		peakFull = max(peakFull, peak)
		nFindings = n
	}
	mb, mf := median(base), median(full)
	fmt.Printf("decode only (baseline): %8.0f records/s  (%.1f MB/s)  peak heap %.1f MB\n", mb, mb*float64(size)/float64(records)/1e6, float64(peakBase)/1e6)
	fmt.Printf("detection:              %8.0f records/s  (%.1f MB/s)  peak heap %.1f MB  findings %d\n", mf, mf*float64(size)/float64(records)/1e6, float64(peakFull)/1e6, nFindings)
	fmt.Printf("ratio detection/baseline: %.2f (goal >= 0.70); medians of %d alternating rounds\n", mf/mb, rounds)
	return nil
}

// measure runs fn, sampling the heap in use, and returns records per second.
func measure(fn func() (int64, int, error)) (float64, uint64, int, error) {
	runtime.GC()
	var peak atomic.Uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	start := time.Now()
	n, findings, err := fn()
	el := time.Since(start)
	close(stop)
	wg.Wait()
	return float64(n) / el.Seconds(), peak.Load(), findings, err
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}
