package outputs

import "github.com/imdsguard/imdsguard/internal/retry"

// Retry is how an output retries one request (internal/retry's policy: capped,
// jittered backoff; a permanent error stops it).
type Retry = retry.Policy

// permanent marks an error another attempt cannot fix (a 4xx answer).
func permanent(err error) error { return retry.Permanent(err) }
