// Package trailwatch follows where CloudTrail log files arrive (a local directory or an
// S3 bucket and prefix), hands each new file to a reader once, and remembers what it read
// in a checkpoint file so that a restart neither skips nor repeats a file.
package trailwatch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/atomicfile"
)

// Object is one log file as listed.
type Object struct {
	Name string // path below the directory, or S3 key
	Size int64
	// Tag changes when the content does (S3 ETag; size and mtime for files).
	Tag string
}

// Lister lists and opens log files.
type Lister interface {
	// ID names the source in the checkpoint ("dir:/var/log/ct", "s3://bucket/prefix").
	ID() string
	List(ctx context.Context) ([]Object, error)
	Open(ctx context.Context, name string) (io.ReadCloser, error)
}

// sinceLister is a Lister that can list incrementally, given the names already read
// (S3 does: see S3.ListSince).
type sinceLister interface {
	ListSince(ctx context.Context, done map[string]string) ([]Object, error)
}

// Skip reports names that are never CloudTrail log files: digest files, hidden and
// partial files.
func Skip(name string) bool {
	base := filepath.Base(name)
	return strings.Contains(name, "CloudTrail-Digest") || strings.HasPrefix(base, ".") ||
		strings.HasSuffix(base, ".tmp") || strings.HasSuffix(base, ".part") || strings.HasSuffix(name, "/")
}

// Dir lists a local directory recursively. Files modified less than Settle ago are left
// for the next poll (a writer may still be writing them); writers that rename a finished
// file into place need no settle time.
type Dir struct {
	Root   string
	Settle time.Duration
}

// ID implements Lister.
func (d *Dir) ID() string { return "dir:" + d.Root }

// List implements Lister.
func (d *Dir) List(ctx context.Context) ([]Object, error) {
	var out []Object
	now := time.Now()
	err := filepath.WalkDir(d.Root, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			if p == d.Root {
				return err
			}
			return nil // a file that vanished while walking
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !e.Type().IsRegular() {
			return nil
		}
		rel, _ := filepath.Rel(d.Root, p)
		if Skip(rel) {
			return nil
		}
		info, err := e.Info()
		if err != nil {
			return nil
		}
		if now.Sub(info.ModTime()) < d.Settle {
			return nil
		}
		out = append(out, Object{Name: rel, Size: info.Size(), Tag: fmt.Sprintf("%d-%d", info.Size(), info.ModTime().UnixNano())})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", d.Root, err)
	}
	return out, nil
}

// Open implements Lister.
func (d *Dir) Open(_ context.Context, name string) (io.ReadCloser, error) {
	f, err := os.Open(filepath.Join(d.Root, name))
	if err != nil {
		return nil, fmt.Errorf("open log file: %w", err)
	}
	return f, nil
}

// Checkpoint is the set of files already read, per source, kept in a JSON file that is
// replaced atomically after every file. An empty path keeps it in memory only.
type Checkpoint struct {
	path string
	Done map[string]map[string]string `json:"done"` // source id → name → tag
}

// LoadCheckpoint reads path, or starts empty when it does not exist yet.
func LoadCheckpoint(path string) (*Checkpoint, error) {
	c := &Checkpoint{path: path, Done: map[string]map[string]string{}}
	if path == "" {
		return c, nil
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read checkpoint: %w", err)
	}
	if err := json.Unmarshal(data, c); err != nil {
		return nil, fmt.Errorf("decode checkpoint %s: %w", path, err)
	}
	if c.Done == nil {
		c.Done = map[string]map[string]string{}
	}
	return c, nil
}

// InMemory stops writing the file: the caller keeps the checkpoint elsewhere (serve's
// database, with the detector's state).
func (c *Checkpoint) InMemory() { c.path = "" }

func (c *Checkpoint) done(source, name, tag string) bool {
	t, ok := c.Done[source][name]
	return ok && t == tag
}

func (c *Checkpoint) mark(source, name, tag string) error {
	if c.Done[source] == nil {
		c.Done[source] = map[string]string{}
	}
	c.Done[source][name] = tag
	return c.save()
}

// prune forgets files no longer listed, so the checkpoint does not grow forever.
func (c *Checkpoint) prune(source string, listed map[string]bool) error {
	changed := false
	for name := range c.Done[source] {
		if !listed[name] {
			delete(c.Done[source], name)
			changed = true
		}
	}
	if !changed {
		return nil
	}
	return c.save()
}

func (c *Checkpoint) save() error {
	if c.path == "" {
		return nil
	}
	data, err := json.Marshal(c)
	if err != nil {
		return fmt.Errorf("encode checkpoint: %w", err)
	}
	if err := atomicfile.Write(c.path, data, 0o600); err != nil {
		return fmt.Errorf("save checkpoint: %w", err)
	}
	return nil
}

// Follower reads every file of a Lister once.
type Follower struct {
	Lister     Lister
	Checkpoint *Checkpoint
	// Read consumes one file. It must not fail on bad content (the cloudtrail reader
	// never does); an error here stops the poll and the file is retried next time.
	Read func(name string, r io.Reader) error
	Log  zerolog.Logger
}

// Poll lists the source and reads the files not read yet, in name order (CloudTrail
// names sort by time). It returns how many files it read.
func (f *Follower) Poll(ctx context.Context) (int, error) {
	var objs []Object
	var err error
	if sl, ok := f.Lister.(sinceLister); ok {
		objs, err = sl.ListSince(ctx, f.Checkpoint.Done[f.Lister.ID()])
	} else {
		objs, err = f.Lister.List(ctx)
	}
	if err != nil {
		return 0, err
	}
	sort.Slice(objs, func(i, j int) bool { return objs[i].Name < objs[j].Name })
	id := f.Lister.ID()
	listed := make(map[string]bool, len(objs))
	n := 0
	for _, o := range objs {
		listed[o.Name] = true
		if Skip(o.Name) || f.Checkpoint.done(id, o.Name, o.Tag) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return n, err
		}
		if err := f.readOne(ctx, o); err != nil {
			return n, err
		}
		if err := f.Checkpoint.mark(id, o.Name, o.Tag); err != nil {
			return n, err
		}
		n++
	}
	return n, f.Checkpoint.prune(id, listed)
}

func (f *Follower) readOne(ctx context.Context, o Object) error {
	rc, err := f.Lister.Open(ctx, o.Name)
	if err != nil {
		return err
	}
	defer rc.Close()
	start := time.Now()
	if err := f.Read(o.Name, rc); err != nil {
		return fmt.Errorf("read %s: %w", o.Name, err)
	}
	f.Log.Debug().Str("event", "log_file_read").Str("source", f.Lister.ID()).Str("file", o.Name).Int64("size", o.Size).Dur("took", time.Since(start)).Msg("read log file")
	return nil
}
