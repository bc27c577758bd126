package metrics

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/imdsguard/imdsguard/internal/agent/hostid"
)

// EMF writes each interval as CloudWatch Embedded Metric Format JSON lines, for the
// CloudWatch agent to ship: one line per instance, one per executable, one per user and
// one per container (EMF carries one value per dimension per document).
type EMF struct {
	namespace string
	path      string // "" for a writer given to NewEMF (stdout, tests)
	mu        sync.Mutex
	w         *bufio.Writer
	closer    io.Closer
}

// OpenEMF writes to stdout ("stdout") or appends to a file, created 0600 with its
// directory.
func OpenEMF(output, namespace string) (*EMF, error) {
	if output == "stdout" {
		return NewEMF(os.Stdout, nil, namespace), nil
	}
	f, err := openAppend(output)
	if err != nil {
		return nil, err
	}
	e := NewEMF(f, f, namespace)
	e.path = output
	return e, nil
}

func openAppend(path string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create EMF output directory: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open EMF output: %w", err)
	}
	return f, nil
}

// Reopen reopens the file after log rotation (the agent's SIGHUP); a no-op on stdout.
func (e *EMF) Reopen() error {
	if e.path == "" {
		return nil
	}
	f, err := openAppend(e.path)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	err = e.w.Flush()
	if cerr := e.closer.Close(); err == nil {
		err = cerr
	}
	e.w, e.closer = bufio.NewWriter(f), f
	if err != nil {
		return fmt.Errorf("close rotated EMF output: %w", err)
	}
	return nil
}

// NewEMF writes to w; closer, when not nil, is closed by Close.
func NewEMF(w io.Writer, closer io.Closer, namespace string) *EMF {
	return &EMF{namespace: namespace, w: bufio.NewWriter(w), closer: closer}
}

// Name implements Sink.
func (e *EMF) Name() string { return "emf" }

// Publish implements Sink.
func (e *EMF) Publish(_ context.Context, s Snapshot, id hostid.Identity, known bool) error {
	ts := s.End.UnixMilli()
	e.mu.Lock()
	defer e.mu.Unlock()
	// Per instance: every kind, zeros included, so "no IMDSv1 this interval" is a data
	// point and not a gap.
	if err := e.line(ts, "", "", Kinds(), s.Totals, id, known); err != nil {
		return err
	}
	for _, group := range s.groups() {
		for _, sr := range group.series {
			if err := e.line(ts, group.dim, sr.Value, nonZeroPerProcess(sr.Counts), sr.Counts, id, known); err != nil {
				return err
			}
		}
	}
	if err := e.w.Flush(); err != nil {
		return fmt.Errorf("write EMF: %w", err)
	}
	return nil
}

// Dimension names, shared by every sink.
const (
	DimInstanceID = "InstanceId"
	DimExecutable = "Executable"
	DimUser       = "User"
	DimContainer  = "Container"
)

type emfMetric struct {
	Name string `json:"Name"`
	Unit string `json:"Unit"`
}

type emfDirective struct {
	Namespace  string      `json:"Namespace"`
	Dimensions [][]string  `json:"Dimensions"`
	Metrics    []emfMetric `json:"Metrics"`
}

type emfMetadata struct {
	Timestamp         int64          `json:"Timestamp"`
	CloudWatchMetrics []emfDirective `json:"CloudWatchMetrics"`
}

// line writes one document; dim is "" for the instance line.
func (e *EMF) line(ts int64, dim, value string, kinds []Kind, c Counts, id hostid.Identity, known bool) error {
	if len(kinds) == 0 {
		return nil
	}
	doc := map[string]any{}
	dims := []string{}
	if known {
		dims = append(dims, DimInstanceID)
		doc[DimInstanceID] = id.InstanceID
	}
	if dim != "" {
		dims = append(dims, dim)
		doc[dim] = value
	}
	d := emfDirective{Namespace: e.namespace, Dimensions: [][]string{dims}}
	for _, k := range kinds {
		d.Metrics = append(d.Metrics, emfMetric{Name: k.String(), Unit: "Count"})
		doc[k.String()] = c[k]
	}
	doc["_aws"] = emfMetadata{Timestamp: ts, CloudWatchMetrics: []emfDirective{d}}
	b, err := json.Marshal(doc)
	if err != nil {
		return fmt.Errorf("encode EMF: %w", err)
	}
	b = append(b, '\n')
	if _, err := e.w.Write(b); err != nil {
		return fmt.Errorf("write EMF: %w", err)
	}
	return nil
}

func nonZeroPerProcess(c Counts) []Kind {
	var out []Kind
	for k := Kind(0); k < numKinds; k++ {
		if k.PerProcess() && c[k] > 0 {
			out = append(out, k)
		}
	}
	return out
}

// Close implements Sink.
func (e *EMF) Close(context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	err := e.w.Flush()
	if e.closer != nil {
		if cerr := e.closer.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		return fmt.Errorf("close EMF output: %w", err)
	}
	return nil
}
