package outputs

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"
)

// JSONLines writes each changed finding as one JSON line (the stable schema) to W.
type JSONLines struct {
	W io.Writer
}

// Name implements Output.
func (j *JSONLines) Name() string { return "json_lines" }

// Deliver implements Output.
func (j *JSONLines) Deliver(_ context.Context, b *Batch) error { return WriteJSONLines(j.W, b.Changed) }

// ASFFFile rewrites Path from every current finding after each batch.
type ASFFFile struct {
	Path       string
	ProductARN string
}

// Name implements Output.
func (a *ASFFFile) Name() string { return "asff_file" }

// Deliver implements Output.
func (a *ASFFFile) Deliver(_ context.Context, b *Batch) error {
	return WriteASFFFile(a.Path, b.All, a.ProductARN, b.Time)
}

// EMFFile appends the batch's counts to Path as Embedded Metric Format lines.
type EMFFile struct {
	Path      string
	Namespace string
}

// Name implements Output.
func (e *EMFFile) Name() string { return "metrics_file" }

// Deliver implements Output.
func (e *EMFFile) Deliver(_ context.Context, b *Batch) error {
	if len(b.Counts) == 0 {
		return nil
	}
	return appendMetrics(e.Path, e.Namespace, b.Counts, b.Time)
}

func appendMetrics(path, namespace string, counts []Count, now time.Time) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open metrics file: %w", err)
	}
	if err := WriteMetrics(f, namespace, counts, now); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close metrics file: %w", err)
	}
	return nil
}
