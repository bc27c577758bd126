// Package fpstore is the correlator's in-memory view of host fingerprints: loaded from
// JSON lines files or filled by the intake, looked up by access key id by the detector.
package fpstore

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/imdsguard/imdsguard/internal/wire"
)

// Store is what the detector needs from the fingerprint database.
type Store interface {
	// ByAccessKey returns every fingerprint of the key (one per process that fetched it).
	ByAccessKey(accessKeyID string) []wire.Fingerprint
	// All calls fn for every stored fingerprint, e.g. to learn instance addresses.
	All(fn func(wire.Fingerprint))
}

// Memory is an in-memory Store, idempotent by fingerprint id. Safe for concurrent use.
type Memory struct {
	mu    sync.RWMutex
	byID  map[string]struct{}
	byKey map[string][]wire.Fingerprint
}

// NewMemory returns an empty store.
func NewMemory() *Memory {
	return &Memory{byID: map[string]struct{}{}, byKey: map[string][]wire.Fingerprint{}}
}

// Add stores fp unless a fingerprint with the same id is already there. It reports
// whether fp was new.
func (m *Memory) Add(fp wire.Fingerprint) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	id := fp.ID
	if id == "" {
		id = fp.AccessKeyID + "/" + fp.Instance.ID + "/" + fmt.Sprint(fp.Process.PID)
	}
	if _, ok := m.byID[id]; ok {
		return false
	}
	m.byID[id] = struct{}{}
	m.byKey[fp.AccessKeyID] = append(m.byKey[fp.AccessKeyID], fp)
	return true
}

// ByAccessKey implements Store.
func (m *Memory) ByAccessKey(accessKeyID string) []wire.Fingerprint {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]wire.Fingerprint(nil), m.byKey[accessKeyID]...)
}

// All implements Store.
func (m *Memory) All(fn func(wire.Fingerprint)) {
	m.mu.RLock()
	var all []wire.Fingerprint
	for _, fps := range m.byKey {
		all = append(all, fps...)
	}
	m.mu.RUnlock()
	for _, fp := range all {
		fn(fp)
	}
}

// Len is the number of stored fingerprints.
func (m *Memory) Len() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return len(m.byID)
}

// LoadFile adds the fingerprints of a JSON-lines file (one wire.Fingerprint per line) to m.
// A bad line is an error naming the file and line: fingerprints are operator input.
func (m *Memory) LoadFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open fingerprints: %w", err)
	}
	defer f.Close()
	return m.Load(path, f)
}

// Load adds the fingerprints read from r (JSON lines); name is used in errors.
func (m *Memory) Load(name string, r io.Reader) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	line := 0
	for sc.Scan() {
		line++
		b := sc.Bytes()
		if len(trimSpace(b)) == 0 {
			continue
		}
		var fp wire.Fingerprint
		if err := json.Unmarshal(b, &fp); err != nil {
			return fmt.Errorf("%s:%d: decode fingerprint: %w", name, line, err)
		}
		if fp.AccessKeyID == "" {
			return fmt.Errorf("%s:%d: fingerprint without access_key_id", name, line)
		}
		m.Add(fp)
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("%s:%d: read fingerprints: %w", name, line+1, err)
	}
	return nil
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t' || b[0] == '\r') {
		b = b[1:]
	}
	return b
}

// Union reads several stores as one, e.g. the fingerprints loaded from files and those
// the correlator's intake received. A fingerprint id found in more than one counts once.
type Union []Store

// ByAccessKey implements Store.
func (u Union) ByAccessKey(accessKeyID string) []wire.Fingerprint {
	var out []wire.Fingerprint
	seen := map[string]bool{}
	for _, s := range u {
		for _, fp := range s.ByAccessKey(accessKeyID) {
			if fp.ID == "" || !seen[fp.ID] {
				seen[fp.ID] = true
				out = append(out, fp)
			}
		}
	}
	return out
}

// All implements Store.
func (u Union) All(fn func(wire.Fingerprint)) {
	seen := map[string]bool{}
	for _, s := range u {
		s.All(func(fp wire.Fingerprint) {
			if fp.ID == "" || !seen[fp.ID] {
				seen[fp.ID] = true
				fn(fp)
			}
		})
	}
}
