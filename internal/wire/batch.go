package wire

// BatchPath is where the correlator's intake takes batches (POST, application/json).
const BatchPath = "/v1/fingerprints"

// Limits of a batch: larger bodies get 413, longer or empty batches 400.
const (
	MaxBatchBytes = 4 << 20
	MaxBatch      = 500
)

// Batch is the body of POST /v1/fingerprints.
type Batch struct {
	// Document is the instance identity document exactly as IMDS returned it from
	// /latest/dynamic/instance-identity/document.
	Document string `json:"document"`
	// PKCS7 is the body of /latest/dynamic/instance-identity/pkcs7 exactly as IMDS
	// returned it (base64 of a PKCS#7 SignedData, newlines allowed). Document and PKCS7
	// may be empty for a sender with a verified mTLS client certificate.
	PKCS7 string `json:"pkcs7"`
	// BatchID is the sender's id of the batch, for logs.
	BatchID      string        `json:"batch_id"`
	Fingerprints []Fingerprint `json:"fingerprints"`
}

// BatchResult is the body of a 200 answer: every fingerprint of the batch was stored
// (Accepted) or already there (Duplicates). Other answers are {"error": "..."}: 400
// malformed or unknown fields or bad batch, 401 signature, 403 account or instance,
// 413 too large; 5xx means nothing was stored, send again.
type BatchResult struct {
	Accepted   int `json:"accepted"`
	Duplicates int `json:"duplicates"`
}
