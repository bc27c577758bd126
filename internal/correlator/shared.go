package correlator

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/correlator/store"
	"github.com/imdsguard/imdsguard/internal/correlator/trailqueue"
)

// sharedState is the detector state that replicas on one queue share in PostgreSQL
// (on SQLite, the state of one process on a queue, kept the same way).
// Each replica reads its objects into a delta detector of its own (the expensive part,
// in parallel); then, in its turn at the database's lock, it merges the deltas the
// others appended since its last turn, appends and merges its own, judges, claims the
// findings and commits all of it together. Two replicas that read different parts of
// one finding's evidence therefore judge on all of it, and the one whose turn comes
// second publishes it, once.
type sharedState struct {
	db *store.DB
	// applied is the last delta merged into the detection's detector; -1 when the
	// detector must be built again from the base (at start, and after a turn that
	// failed midway left it holding a delta the database does not).
	applied int64
}

// compactEvery: a turn that finds this many deltas after the base writes its
// detector's snapshot as the new base, so a starting replica merges at most this many.
const compactEvery = 64

// sharedBody is what a base or a delta holds.
type sharedBody struct {
	Detector json.RawMessage `json:"detector"`
	Latest   time.Time       `json:"latest"`
}

func (d *detection) observer() *detector.Detector {
	if d.shared != nil {
		return d.delta
	}
	return d.det
}

// publishShared is publish for replicas sharing their state: see sharedState.
func (d *detection) publishShared(ctx context.Context, files int) error {
	sh := d.shared
	// What was read this cycle counts only if this turn commits: otherwise its
	// messages stay on the queue and are read again.
	delta, objs := d.delta, d.objects
	d.delta, d.objects = d.e.detector(""), nil
	turn, err := sh.db.TakeStateTurn(ctx)
	if err != nil {
		return err
	}
	defer turn.Rollback()
	applied := sh.applied
	sh.applied = -1 // until the commit
	base, err := turn.BaseSeq(ctx)
	if err != nil {
		return err
	}
	if applied < base {
		if applied, err = d.rebuild(ctx, turn); err != nil {
			return err
		}
	}
	deltas, err := turn.DeltasAfter(ctx, applied)
	if err != nil {
		return err
	}
	for _, dl := range deltas {
		if err := d.mergeBody(dl.Body); err != nil {
			return fmt.Errorf("shared state delta %d: %w", dl.Seq, err)
		}
		applied = dl.Seq
	}
	// Under the lock, so no other turn records the same object meanwhile: an object
	// that another replica counted while this one read it (its message came back after
	// the visibility timeout) must not count twice. The whole delta is dropped then,
	// and the messages come back to be read again without that object.
	already, err := turn.RecordObjects(ctx, storeObjects(objs))
	if err != nil {
		return err
	}
	if len(already) > 0 {
		for _, o := range already {
			d.e.log.Warn().Str("event", "object_already_read").Str("file", "s3://"+o.Bucket+"/"+o.Key).Str("etag", o.ETag).
				Msg("object counted by another replica while this one read it: this cycle is dropped and read again")
		}
		return fmt.Errorf("%d objects of this cycle were counted meanwhile", len(already))
	}
	if delta.Stats().Records > 0 {
		body, err := encodeShared(delta, d.deltaLatest)
		if err != nil {
			return err
		}
		if applied, err = turn.Append(ctx, body); err != nil {
			return err
		}
		d.det.Merge(delta)
		d.latest = maxTime(d.latest, d.deltaLatest)
	}
	all := d.det.Findings()
	changed, err := turn.Claim(ctx, all)
	if err != nil {
		return fmt.Errorf("claim findings: %w", err)
	}
	horizon := d.latest.Add(-2 * d.e.cfg.Window)
	d.det.Forget(horizon)
	if applied-base >= compactEvery {
		body, err := encodeShared(d.det, d.latest)
		if err != nil {
			return err
		}
		if err := turn.Compact(ctx, applied, body); err != nil {
			return err
		}
		if err := turn.ForgetObjects(ctx, time.Now().Add(-store.ObjectsReadRetention)); err != nil {
			return err
		}
	}
	if err := turn.Commit(); err != nil {
		return err
	}
	sh.applied = applied
	d.deltaLatest = time.Time{}
	d.out.Queue(changed, all, time.Now())
	if err := d.out.Forget(ctx, horizon.Add(-d.e.cfg.Window)); err != nil {
		return err
	}
	d.e.log.Info().Str("event", "detect_cycle").Int("files", files).Int("changed_findings", len(changed)).Int64("records", d.stats.Records).
		Int64("malformed", d.stats.Malformed).Int("groups", d.det.Stats().Groups).Int64("shared_seq", applied).Int("deltas_merged", len(deltas)).
		Msg("detection cycle")
	return nil
}

// counted is trailqueue.Consumer.Counted: whether the object's records are in the
// shared state.
func (sh *sharedState) counted(ctx context.Context, o trailqueue.Object) (bool, error) {
	return sh.db.ObjectRead(ctx, store.Object{Bucket: o.Bucket, Key: o.Key, ETag: o.ETag})
}

func storeObjects(objs []trailqueue.Object) []store.Object {
	out := make([]store.Object, len(objs))
	for i, o := range objs {
		out[i] = store.Object{Bucket: o.Bucket, Key: o.Key, ETag: o.ETag}
	}
	return out
}

// rebuild replaces the detector's state with the shared base and returns the base's seq.
func (d *detection) rebuild(ctx context.Context, turn *store.StateTurn) (int64, error) {
	seq, body, err := turn.Base(ctx)
	if err != nil {
		return 0, err
	}
	if len(body) == 0 { // no compaction yet: the deltas are all there is
		if body, err = encodeShared(d.e.detector(""), time.Time{}); err != nil {
			return 0, err
		}
	}
	var sb sharedBody
	if err := json.Unmarshal(body, &sb); err != nil {
		return 0, fmt.Errorf("decode shared state base: %w", err)
	}
	if err := d.det.Restore(bytes.NewReader(sb.Detector)); err != nil {
		return 0, fmt.Errorf("shared state base: %w", err)
	}
	d.latest = sb.Latest
	return seq, nil
}

func (d *detection) mergeBody(body []byte) error {
	var sb sharedBody
	if err := json.Unmarshal(body, &sb); err != nil {
		return fmt.Errorf("decode: %w", err)
	}
	other := d.e.detector("")
	if err := other.Restore(bytes.NewReader(sb.Detector)); err != nil {
		return err
	}
	d.det.Merge(other)
	d.latest = maxTime(d.latest, sb.Latest)
	return nil
}

func encodeShared(det *detector.Detector, latest time.Time) ([]byte, error) {
	var snap bytes.Buffer
	if err := det.Snapshot(&snap); err != nil {
		return nil, err
	}
	body, err := json.Marshal(sharedBody{Detector: snap.Bytes(), Latest: latest})
	if err != nil {
		return nil, fmt.Errorf("encode shared state: %w", err)
	}
	return body, nil
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
