package outputs

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/retry"
)

// Webhook POSTs findings as JSON, one request per finding, retrying with exponential
// backoff on network errors, 429 and 5xx answers.
type Webhook struct {
	URL     string
	Retries int
	Backoff time.Duration
	Client  *http.Client
	Log     zerolog.Logger
}

// Send delivers f, or returns the last error once the retries are spent.
func (w *Webhook) Send(ctx context.Context, f detector.Finding) error {
	body, err := json.Marshal(f)
	if err != nil {
		return fmt.Errorf("marshal finding: %w", err)
	}
	backoff := retry.Backoff{Min: w.Backoff, Max: 32 * w.Backoff}
	var last error
	for attempt := 0; attempt <= w.Retries; attempt++ {
		if attempt > 0 {
			if err := retry.Sleep(ctx, backoff.Next()); err != nil {
				return fmt.Errorf("post finding %s: %w (last: %v)", f.ID, err, last)
			}
		}
		again, err := w.post(ctx, body)
		if err == nil {
			return nil
		}
		last = err
		w.Log.Warn().Str("event", "webhook_failed").Str("finding_id", f.ID).Int("attempt", attempt+1).Err(err).Msg("webhook delivery failed")
		if !again {
			break
		}
	}
	return fmt.Errorf("post finding %s: %w", f.ID, last)
}

func (w *Webhook) post(ctx context.Context, body []byte) (retry bool, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.URL, bytes.NewReader(body))
	if err != nil {
		return false, fmt.Errorf("build request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	client := w.Client
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return true, err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return false, nil
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		return true, fmt.Errorf("webhook answered %s", resp.Status)
	default:
		return false, fmt.Errorf("webhook refused: %s", resp.Status)
	}
}
