// Package metricstest checks what the metrics sinks emit, the way their consumers would
// read it, for tests: a local stand-in for the CloudWatch API, an Embedded Metric Format
// validator and a Prometheus scraper.
//
// The CloudWatch stand-in decodes PutMetricData exactly as aws-sdk-go-v2's
// service/cloudwatch (v1.75.x) puts it on the wire: the Smithy RPC v2 CBOR protocol (POST /service/GraniteServiceVersion20100801/
// operation/PutMetricData, Content-Type application/cbor, gzip above the SDK's size
// threshold), not the old query protocol. Anything else is refused, so a protocol change
// in the SDK fails the tests instead of passing them by accident.
package metricstest

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/aws/smithy-go/encoding/cbor"
)

// PutMetricDataPath is where the SDK posts PutMetricData.
const PutMetricDataPath = "/service/GraniteServiceVersion20100801/operation/PutMetricData"

// Datum is one decoded data point.
type Datum struct {
	Namespace  string
	MetricName string
	Dimensions map[string]string
	Value      float64
	Unit       string
	Timestamp  time.Time
}

// Key names the datum's metric and dimensions: "MetricName{Dim=v,Dim2=w}".
func (d Datum) Key() string {
	names := make([]string, 0, len(d.Dimensions))
	for n := range d.Dimensions {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	b.WriteString(d.MetricName)
	b.WriteByte('{')
	for i, n := range names {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s=%s", n, d.Dimensions[n])
	}
	b.WriteByte('}')
	return b.String()
}

// Request is what one PutMetricData call carried besides the data.
type Request struct {
	Authorization   string
	ContentEncoding string
	BodyBytes       int // on the wire, before gunzip
	Datums          int
}

// Server records what it is sent. Its zero value is not ready: use NewCloudWatch.
type Server struct {
	mu       sync.Mutex
	datums   []Datum
	requests []Request
	failing  bool
	failed   int
	errs     []error
}

// New returns a server that accepts every valid request.
func NewCloudWatch() *Server { return &Server{} }

// SetFailing makes the server answer 500 (retryable) until called with false.
func (s *Server) SetFailing(f bool) {
	s.mu.Lock()
	s.failing = f
	s.mu.Unlock()
}

// Datums returns every data point received so far.
func (s *Server) Datums() []Datum {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Datum(nil), s.datums...)
}

// Requests returns every accepted request.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.requests...)
}

// Failed returns how many requests were answered with an error on purpose.
func (s *Server) Failed() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.failed
}

// Errors returns the protocol violations seen (requests the real service would refuse).
func (s *Server) Errors() []error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]error(nil), s.errs...)
}

// Sums adds up values by Key.
func (s *Server) Sums() map[string]float64 {
	out := map[string]float64{}
	for _, d := range s.Datums() {
		out[d.Key()] += d.Value
	}
	return out
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	failing := s.failing
	if failing {
		s.failed++
	}
	s.mu.Unlock()
	if failing {
		writeError(w, http.StatusInternalServerError, "InternalServiceError", "stand-in told to fail")
		return
	}
	req, datums, err := decode(r)
	if err != nil {
		s.mu.Lock()
		s.errs = append(s.errs, err)
		s.mu.Unlock()
		writeError(w, http.StatusBadRequest, "InvalidParameterValue", err.Error())
		return
	}
	s.mu.Lock()
	s.requests = append(s.requests, req)
	s.datums = append(s.datums, datums...)
	s.mu.Unlock()
	w.Header().Set("Smithy-Protocol", "rpc-v2-cbor")
	w.Header().Set("Content-Type", "application/cbor")
	w.Write(cbor.Encode(cbor.Map{})) // PutMetricDataOutput has no members
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Smithy-Protocol", "rpc-v2-cbor")
	w.Header().Set("Content-Type", "application/cbor")
	w.WriteHeader(status)
	w.Write(cbor.Encode(cbor.Map{"__type": cbor.String(code), "message": cbor.String(msg)}))
}

// decode checks the request the way the service would and returns its data points.
// Limits checked: 1000 data points, 1 MB body, 30 dimensions, names 1-255,
// dimension values 1-1024, finite values.
func decode(r *http.Request) (Request, []Datum, error) {
	req := Request{Authorization: r.Header.Get("Authorization"), ContentEncoding: r.Header.Get("Content-Encoding")}
	if r.Method != http.MethodPost || r.URL.Path != PutMetricDataPath {
		return req, nil, fmt.Errorf("unexpected %s %s", r.Method, r.URL.Path)
	}
	if got := r.Header.Get("Smithy-Protocol"); got != "rpc-v2-cbor" {
		return req, nil, fmt.Errorf("Smithy-Protocol %q", got)
	}
	if got := r.Header.Get("Content-Type"); got != "application/cbor" {
		return req, nil, fmt.Errorf("Content-Type %q", got)
	}
	if !strings.HasPrefix(req.Authorization, "AWS4-HMAC-SHA256 Credential=") {
		return req, nil, fmt.Errorf("request not signed with SigV4: Authorization %q", req.Authorization)
	}
	raw, err := io.ReadAll(io.LimitReader(r.Body, 2<<20))
	if err != nil {
		return req, nil, fmt.Errorf("read body: %w", err)
	}
	req.BodyBytes = len(raw)
	if len(raw) > 1<<20 {
		return req, nil, fmt.Errorf("body of %d bytes exceeds 1 MB", len(raw))
	}
	body := raw
	if req.ContentEncoding == "gzip" {
		zr, err := gzip.NewReader(bytes.NewReader(raw))
		if err != nil {
			return req, nil, fmt.Errorf("gunzip: %w", err)
		}
		if body, err = io.ReadAll(zr); err != nil {
			return req, nil, fmt.Errorf("gunzip: %w", err)
		}
	}
	v, err := cbor.Decode(body)
	if err != nil {
		return req, nil, fmt.Errorf("decode CBOR: %w", err)
	}
	in, ok := v.(cbor.Map)
	if !ok {
		return req, nil, fmt.Errorf("input is %T, not a map", v)
	}
	ns, err := str(in, "Namespace", 255)
	if err != nil {
		return req, nil, err
	}
	list, ok := in["MetricData"].(cbor.List)
	if !ok || len(list) == 0 || len(list) > 1000 {
		return req, nil, fmt.Errorf("MetricData must be a list of 1-1000, got %T of %d", in["MetricData"], len(list))
	}
	var out []Datum
	for i, item := range list {
		m, ok := item.(cbor.Map)
		if !ok {
			return req, nil, fmt.Errorf("MetricData[%d] is %T", i, item)
		}
		d := Datum{Namespace: ns, Dimensions: map[string]string{}}
		if d.MetricName, err = str(m, "MetricName", 255); err != nil {
			return req, nil, fmt.Errorf("MetricData[%d]: %w", i, err)
		}
		if u, ok := m["Unit"].(cbor.String); ok {
			d.Unit = string(u)
		}
		if d.Value, err = cbor.AsFloat64(m["Value"]); err != nil {
			return req, nil, fmt.Errorf("MetricData[%d].Value: %w", i, err)
		}
		if d.Timestamp, err = cbor.AsTime(m["Timestamp"]); err != nil {
			return req, nil, fmt.Errorf("MetricData[%d].Timestamp: %w", i, err)
		}
		dims, _ := m["Dimensions"].(cbor.List)
		if len(dims) > 30 {
			return req, nil, fmt.Errorf("MetricData[%d]: %d dimensions", i, len(dims))
		}
		for j, dv := range dims {
			dm, ok := dv.(cbor.Map)
			if !ok {
				return req, nil, fmt.Errorf("MetricData[%d].Dimensions[%d] is %T", i, j, dv)
			}
			name, err := str(dm, "Name", 255)
			if err != nil {
				return req, nil, err
			}
			val, err := str(dm, "Value", 1024)
			if err != nil {
				return req, nil, err
			}
			d.Dimensions[name] = val
		}
		out = append(out, d)
	}
	req.Datums = len(out)
	return req, out, nil
}

func str(m cbor.Map, key string, maxLen int) (string, error) {
	s, ok := m[key].(cbor.String)
	if !ok {
		return "", fmt.Errorf("%s missing or not a string (%T)", key, m[key])
	}
	if len(s) == 0 || len(s) > maxLen {
		return "", fmt.Errorf("%s must be 1-%d characters, got %d", key, maxLen, len(s))
	}
	return string(s), nil
}
