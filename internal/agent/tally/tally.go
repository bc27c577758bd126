// Package tally keeps the per-process tally of IMDS use that `imdsguard report` reads:
// who still uses IMDSv1, what was refused or denied, in hourly buckets kept for 30 days
// in a file under the state directory, so the story survives agent restarts.
package tally

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/imdsguard/imdsguard/internal/atomicfile"
)

// Retention is how long hourly buckets are kept.
const Retention = 30 * 24 * time.Hour

// Kind is what a process did.
type Kind int

const (
	V1            Kind = iota // IMDSv1 request answered
	V1Rejected                // IMDSv1 request refused (a rule requires v2)
	V2                        // IMDSv2 request
	Token                     // token PUT
	Denied                    // connect() denied by the allowlist
	Credential                // role credentials fetched
	V1WouldReject             // IMDSv1 request forwarded in audit mode that enforce would refuse
)

// Who is the process identity a tally is kept by.
type Who struct {
	Exe  string `json:"exe"`
	Unit string `json:"unit,omitempty"`
	User string `json:"user"`
}

// Counts is one tally.
type Counts struct {
	V1         uint64 `json:"v1"`
	V1Rejected uint64 `json:"v1_rejected"`
	// V1WouldReject counts the V1 requests (already in V1) that enforce mode would
	// have refused: what switching to enforce changes for this process.
	V1WouldReject uint64    `json:"v1_would_reject"`
	V2            uint64    `json:"v2"`
	Token         uint64    `json:"token"`
	Denied        uint64    `json:"denied"`
	Credential    uint64    `json:"credentials"`
	LastSeen      time.Time `json:"last_seen"`
}

func (c *Counts) add(k Kind, at time.Time) {
	switch k {
	case V1:
		c.V1++
	case V1Rejected:
		c.V1Rejected++
	case V2:
		c.V2++
	case Token:
		c.Token++
	case Denied:
		c.Denied++
	case Credential:
		c.Credential++
	case V1WouldReject:
		c.V1WouldReject++
	}
	if at.After(c.LastSeen) {
		c.LastSeen = at
	}
}

func (c *Counts) merge(o Counts) {
	c.V1 += o.V1
	c.V1Rejected += o.V1Rejected
	c.V2 += o.V2
	c.Token += o.Token
	c.Denied += o.Denied
	c.Credential += o.Credential
	c.V1WouldReject += o.V1WouldReject
	if o.LastSeen.After(c.LastSeen) {
		c.LastSeen = o.LastSeen
	}
}

type bucket struct {
	Hour  time.Time `json:"hour"`
	Who   Who       `json:"who"`
	Count Counts    `json:"counts"`
}

// file is the on-disk form.
type file struct {
	InstanceID string    `json:"instance_id,omitempty"`
	Since      time.Time `json:"since"`
	Buckets    []bucket  `json:"buckets"`
}

type key struct {
	hour time.Time
	who  Who
}

// Ledger is the tally. Safe for concurrent use.
type Ledger struct {
	path string

	mu       sync.Mutex
	instance string
	since    time.Time
	counts   map[key]*Counts
}

// Open loads the ledger at path, or starts an empty one when there is none.
func Open(path string) (*Ledger, error) {
	l := &Ledger{path: path, counts: map[key]*Counts{}, since: time.Now().UTC()}
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return l, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read usage ledger: %w", err)
	}
	if err := l.load(data); err != nil {
		return nil, fmt.Errorf("usage ledger %s is corrupt: %w", path, err)
	}
	return l, nil
}

// Decode returns a ledger, not backed by a file, from what Snapshot returned: the
// running agent's live tally, as `imdsguard report` gets it over the status socket.
func Decode(data []byte) (*Ledger, error) {
	l := &Ledger{counts: map[key]*Counts{}}
	if err := l.load(data); err != nil {
		return nil, fmt.Errorf("decode usage tally: %w", err)
	}
	return l, nil
}

func (l *Ledger) load(data []byte) error {
	var f file
	if err := json.Unmarshal(data, &f); err != nil {
		return err
	}
	l.instance, l.since = f.InstanceID, f.Since
	for _, b := range f.Buckets {
		c := b.Count
		l.counts[key{b.Hour, b.Who}] = &c
	}
	return nil
}

// SetInstance records which instance the ledger is about (for the switch command).
func (l *Ledger) SetInstance(id string) {
	l.mu.Lock()
	l.instance = id
	l.mu.Unlock()
}

// Observe counts one thing who did at.
func (l *Ledger) Observe(k Kind, who Who, at time.Time) {
	at = at.UTC()
	kk := key{at.Truncate(time.Hour), who}
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.counts[kk]
	if c == nil {
		c = &Counts{}
		l.counts[kk] = c
	}
	c.add(k, at)
}

// Save writes the ledger atomically, dropping buckets older than Retention.
func (l *Ledger) Save(now time.Time) error {
	data, err := l.Snapshot(now)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(l.path), 0o700); err != nil {
		return fmt.Errorf("save usage ledger: %w", err)
	}
	if err := atomicfile.Write(l.path, data, 0o600); err != nil {
		return fmt.Errorf("save usage ledger: %w", err)
	}
	return nil
}

// Snapshot is the ledger as it stands, in the form Save writes and Decode reads,
// dropping buckets older than Retention.
func (l *Ledger) Snapshot(now time.Time) ([]byte, error) {
	l.mu.Lock()
	f := file{InstanceID: l.instance, Since: l.since}
	for k, c := range l.counts {
		if now.Sub(k.hour) > Retention {
			delete(l.counts, k)
			continue
		}
		f.Buckets = append(f.Buckets, bucket{Hour: k.hour, Who: k.who, Count: *c})
	}
	l.mu.Unlock()
	sort.Slice(f.Buckets, func(i, j int) bool { return f.Buckets[i].Hour.Before(f.Buckets[j].Hour) })
	data, err := json.Marshal(f)
	if err != nil {
		return nil, fmt.Errorf("encode usage ledger: %w", err)
	}
	return data, nil
}

// Row is one process identity's use over a window.
type Row struct {
	Who
	Counts
}

// Report is what `imdsguard report` prints.
type Report struct {
	InstanceID string    `json:"instance_id,omitempty"`
	From       time.Time `json:"from"`
	To         time.Time `json:"to"`
	// Covered is false when the ledger starts after From: the window is not fully seen.
	Covered bool  `json:"covered"`
	Rows    []Row `json:"rows"`
	// ReadyForV2 says no IMDSv1 request was answered or refused in the window.
	ReadyForV2 bool   `json:"ready_for_imdsv2"`
	Command    string `json:"command,omitempty"`
	// Source says where the tally came from: "agent" (live, over the status socket) or
	// "ledger" (the file the agent saves every stats interval). Set by the caller.
	Source string `json:"source,omitempty"`
}

// Report sums the window [now-since, now].
func (l *Ledger) Report(since time.Duration, now time.Time) Report {
	from := now.Add(-since)
	l.mu.Lock()
	byWho := map[Who]*Counts{}
	for k, c := range l.counts {
		if k.hour.Add(time.Hour).Before(from) {
			continue
		}
		sum := byWho[k.who]
		if sum == nil {
			sum = &Counts{}
			byWho[k.who] = sum
		}
		sum.merge(*c)
	}
	r := Report{InstanceID: l.instance, From: from, To: now, Covered: !l.since.After(from), ReadyForV2: true}
	l.mu.Unlock()
	for who, c := range byWho {
		r.Rows = append(r.Rows, Row{Who: who, Counts: *c})
		if c.V1 > 0 || c.V1Rejected > 0 {
			r.ReadyForV2 = false
		}
	}
	sort.Slice(r.Rows, func(i, j int) bool {
		a, b := r.Rows[i], r.Rows[j]
		if a.V1+a.V1Rejected != b.V1+b.V1Rejected {
			return a.V1+a.V1Rejected > b.V1+b.V1Rejected
		}
		return a.Exe < b.Exe
	})
	if r.ReadyForV2 {
		id := r.InstanceID
		if id == "" {
			id = "INSTANCE_ID"
		}
		r.Command = "aws ec2 modify-instance-metadata-options --instance-id " + id + " --http-tokens required --http-endpoint enabled"
	}
	return r
}
