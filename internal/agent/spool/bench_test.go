package spool

import (
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkAppend is the cost of spooling one fingerprint (fsync'd), against the same
// write without fsync in the same run: the price of surviving kill -9 and power loss.
func BenchmarkAppend(b *testing.B) {
	record := make([]byte, 600) // a fingerprint's JSON is about this size
	for i := range record {
		record[i] = 'x'
	}
	b.Run("spool", func(b *testing.B) {
		s, err := Open(filepath.Join(b.TempDir(), "spool"), 1<<30)
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		for i := 0; i < b.N; i++ {
			if _, err := s.Append(record); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("write-no-fsync", func(b *testing.B) {
		f, err := os.Create(filepath.Join(b.TempDir(), "plain"))
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		for i := 0; i < b.N; i++ {
			if _, err := f.Write(record); err != nil {
				b.Fatal(err)
			}
		}
	})
}
