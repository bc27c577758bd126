package cloudtrail

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"regexp"
	"runtime"
	"testing"
	"time"
)

// The real-shaped corpus is the public excerpt under testdata/ (196 records recorded in a
// real account: nested request and response elements, long user agents) written again
// and again, each copy with its own access keys, source addresses, instance ids and
// event ids, so that a large input has the shape of real records and not the generator's.

var (
	keyRE      = regexp.MustCompile(`"accessKeyId":"(AKIA|ASIA)[A-Z0-9]{16}"`)
	sourceRE   = regexp.MustCompile(`"sourceIPAddress":"\d+\.\d+\.\d+\.\d+"`)
	instanceRE = regexp.MustCompile(`i-[0-9a-f]{17}`)
	eventIDRE  = regexp.MustCompile(`"eventID":"[0-9a-f]{8}`)
)

// excerptRecords returns the excerpt's records, one raw JSON value each.
func excerptRecords(tb testing.TB) [][]byte {
	tb.Helper()
	f, err := os.Open("../../../testdata/cloudtrail/invictus-ir-aws_dataset/excerpt.json.gz")
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		tb.Fatal(err)
	}
	var doc struct{ Records []json.RawMessage }
	if err := json.NewDecoder(gz).Decode(&doc); err != nil {
		tb.Fatal(err)
	}
	out := make([][]byte, len(doc.Records))
	for i, r := range doc.Records {
		out[i] = r
	}
	return out
}

// writeRealShaped writes {"Records":[...]} with copies of the records, each copy varied.
func writeRealShaped(w io.Writer, recs [][]byte, copies int) error {
	bw := &bytes.Buffer{}
	bw.WriteString(`{"Records":[`)
	for k := range copies {
		for i, r := range recs {
			if k > 0 || i > 0 {
				bw.WriteByte(',')
			}
			r = keyRE.ReplaceAllFunc(r, func(m []byte) []byte {
				return fmt.Appendf(nil, "%s%04X\"", m[:len(m)-5], k%0x10000)
			})
			r = sourceRE.ReplaceAllFunc(r, func([]byte) []byte {
				return fmt.Appendf(nil, `"sourceIPAddress":"%d.%d.%d.%d"`, 3+k%200, k/200%256, i%256, 1+k%254)
			})
			r = instanceRE.ReplaceAllFunc(r, func(m []byte) []byte {
				return fmt.Appendf(nil, "%s%05x", m[:len(m)-5], k%0x100000)
			})
			r = eventIDRE.ReplaceAllFunc(r, func([]byte) []byte {
				return fmt.Appendf(nil, `"eventID":"%08x`, k<<8|i)
			})
			bw.Write(r)
		}
		if bw.Len() > 1<<20 {
			if _, err := w.Write(bw.Bytes()); err != nil {
				return err
			}
			bw.Reset()
		}
	}
	bw.WriteString("]}\n")
	_, err := w.Write(bw.Bytes())
	return err
}

// BenchmarkDecodeRealShaped reads the same real-shaped corpus (from memory, so that the
// figures are the readers' alone) with the reader before (encoding/json) and with the
// fast one, in each round, and reports both rates and their ratio; plain JSON, and
// gzip as AWS delivers it:
//
//	go test -run '^$' -bench DecodeRealShaped -benchtime 3x ./internal/correlator/cloudtrail
func BenchmarkDecodeRealShaped(b *testing.B) {
	recs := excerptRecords(b)
	const copies = 50
	var plain, zipped bytes.Buffer
	zw := gzip.NewWriter(&zipped)
	if err := writeRealShaped(io.MultiWriter(&plain, zw), recs, copies); err != nil {
		b.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		b.Fatal(err)
	}
	want := int64(copies * len(recs))
	for _, in := range []struct {
		name string
		data []byte
	}{{"json", plain.Bytes()}, {"gzip", zipped.Bytes()}} {
		b.Run(in.name, func(b *testing.B) {
			var refTime, fastTime time.Duration
			for b.Loop() {
				for _, dec := range []struct {
					read func(string, io.Reader, func(*Record, Pos), func(Problem)) Stats
					t    *time.Duration
				}{{readReference, &refTime}, {Read, &fastTime}} {
					start := time.Now()
					st := dec.read("real-shaped.json", bytes.NewReader(in.data), func(*Record, Pos) {}, nil)
					*dec.t += time.Since(start)
					if st.Records != want || st.Malformed != 0 {
						b.Fatalf("read %+v, want %d records", st, want)
					}
				}
			}
			n := float64(b.N)
			b.ReportMetric(n*float64(want)/refTime.Seconds(), "encoding/json-records/s")
			b.ReportMetric(n*float64(want)/fastTime.Seconds(), "fast-records/s")
			b.ReportMetric(n*float64(plain.Len())/1e6/fastTime.Seconds(), "fast-MB/s")
			b.ReportMetric(refTime.Seconds()/fastTime.Seconds(), "speedup")
		})
	}
}

// TestRealShapedHeap streams a real-shaped corpus of ~190 MB through the fast decoder
// from a pipe and checks the peak heap in use.
func TestRealShapedHeap(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	recs := excerptRecords(t)
	const copies = 500
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(writeRealShaped(pw, recs, copies)) }()
	runtime.GC()
	var peak uint64
	var ms runtime.MemStats
	var n int64
	st := Read("real-shaped.json", pr, func(*Record, Pos) {
		if n++; n%5000 == 0 {
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapInuse)
		}
	}, func(p Problem) { t.Errorf("problem: %v", p) })
	if st.Records != int64(copies*len(recs)) {
		t.Fatalf("records %d", st.Records)
	}
	if peak > 64<<20 {
		t.Fatalf("heap in use reached %d MB", peak>>20)
	}
	t.Logf("peak heap in use %.1f MB over %d records", float64(peak)/1e6, n)
}
