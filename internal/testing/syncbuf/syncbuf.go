// Package syncbuf is a bytes.Buffer that a test can read while the goroutine it handed
// the buffer to (a server's stdout, a logger) is still writing.
package syncbuf

import (
	"bytes"
	"sync"
)

// Buffer is safe for one writer and many readers at once.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *Buffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns everything written so far.
func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
