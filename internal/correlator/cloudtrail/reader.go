package cloudtrail

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"time"
)

// Pos says where a record is: the file, the record's number in it (the line number for
// JSON lines, the 0-based index in the Records array otherwise) and its byte offset in
// the decompressed stream.
type Pos struct {
	File   string `json:"file"`
	Index  int64  `json:"index"`
	Offset int64  `json:"offset"`
}

func (p Pos) String() string {
	return fmt.Sprintf("%s: record %d (byte %d)", p.File, p.Index, p.Offset)
}

// Problem is a record that was skipped, or a file that ended early.
type Problem struct {
	Pos
	// Truncated is true when the file ended (or broke) before its end: the records read
	// until then were delivered, the rest of the file is lost.
	Truncated bool
	Err       error
}

// Stats counts what one Read saw.
type Stats struct {
	Records   int64 // records delivered
	Malformed int64 // records skipped
	Truncated bool  // the file ended early or broke
}

// Add sums o into s (Truncated counts as a file).
func (s *Stats) Add(o Stats) {
	s.Records += o.Records
	s.Malformed += o.Malformed
	s.Truncated = s.Truncated || o.Truncated
}

// maxLine bounds one JSON line; a longer one is skipped as malformed.
const maxLine = 64 << 20

var recordsDoc = regexp.MustCompile(`^\{\s*"Records"\s*:`)

// Read streams the records of one file (any supported format, gzip or not) to fn and
// every skipped record or early end to problem (which may be nil). fn gets a Record that
// is reused for the next one: copy what must outlive the call. Memory use does not grow
// with the file. Read never fails: what went wrong is in the problems and the Stats.
func Read(name string, r io.Reader, fn func(*Record, Pos), problem func(Problem)) Stats {
	rd := &reader{name: name, fn: fn, problem: problem}
	rd.run(r)
	return rd.stats
}

type reader struct {
	name    string
	fn      func(*Record, Pos)
	problem func(Problem)
	stats   Stats
	rec     Record
	strs    repeats
}

func (rd *reader) report(p Problem) {
	p.File = rd.name
	if p.Truncated {
		rd.stats.Truncated = true
	} else {
		rd.stats.Malformed++
	}
	if rd.problem != nil {
		rd.problem(p)
	}
}

func (rd *reader) run(r io.Reader) {
	br := bufio.NewReaderSize(r, 256<<10)
	if magic, _ := br.Peek(2); len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		gz, err := gzip.NewReader(br)
		if err != nil {
			rd.report(Problem{Truncated: true, Err: fmt.Errorf("open gzip: %w", err)})
			return
		}
		defer func() { _ = gz.Close() }() // read side: nothing to flush
		ahead := newGunzipAhead(gz)
		defer ahead.Close()
		br = bufio.NewReaderSize(ahead, 256<<10)
	}
	// Skip a byte-order mark and leading white space, then look at what starts the file.
	var skipped int64
	for {
		b, err := br.ReadByte()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				rd.report(Problem{Truncated: true, Err: fmt.Errorf("read: %w", err)})
			}
			return // empty file
		}
		if b == ' ' || b == '\t' || b == '\r' || b == '\n' || b == 0xef || b == 0xbb || b == 0xbf {
			skipped++
			continue
		}
		_ = br.UnreadByte()
		break
	}
	head, _ := br.Peek(4096)
	switch {
	case recordsDoc.Match(head):
		rd.document(br, skipped)
	case head[0] == '[':
		rd.array(br, skipped)
	case bytes.HasPrefix(head, []byte("{\n")) || bytes.HasPrefix(head, []byte("{\r\n")):
		rd.values(br, skipped) // one pretty-printed record or several
	default:
		rd.lines(br, skipped)
	}
}

// decodeErr tells a bad record (the decoder consumed it; go on) from a broken stream.
func (rd *reader) decodeErr(err error, pos Pos) (stop bool) {
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) || !isDecodeErr(err) {
		rd.report(Problem{Pos: pos, Truncated: true, Err: fmt.Errorf("file ends or breaks here: %w", err)})
		return true
	}
	rd.report(Problem{Pos: pos, Err: err})
	return false
}

func isDecodeErr(err error) bool {
	var te *json.UnmarshalTypeError
	return errors.As(err, &te)
}

// deliver checks what the decoder could not and hands the record on.
func (rd *reader) deliver(rec *Record, pos Pos) {
	field, value := "eventTime", rec.EventTime
	if value == "" {
		field, value = "@timestamp", rec.Timestamp
	}
	if value == "" {
		rd.report(Problem{Pos: pos, Err: errors.New("record has neither eventTime nor @timestamp")})
		return
	}
	t, err := time.Parse(time.RFC3339, value)
	if err != nil {
		rd.report(Problem{Pos: pos, Err: fmt.Errorf("bad %s %q", field, value)})
		return
	}
	rec.Time = t
	rd.stats.Records++
	rd.fn(rec, pos)
}

// document reads {"Records":[...], ...} token by token: one record in memory at a time.
func (rd *reader) document(r io.Reader, base int64) {
	dec := newStream(r, &rd.strs)
	pos := func(i int64) Pos { return Pos{File: rd.name, Index: i, Offset: base + dec.InputOffset()} }
	if _, err := dec.Token(); err != nil { // {
		rd.decodeErr(err, pos(0))
		return
	}
	var idx int64
	for dec.More() {
		key, err := dec.Token()
		if err != nil {
			rd.decodeErr(err, pos(idx))
			return
		}
		if key != "Records" {
			if err := dec.decode(skipValue, func() any { return new(json.RawMessage) }); err != nil && rd.decodeErr(err, pos(idx)) {
				return
			}
			continue
		}
		tok, err := dec.Token()
		if err != nil {
			rd.decodeErr(err, pos(idx))
			return
		}
		if d, ok := tok.(json.Delim); !ok || d != '[' {
			rd.report(Problem{Pos: pos(idx), Err: errors.New("Records is not an array")}) //nolint:staticcheck // names the JSON key
			continue
		}
		if !rd.elements(dec, pos, &idx) {
			return
		}
		if _, err := dec.Token(); err != nil { // ]
			rd.decodeErr(err, pos(idx))
			return
		}
	}
	if _, err := dec.Token(); err != nil { // }
		rd.decodeErr(err, pos(idx))
	}
}

func newRecord() any { return new(Record) }

// elements decodes array elements until the closing bracket; false when the stream broke.
func (rd *reader) elements(dec *stream, pos func(int64) Pos, idx *int64) bool {
	parse := func(p *parser) { p.record(&rd.rec, nil) }
	for dec.More() {
		p := pos(*idx)
		rd.rec = Record{}
		err := dec.decode(parse, newRecord)
		*idx++
		if err != nil {
			if rd.decodeErr(err, p) {
				return false
			}
			continue
		}
		rd.deliver(&rd.rec, p)
	}
	return true
}

// array reads a top-level JSON array of records.
func (rd *reader) array(r io.Reader, base int64) {
	dec := newStream(r, &rd.strs)
	pos := func(i int64) Pos { return Pos{File: rd.name, Index: i, Offset: base + dec.InputOffset()} }
	var idx int64
	if _, err := dec.Token(); err != nil {
		rd.decodeErr(err, pos(0))
		return
	}
	if !rd.elements(dec, pos, &idx) {
		return
	}
	if _, err := dec.Token(); err != nil {
		rd.decodeErr(err, pos(idx))
	}
}

// eventBridge is one line of an EventBridge export: the record is in "detail". Lines
// that are bare records decode into the embedded Record.
type eventBridge struct {
	Record
	Detail *Record `json:"detail"`
}

func (e *eventBridge) record() *Record {
	if e.Detail != nil {
		return e.Detail
	}
	return &e.Record
}

func newEventBridge() any { return new(eventBridge) }

// values reads a stream of JSON values (pretty-printed records, one after another).
func (rd *reader) values(r io.Reader, base int64) {
	dec := newStream(r, &rd.strs)
	var idx int64
	var e eventBridge
	parse := func(p *parser) { p.record(&e.Record, &e.Detail) }
	for dec.More() {
		p := Pos{File: rd.name, Index: idx, Offset: base + dec.InputOffset()}
		idx++
		e = eventBridge{}
		if err := dec.decode(parse, newEventBridge); err != nil {
			if rd.decodeErr(err, p) {
				return
			}
			continue
		}
		rd.deliver(e.record(), p)
	}
}

// decodeLine decodes one JSON line (white space trimmed) into e; encoding/json words the
// error of a bad one.
func decodeLine(body []byte, e *eventBridge, strs *repeats) error {
	p := parser{b: body, final: true, strs: strs}
	p.record(&e.Record, &e.Detail)
	if p.err == nil && !p.typeErr && p.i == len(body) {
		return nil
	}
	if err := json.Unmarshal(body, new(eventBridge)); err != nil {
		return err
	}
	return fmt.Errorf("line: %w", errSyntax) // unreachable: the two disagree
}

// lines reads JSON lines; a bad line is skipped and the next one read.
func (rd *reader) lines(br *bufio.Reader, base int64) {
	var (
		e    eventBridge
		buf  []byte
		line int64
		off  = base
	)
	for {
		buf = buf[:0]
		tooLong := false
		var err error
		for {
			var chunk []byte
			chunk, err = br.ReadSlice('\n')
			if len(buf)+len(chunk) <= maxLine {
				buf = append(buf, chunk...)
			} else {
				tooLong = true
			}
			if !errors.Is(err, bufio.ErrBufferFull) {
				break
			}
		}
		if len(buf) == 0 && err != nil {
			if !errors.Is(err, io.EOF) {
				rd.report(Problem{Pos: Pos{File: rd.name, Index: line + 1, Offset: off}, Truncated: true, Err: fmt.Errorf("read: %w", err)})
			}
			return
		}
		line++
		p := Pos{File: rd.name, Index: line, Offset: off}
		off += int64(len(buf))
		body := bytes.TrimSpace(buf)
		switch {
		case tooLong:
			rd.report(Problem{Pos: p, Err: fmt.Errorf("line longer than %d bytes", maxLine)})
		case len(body) == 0:
		default:
			e = eventBridge{}
			if uerr := decodeLine(body, &e, &rd.strs); uerr != nil {
				if errors.Is(err, io.EOF) && !isDecodeErr(uerr) {
					rd.report(Problem{Pos: p, Truncated: true, Err: fmt.Errorf("last line is cut: %w", uerr)})
				} else {
					rd.report(Problem{Pos: p, Err: uerr})
				}
			} else {
				rd.deliver(e.record(), p)
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				rd.report(Problem{Pos: Pos{File: rd.name, Index: line + 1, Offset: off}, Truncated: true, Err: fmt.Errorf("read: %w", err)})
			}
			return
		}
	}
}
