// Package spool is a durable on-disk queue: a record is fsync'd before Append returns,
// survives kill -9 and reboots, and stays until the consumer acknowledges it. The spool
// is bounded: when it grows past its limit the oldest records are dropped, counted, and
// the caller is told. A record torn by a crash mid-write is cut off when the spool
// is opened; every record before it is intact.
//
// Layout: segment files NNNNNNNNNNNNNNNNNNNN.seg of records [len u32][crc32c u32][payload],
// and a file "ack" holding the position of the first unacknowledged record.
package spool

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/imdsguard/imdsguard/internal/atomicfile"
)

const (
	headerSize = 8
	maxRecord  = 1 << 20
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// Position is where a record starts: a segment number and a byte offset in it.
type Position struct {
	Seg uint64
	Off int64
}

// Record is one queued payload and the position just after it (what to Ack).
type Record struct {
	Data []byte
	Next Position
}

// Spool is safe for concurrent use by one producer and one consumer.
type Spool struct {
	dir        string
	maxBytes   int64
	segmentMax int64

	mu      sync.Mutex
	segs    []uint64 // ascending
	sizes   map[uint64]int64
	cur     *os.File // last segment, open for append
	ack     Position
	dropped uint64
	notify  chan struct{}
}

// Open opens or creates the spool in dir, holding at most maxBytes on disk.
func Open(dir string, maxBytes int64) (*Spool, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create spool: %w", err)
	}
	s := &Spool{dir: dir, maxBytes: maxBytes, segmentMax: min(maxBytes/4, 4<<20), sizes: map[uint64]int64{},
		notify: make(chan struct{}, 1)}
	if s.segmentMax < 4096 {
		s.segmentMax = 4096
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read spool: %w", err)
	}
	for _, e := range entries {
		if n, ok := strings.CutSuffix(e.Name(), ".seg"); ok {
			if seg, err := strconv.ParseUint(n, 10, 64); err == nil {
				s.segs = append(s.segs, seg)
			}
		}
	}
	sort.Slice(s.segs, func(i, j int) bool { return s.segs[i] < s.segs[j] })
	if err := s.readAck(); err != nil {
		return nil, err
	}
	for _, seg := range s.segs {
		size, err := s.validate(seg)
		if err != nil {
			return nil, err
		}
		s.sizes[seg] = size
	}
	if len(s.segs) == 0 {
		s.segs = []uint64{max(s.ack.Seg, 1)}
		s.sizes[s.segs[0]] = 0
	}
	last := s.segs[len(s.segs)-1]
	if s.cur, err = os.OpenFile(s.path(last), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600); err != nil {
		return nil, fmt.Errorf("open spool segment: %w", err)
	}
	if s.ack.Seg < s.segs[0] {
		s.ack = Position{Seg: s.segs[0]}
	}
	return s, atomicfile.SyncDir(dir)
}

func (s *Spool) path(seg uint64) string {
	return filepath.Join(s.dir, fmt.Sprintf("%020d.seg", seg))
}

func (s *Spool) readAck() error {
	data, err := os.ReadFile(filepath.Join(s.dir, "ack"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read spool ack: %w", err)
	}
	if _, err := fmt.Sscanf(string(data), "%d %d", &s.ack.Seg, &s.ack.Off); err != nil {
		return fmt.Errorf("spool ack file is corrupt: %q", data)
	}
	return nil
}

// validate scans a segment and cuts off a torn tail; it returns the valid size.
func (s *Spool) validate(seg uint64) (int64, error) {
	f, err := os.OpenFile(s.path(seg), os.O_RDWR, 0o600)
	if err != nil {
		return 0, fmt.Errorf("open spool segment: %w", err)
	}
	defer f.Close()
	var off int64
	for {
		_, n, err := readRecord(f, off)
		if err != nil {
			break
		}
		off += n
	}
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if fi.Size() != off {
		if err := f.Truncate(off); err != nil {
			return 0, fmt.Errorf("cut torn spool record: %w", err)
		}
		if err := f.Sync(); err != nil {
			return 0, err
		}
	}
	return off, nil
}

func readRecord(r io.ReaderAt, off int64) ([]byte, int64, error) {
	var h [headerSize]byte
	if _, err := r.ReadAt(h[:], off); err != nil {
		return nil, 0, err
	}
	n := binary.LittleEndian.Uint32(h[0:4])
	if n == 0 || n > maxRecord {
		return nil, 0, errors.New("bad record length")
	}
	data := make([]byte, n)
	if _, err := r.ReadAt(data, off+headerSize); err != nil {
		return nil, 0, err
	}
	if crc32.Checksum(data, crcTable) != binary.LittleEndian.Uint32(h[4:8]) {
		return nil, 0, errors.New("bad record checksum")
	}
	return data, headerSize + int64(n), nil
}

// Append writes data durably. It returns how many old records had to be dropped to stay
// within the size limit (usually 0).
func (s *Spool) Append(data []byte) (dropped uint64, err error) {
	if len(data) == 0 || len(data) > maxRecord {
		return 0, fmt.Errorf("spool record of %d bytes", len(data))
	}
	buf := make([]byte, headerSize+len(data))
	binary.LittleEndian.PutUint32(buf[0:4], uint32(len(data)))
	binary.LittleEndian.PutUint32(buf[4:8], crc32.Checksum(data, crcTable))
	copy(buf[headerSize:], data)

	s.mu.Lock()
	defer s.mu.Unlock()
	last := s.segs[len(s.segs)-1]
	if s.sizes[last] > 0 && s.sizes[last]+int64(len(buf)) > s.segmentMax {
		if err := s.rotate(); err != nil {
			return 0, err
		}
		last = s.segs[len(s.segs)-1]
	}
	if _, err := s.cur.Write(buf); err != nil {
		return 0, fmt.Errorf("write spool: %w", err)
	}
	if err := s.cur.Sync(); err != nil {
		return 0, fmt.Errorf("sync spool: %w", err)
	}
	s.sizes[last] += int64(len(buf))
	dropped = s.enforceLimit()
	select {
	case s.notify <- struct{}{}:
	default:
	}
	return dropped, nil
}

func (s *Spool) rotate() error {
	next := s.segs[len(s.segs)-1] + 1
	f, err := os.OpenFile(s.path(next), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("create spool segment: %w", err)
	}
	if err := atomicfile.SyncDir(s.dir); err != nil {
		f.Close()
		return err
	}
	s.cur.Close()
	s.cur = f
	s.segs = append(s.segs, next)
	s.sizes[next] = 0
	return nil
}

// enforceLimit drops whole oldest segments (never the one being written) until the
// spool fits, counting the unacknowledged records it loses.
func (s *Spool) enforceLimit() uint64 {
	var dropped uint64
	for s.total() > s.maxBytes && len(s.segs) > 1 {
		oldest := s.segs[0]
		from := int64(0)
		if s.ack.Seg == oldest {
			from = s.ack.Off
		}
		if s.ack.Seg <= oldest {
			dropped += s.countFrom(oldest, from)
			s.ack = Position{Seg: s.segs[1]}
			_ = s.writeAck()
		}
		_ = os.Remove(s.path(oldest))
		delete(s.sizes, oldest)
		s.segs = s.segs[1:]
	}
	s.dropped += dropped
	return dropped
}

func (s *Spool) total() int64 {
	var t int64
	for _, n := range s.sizes {
		t += n
	}
	return t
}

func (s *Spool) countFrom(seg uint64, off int64) uint64 {
	f, err := os.Open(s.path(seg))
	if err != nil {
		return 0
	}
	defer f.Close()
	var n uint64
	for {
		_, size, err := readRecord(f, off)
		if err != nil {
			return n
		}
		n++
		off += size
	}
}

// Peek returns up to max unacknowledged records, oldest first, without removing them.
func (s *Spool) Peek(max int) ([]Record, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Record
	pos := s.ack
	for _, seg := range s.segs {
		if seg < pos.Seg {
			continue
		}
		if seg > pos.Seg {
			pos = Position{Seg: seg}
		}
		f, err := os.Open(s.path(seg))
		if err != nil {
			return nil, fmt.Errorf("open spool segment: %w", err)
		}
		for len(out) < max && pos.Off < s.sizes[seg] {
			data, n, err := readRecord(f, pos.Off)
			if err != nil {
				f.Close()
				return nil, fmt.Errorf("read spool at %d:%d: %w", seg, pos.Off, err)
			}
			pos.Off += n
			out = append(out, Record{Data: data, Next: pos})
		}
		f.Close()
		if len(out) >= max {
			break
		}
	}
	return out, nil
}

// Ack acknowledges every record before next (a Record's Next), durably, and removes
// segments that hold nothing unacknowledged.
func (s *Spool) Ack(next Position) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if next.Seg < s.ack.Seg || (next.Seg == s.ack.Seg && next.Off <= s.ack.Off) {
		return nil // older than what is acknowledged (records were dropped meanwhile)
	}
	s.ack = next
	if err := s.writeAck(); err != nil {
		return err
	}
	for len(s.segs) > 1 && s.segs[0] < s.ack.Seg {
		_ = os.Remove(s.path(s.segs[0]))
		delete(s.sizes, s.segs[0])
		s.segs = s.segs[1:]
	}
	return nil
}

func (s *Spool) writeAck() error {
	if err := atomicfile.Write(filepath.Join(s.dir, "ack"), fmt.Appendf(nil, "%d %d\n", s.ack.Seg, s.ack.Off), 0o600); err != nil {
		return fmt.Errorf("write spool ack: %w", err)
	}
	return nil
}

// Notify is signalled after each Append, for a consumer waiting for work.
func (s *Spool) Notify() <-chan struct{} { return s.notify }

// Dropped is how many records were dropped to respect the size limit since Open.
func (s *Spool) Dropped() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dropped
}

// Close closes the segment being written. Everything appended is already on disk.
func (s *Spool) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur.Close()
}
