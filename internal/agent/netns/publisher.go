package netns

import (
	"maps"
	"sync"
)

// Memory is a Publisher that keeps the namespaces published in memory: for tests, and
// for an agent whose kernel programs cannot redirect to other namespaces yet.
type Memory struct {
	mu      sync.Mutex
	m       map[uint64]Families
	changed chan struct{} // closed and replaced on every change
}

// NewMemory returns an empty Memory publisher.
func NewMemory() *Memory {
	return &Memory{m: map[uint64]Families{}, changed: make(chan struct{})}
}

// Add implements Publisher.
func (p *Memory) Add(cookie uint64, f Families) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.m[cookie] = f
	close(p.changed)
	p.changed = make(chan struct{})
	return nil
}

// Remove implements Publisher.
func (p *Memory) Remove(cookie uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.m, cookie)
	close(p.changed)
	p.changed = make(chan struct{})
	return nil
}

// Published returns what is published now, and a channel closed at the next change.
func (p *Memory) Published() (map[uint64]Families, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return maps.Clone(p.m), p.changed
}
