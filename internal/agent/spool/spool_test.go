package spool

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

func appendN(t *testing.T, s *Spool, from, n int) {
	t.Helper()
	for i := from; i < from+n; i++ {
		if _, err := s.Append([]byte(fmt.Sprintf("record-%04d", i))); err != nil {
			t.Fatal(err)
		}
	}
}

func TestAppendPeekAckReopen(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, s, 0, 10)
	recs, err := s.Peek(4)
	if err != nil || len(recs) != 4 || string(recs[0].Data) != "record-0000" || string(recs[3].Data) != "record-0003" {
		t.Fatalf("peek %v %v", recs, err)
	}
	if err := s.Ack(recs[3].Next); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// Reopened (a restart): acknowledged records are gone, the rest are there.
	s, err = Open(dir, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	recs, _ = s.Peek(100)
	if len(recs) != 6 || string(recs[0].Data) != "record-0004" {
		t.Fatalf("after reopen: %d records, first %q", len(recs), recs[0].Data)
	}
}

func TestTornTailIsCut(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir, 1<<20)
	appendN(t, s, 0, 3)
	s.Close()
	// A crash mid-write leaves half a record.
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	f, _ := os.OpenFile(segs[len(segs)-1], os.O_WRONLY|os.O_APPEND, 0)
	f.Write([]byte{50, 0, 0, 0, 1, 2, 3, 4, 'x', 'y'})
	f.Close()
	s, err := Open(dir, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, s, 3, 1)
	recs, err := s.Peek(100)
	if err != nil || len(recs) != 4 || string(recs[3].Data) != "record-0003" {
		t.Fatalf("after torn tail: %d records, %v", len(recs), err)
	}
}

func TestBoundedDropsOldest(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir, 16<<10) // segments of 4 KiB
	var dropped uint64
	for i := 0; i < 2000; i++ {
		n, err := s.Append([]byte(fmt.Sprintf("record-%04d-%s", i, "padding-padding-padding")))
		if err != nil {
			t.Fatal(err)
		}
		dropped += n
	}
	recs, _ := s.Peek(100000)
	if dropped == 0 || s.Dropped() != dropped {
		t.Fatalf("dropped %d, Dropped() %d", dropped, s.Dropped())
	}
	if uint64(len(recs))+dropped != 2000 {
		t.Fatalf("%d kept + %d dropped != 2000", len(recs), dropped)
	}
	if string(recs[len(recs)-1].Data[:11]) != "record-1999" {
		t.Fatalf("newest record lost: %q", recs[len(recs)-1].Data)
	}
	var size int64
	files, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	for _, f := range files {
		fi, _ := os.Stat(f)
		size += fi.Size()
	}
	if size > 16<<10+4096 {
		t.Fatalf("spool holds %d bytes, limit 16 KiB", size)
	}
}

func TestAckAcrossSegments(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir, 1<<20)
	s.segmentMax = 64 // a few records per segment
	appendN(t, s, 0, 20)
	recs, _ := s.Peek(15)
	if err := s.Ack(recs[14].Next); err != nil {
		t.Fatal(err)
	}
	rest, _ := s.Peek(100)
	if len(rest) != 5 || string(rest[0].Data) != "record-0015" {
		t.Fatalf("rest %d first %q", len(rest), rest[0].Data)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(files) > 4 {
		t.Fatalf("%d segments left after ack", len(files))
	}
}
