// Package intake is the correlator's fingerprint intake: the HTTPS API that agents post
// batches of fingerprints to, the checks that tie each batch to a verified EC2 instance
// (its signed identity document) or to an mTLS client certificate, and the store the
// accepted fingerprints go to, which the detector reads.
package intake

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/fpstore"
	"github.com/imdsguard/imdsguard/internal/correlator/iddoc"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// Limits of the wire contract (see wire.Batch).
const (
	MaxBodyBytes = wire.MaxBatchBytes
	MaxBatch     = wire.MaxBatch
)

// Batch and Result are the request and answer of POST /v1/fingerprints.
type (
	Batch  = wire.Batch
	Result = wire.BatchResult
)

// Options configure a Handler.
type Options struct {
	Store Store
	// AWSCertificates are the certificates AWS signs identity documents with.
	AWSCertificates []*x509.Certificate
	// AllowedAccounts are the accounts whose instances may send; none means no
	// instance may (mTLS senders only).
	AllowedAccounts []string
	Log             zerolog.Logger
}

// Refusal reasons, as counted in /metrics and logged.
const (
	reasonMalformed       = "malformed"
	reasonTooLarge        = "too_large"
	reasonBadBatch        = "bad_batch"
	reasonUnauthenticated = "unauthenticated"
	reasonBadSignature    = "bad_signature"
	reasonAccount         = "account_not_allowed"
	reasonInstance        = "instance_mismatch"
	reasonStore           = "store_error"
	reasonMethod          = "bad_method"
)

var reasons = []string{reasonMalformed, reasonTooLarge, reasonBadBatch, reasonUnauthenticated, reasonBadSignature, reasonAccount, reasonInstance, reasonStore, reasonMethod}

// Handler serves the intake API: POST /v1/fingerprints, GET /healthz, GET /metrics.
type Handler struct {
	opt Options
	mux *http.ServeMux

	batches    atomic.Int64
	accepted   atomic.Int64
	duplicates atomic.Int64
	refused    map[string]*atomic.Int64

	// verified remembers documents whose signature verified: an agent sends the same
	// document and pkcs7 with every batch, and a DSA verification costs ~0.2 ms.
	verifiedMu sync.Mutex
	verified   map[[sha256.Size]byte]iddoc.Document
}

// maxVerified bounds the verified-document cache; it is emptied when full.
const maxVerified = 10000

// NewHandler returns the intake's HTTP handler.
func NewHandler(opt Options) *Handler {
	h := &Handler{opt: opt, mux: http.NewServeMux(), refused: map[string]*atomic.Int64{}, verified: map[[sha256.Size]byte]iddoc.Document{}}
	for _, r := range reasons {
		h.refused[r] = new(atomic.Int64)
	}
	h.mux.HandleFunc(wire.BatchPath, h.fingerprints)
	h.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = io.WriteString(w, "ok\n")
	})
	h.mux.Handle("GET /metrics", h.newMetricsHandler())
	return h
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

// Counts are the intake's counters.
type Counts struct {
	Batches, Accepted, Duplicates int64
	Refused                       map[string]int64
}

// Counts returns the counters so far.
func (h *Handler) Counts() Counts {
	c := Counts{Batches: h.batches.Load(), Accepted: h.accepted.Load(), Duplicates: h.duplicates.Load(), Refused: map[string]int64{}}
	for r, n := range h.refused {
		c.Refused[r] = n.Load()
	}
	return c
}

// refusal is a 4xx/5xx answer with its reason.
type refusal struct {
	status int
	reason string
	msg    string
}

func refuse(status int, reason, format string, args ...any) *refusal {
	return &refusal{status: status, reason: reason, msg: fmt.Sprintf(format, args...)}
}

func (h *Handler) fingerprints(w http.ResponseWriter, r *http.Request) {
	var b Batch
	res, sender, ref := h.accept(w, r, &b)
	log := h.opt.Log.With().Str("remote", r.RemoteAddr).Str("batch_id", b.BatchID).Logger()
	if ref != nil {
		h.refused[ref.reason].Add(1)
		ev := log.Warn()
		if ref.status >= 500 {
			ev = log.Error()
		}
		ev.Str("event", "intake_refused").Str("reason", ref.reason).Int("status", ref.status).Str("sender", sender).Str("error", ref.msg).Msg("batch refused")
		if ref.status == http.StatusMethodNotAllowed {
			w.Header().Set("Allow", http.MethodPost)
		}
		writeJSON(w, ref.status, map[string]string{"error": ref.msg})
		return
	}
	h.batches.Add(1)
	h.accepted.Add(int64(res.Accepted))
	h.duplicates.Add(int64(res.Duplicates))
	log.Info().Str("event", "intake_batch").Str("sender", sender).Int("accepted", res.Accepted).Int("duplicates", res.Duplicates).Msg("batch stored")
	writeJSON(w, http.StatusOK, res)
}

// accept checks a batch in full and then stores it; nothing is stored unless every
// check passed.
func (h *Handler) accept(w http.ResponseWriter, r *http.Request, b *Batch) (Result, string, *refusal) {
	if r.Method != http.MethodPost {
		return Result{}, "", refuse(http.StatusMethodNotAllowed, reasonMethod, "use POST")
	}
	if ct := r.Header.Get("Content-Type"); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			return Result{}, "", refuse(http.StatusUnsupportedMediaType, reasonMalformed, "content type must be application/json, got %q", ct)
		}
	}
	if r.ContentLength > MaxBodyBytes {
		return Result{}, "", refuse(http.StatusRequestEntityTooLarge, reasonTooLarge, "body of %d bytes is larger than %d", r.ContentLength, MaxBodyBytes)
	}
	raws, ref := decode(http.MaxBytesReader(w, r.Body, MaxBodyBytes), r.ContentLength, b)
	if ref != nil {
		return Result{}, "", ref
	}
	if n := len(b.Fingerprints); n == 0 || n > MaxBatch {
		return Result{}, "", refuse(http.StatusBadRequest, reasonBadBatch, "a batch holds 1 to %d fingerprints, got %d", MaxBatch, n)
	}
	for i, fp := range b.Fingerprints {
		if fp.ID == "" || fp.AccessKeyID == "" {
			return Result{}, "", refuse(http.StatusBadRequest, reasonBadBatch, "fingerprints[%d]: id and access_key_id are required", i)
		}
	}
	sender, ref := h.authenticate(r, b)
	if ref != nil {
		return Result{}, sender, ref
	}
	var added, dups int
	var err error
	if rp, ok := h.opt.Store.(RawStore); ok {
		added, dups, err = rp.PutRaw(r.Context(), b.Fingerprints, raws, sender)
	} else {
		added, dups, err = h.opt.Store.Put(r.Context(), b.Fingerprints, sender)
	}
	if err != nil {
		return Result{}, sender, refuse(http.StatusInternalServerError, reasonStore, "storing the batch failed; nothing was stored, send it again")
	}
	return Result{Accepted: added, Duplicates: dups}, sender, nil
}

// decode reads one batch strictly into b and returns each fingerprint's bytes as
// sent: the store keeps them instead of encoding the fingerprints again.
// size is the body's announced length (-1 when unknown), to read it in one buffer.
func decode(body io.Reader, size int64, b *Batch) ([][]byte, *refusal) {
	buf := bytes.NewBuffer(make([]byte, 0, min(max(size, 0), MaxBodyBytes)+bytes.MinRead))
	_, err := buf.ReadFrom(body)
	data := buf.Bytes()
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			return nil, refuse(http.StatusRequestEntityTooLarge, reasonTooLarge, "body is larger than %d bytes", MaxBodyBytes)
		}
		return nil, refuse(http.StatusBadRequest, reasonMalformed, "read batch: %v", err)
	}
	batch, raws, err := decodeBatch(data)
	if err != nil {
		return nil, refuse(http.StatusBadRequest, reasonMalformed, "decode batch: %v", err)
	}
	*b = batch
	return raws, nil
}

// authenticate ties the batch to a sender: a verified identity document, or a client
// certificate the TLS layer verified against intake.client_ca when the batch has no
// document or the intake checks none (no aws_certificates: an mTLS-only intake, where
// a document could never verify).
func (h *Handler) authenticate(r *http.Request, b *Batch) (string, *refusal) {
	var subject string
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 && len(r.TLS.VerifiedChains[0]) > 0 {
		subject = r.TLS.VerifiedChains[0][0].Subject.String()
	}
	if b.Document == "" || (len(h.opt.AWSCertificates) == 0 && subject != "") {
		if subject != "" {
			// mTLS senders need not be EC2 instances: their fingerprints' instance is
			// theirs to state, and the certificate subject is recorded with them.
			return "mtls:" + subject, nil
		}
		return "", refuse(http.StatusUnauthorized, reasonUnauthenticated, "no identity document and no verified client certificate")
	}
	doc, err := h.verify(b.Document, b.PKCS7)
	if errors.Is(err, iddoc.ErrSignature) {
		return "", refuse(http.StatusUnauthorized, reasonBadSignature, "identity document: %v", err)
	}
	if err != nil {
		return "", refuse(http.StatusBadRequest, reasonMalformed, "identity document: %v", err)
	}
	sender := "instance:" + doc.AccountID + "/" + doc.InstanceID
	if !slices.Contains(h.opt.AllowedAccounts, doc.AccountID) {
		return sender, refuse(http.StatusForbidden, reasonAccount, "account %s is not an allowed account", doc.AccountID)
	}
	for i, fp := range b.Fingerprints {
		if fp.Instance.ID != doc.InstanceID || fp.Instance.AccountID != doc.AccountID {
			return sender, refuse(http.StatusForbidden, reasonInstance, "fingerprints[%d]: instance %q of account %q is not the document's %s of %s",
				i, fp.Instance.ID, fp.Instance.AccountID, doc.InstanceID, doc.AccountID)
		}
	}
	return sender, nil
}

// verify is iddoc.Verify with a cache of the pairs that verified. The answer
// depends only on the two strings and the handler's fixed certificates.
func (h *Handler) verify(document, p7 string) (iddoc.Document, error) {
	sum := sha256.New()
	fmt.Fprintf(sum, "%d\n", len(document))
	_, _ = io.WriteString(sum, document) // a hash never fails to write
	_, _ = io.WriteString(sum, p7)
	var key [sha256.Size]byte
	sum.Sum(key[:0])
	h.verifiedMu.Lock()
	doc, ok := h.verified[key]
	h.verifiedMu.Unlock()
	if ok {
		return doc, nil
	}
	doc, err := iddoc.Verify([]byte(document), p7, h.opt.AWSCertificates)
	if err != nil {
		return doc, err
	}
	h.verifiedMu.Lock()
	if len(h.verified) >= maxVerified {
		clear(h.verified)
	}
	h.verified[key] = doc
	h.verifiedMu.Unlock()
	return doc, nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	var buf bytes.Buffer
	_ = json.NewEncoder(&buf).Encode(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", fmt.Sprint(buf.Len()))
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}

// newMetricsHandler exposes the counters with client_golang, from a registry of the
// handler's own (never the global one: two intakes in one process must not collide).
func (h *Handler) newMetricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	counter := func(name, help string, v func() int64, labels prometheus.Labels) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: labels},
			func() float64 { return float64(v()) })
	}
	reg.MustRegister(
		counter("imdsguard_intake_batches_accepted_total", "Batches stored (every fingerprint stored or already there).", h.batches.Load, nil),
		counter("imdsguard_intake_fingerprints_accepted_total", "Fingerprints stored for the first time.", h.accepted.Load, nil),
		counter("imdsguard_intake_fingerprints_duplicate_total", "Fingerprints received again (already stored, by id).", h.duplicates.Load, nil),
	)
	for _, r := range reasons {
		reg.MustRegister(counter("imdsguard_intake_batches_refused_total", "Batches refused, by reason; nothing of them was stored.",
			h.refused[r].Load, prometheus.Labels{"reason": r}))
	}
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}

// compile-time check that the SQLite store is what the detector reads.
var _ fpstore.Store = (*SQLite)(nil)
