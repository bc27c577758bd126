package cloudtrail

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"testing"
)

// BenchmarkReadPublicTrail decodes real records (the public excerpt under testdata/:
// nested request and response elements, long user agents), decompressed in memory, so
// the figure is the decoder's alone. It is the baseline for a faster decoder.
func BenchmarkReadPublicTrail(b *testing.B) {
	f, err := os.Open("../../../testdata/cloudtrail/invictus-ir-aws_dataset/excerpt.json.gz")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		b.Fatal(err)
	}
	data, err := io.ReadAll(gz)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	var records int64
	for b.Loop() {
		st := Read("excerpt.json", bytes.NewReader(data), func(*Record, Pos) {}, nil)
		if st.Records != 196 {
			b.Fatalf("read %d records", st.Records)
		}
		records += st.Records
	}
	b.ReportMetric(float64(records)/b.Elapsed().Seconds(), "records/s")
}
