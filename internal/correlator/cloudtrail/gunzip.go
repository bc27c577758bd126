package cloudtrail

import (
	"compress/gzip"
	"errors"
	"io"
)

// gunzipAhead decompresses in a goroutine of its own, a few buffers ahead of the
// decoder: the two take about as long each, so on two cores a gzip file is read in
// about half the time. Close must be called.
type gunzipAhead struct {
	full  chan chunk
	free  chan []byte
	done  chan struct{}
	exit  chan struct{}
	cur   chunk
	off   int
	ended bool
}

type chunk struct {
	b   []byte
	err error
}

const (
	aheadChunk   = 256 << 10
	aheadBuffers = 3
)

func newGunzipAhead(gz *gzip.Reader) *gunzipAhead {
	g := &gunzipAhead{full: make(chan chunk, aheadBuffers), free: make(chan []byte, aheadBuffers+1), done: make(chan struct{}), exit: make(chan struct{})}
	for range aheadBuffers + 1 {
		g.free <- make([]byte, aheadChunk)
	}
	go g.run(gz)
	return g
}

func (g *gunzipAhead) run(gz *gzip.Reader) {
	defer close(g.exit)
	for {
		var b []byte
		select {
		case b = <-g.free:
		case <-g.done:
			return
		}
		n, err := io.ReadFull(gz, b)
		if errors.Is(err, io.ErrUnexpectedEOF) {
			err = io.EOF // a short last chunk; gzip's own errors come through as they are
		}
		select {
		case g.full <- chunk{b: b[:n], err: err}:
		case <-g.done:
			return
		}
		if err != nil {
			return
		}
	}
}

func (g *gunzipAhead) Read(p []byte) (int, error) {
	for g.off == len(g.cur.b) {
		if g.ended {
			return 0, g.cur.err
		}
		if g.cur.b != nil {
			g.free <- g.cur.b[:cap(g.cur.b)]
		}
		g.cur, g.off = <-g.full, 0
		if g.cur.err != nil {
			g.ended = true
		}
	}
	n := copy(p, g.cur.b[g.off:])
	g.off += n
	return n, nil
}

// Close stops the goroutine and waits for it, so that the gzip reader and what it reads
// from are left to the caller alone.
func (g *gunzipAhead) Close() {
	close(g.done)
	<-g.exit
}
