package outputs

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
)

// Webhook POSTs findings as JSON, one request per unsuppressed finding, retrying with
// jittered exponential backoff on network errors, 429 and 5xx answers.
type Webhook struct {
	URL     string
	Retries int
	Backoff time.Duration
	Client  *http.Client
	Log     zerolog.Logger
}

// Name implements Output.
func (w *Webhook) Name() string { return "webhook" }

// Deliver implements Output: every unsuppressed changed finding, one after another.
func (w *Webhook) Deliver(ctx context.Context, b *Batch) error {
	var errs []error
	for _, f := range b.Changed {
		if f.Suppressed {
			continue
		}
		if err := w.Send(ctx, f); err != nil {
			errs = append(errs, err)
			if ctx.Err() != nil {
				break
			}
		}
	}
	return errors.Join(errs...)
}

// Send delivers f, or returns the last error once the retries are spent.
func (w *Webhook) Send(ctx context.Context, f detector.Finding) error {
	body, err := json.Marshal(f)
	if err != nil {
		return fmt.Errorf("marshal finding: %w", err)
	}
	r := Retry{Retries: w.Retries, Backoff: w.Backoff}
	err = r.Do(ctx, func(ctx context.Context) error { return w.post(ctx, body) }, func(attempt int, err error) {
		w.Log.Warn().Str("event", "webhook_failed").Str("finding_id", f.ID).Int("attempt", attempt).Err(err).Msg("webhook delivery failed")
	})
	if err != nil {
		return fmt.Errorf("post finding %s: %w", f.ID, err)
	}
	return nil
}

func (w *Webhook) post(ctx context.Context, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.URL, bytes.NewReader(body))
	if err != nil {
		return permanent(fmt.Errorf("build request: %w", err))
	}
	req.Header.Set("Content-Type", "application/json")
	client := w.Client
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10)) // to reuse the connection
	resp.Body.Close()
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return nil
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		return fmt.Errorf("webhook answered %s", resp.Status)
	default:
		return permanent(fmt.Errorf("webhook refused: %s", resp.Status))
	}
}
