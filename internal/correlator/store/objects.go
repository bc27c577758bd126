package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Object is one log file whose records went into the shared detector state: an S3
// object, told apart from a later object under the same key by its ETag.
type Object struct {
	Bucket, Key, ETag string
}

// ObjectsReadRetention is how long an object stays recorded as read. SQS keeps a
// message at most 14 days, so no redelivery comes later than that.
const ObjectsReadRetention = 15 * 24 * time.Hour

// ObjectRead tells whether o's records are already in the shared state. It is the
// cheap check before an object is read; the turn checks again under its lock
// (RecordObjects), for a replica that read the object at the same time.
func (s *DB) ObjectRead(ctx context.Context, o Object) (bool, error) {
	var one int
	err := s.db.QueryRowContext(ctx, s.q(`SELECT 1 FROM objects_read WHERE bucket = ? AND object_key = ? AND etag = ?`), o.Bucket, o.Key, o.ETag).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("look up object read s3://%s/%s: %w", o.Bucket, o.Key, err)
	}
	return true, nil
}

// RecordObjects records objs as read in the turn, with the delta that holds their
// records, and returns those already recorded (by another turn: their records must
// not be appended again).
func (t *StateTurn) RecordObjects(ctx context.Context, objs []Object) ([]Object, error) {
	if len(objs) == 0 {
		return nil, nil
	}
	stmt, err := t.tx.PrepareContext(ctx, t.s.q(`INSERT INTO objects_read (bucket, object_key, etag, read_at) VALUES (?, ?, ?, ?)
		ON CONFLICT (bucket, object_key, etag) DO NOTHING`))
	if err != nil {
		return nil, fmt.Errorf("prepare object record: %w", err)
	}
	defer stmt.Close()
	now := nowNano()
	var already []Object
	seen := map[Object]bool{}
	for _, o := range objs {
		if seen[o] { // one object named twice in one cycle was read twice in it
			already = append(already, o)
			continue
		}
		seen[o] = true
		res, err := stmt.ExecContext(ctx, o.Bucket, o.Key, o.ETag, now)
		if err != nil {
			return nil, fmt.Errorf("record object read s3://%s/%s: %w", o.Bucket, o.Key, err)
		}
		if n, _ := res.RowsAffected(); n == 0 {
			already = append(already, o)
		}
	}
	return already, nil
}

// ForgetObjects drops the objects recorded before t.
func (t *StateTurn) ForgetObjects(ctx context.Context, before time.Time) error {
	if _, err := t.tx.ExecContext(ctx, t.s.q(`DELETE FROM objects_read WHERE read_at < ?`), before.UnixNano()); err != nil {
		return fmt.Errorf("forget objects read: %w", err)
	}
	return nil
}
