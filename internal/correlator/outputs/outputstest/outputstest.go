// Package outputstest holds local stand-ins for the AWS services findings go to. Each
// decodes what aws-sdk-go-v2 really puts on the wire (signature, protocol headers,
// JSON body) and refuses anything else, so a test proves the SDK call is well formed.
package outputstest

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
)

// decode checks the SigV4 signature header and decodes the JSON body into v.
func decode(r *http.Request, v any) error {
	if !strings.HasPrefix(r.Header.Get("Authorization"), "AWS4-HMAC-SHA256 Credential=") {
		return fmt.Errorf("unsigned request: %q", r.Header.Get("Authorization"))
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		return err
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("body %.200s: %w", body, err)
	}
	return nil
}

// EventBridge serves PutEvents (AWS JSON 1.1, X-Amz-Target AWSEvents.PutEvents).
// With FailFirstEntry, the first entry of the first call is refused as throttled.
type EventBridge struct {
	FailFirstEntry bool

	mu      sync.Mutex
	calls   int
	entries []map[string]any
	bad     []string
}

// ServeHTTP implements http.Handler.
func (s *EventBridge) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.Method != http.MethodPost || r.Header.Get("X-Amz-Target") != "AWSEvents.PutEvents" ||
		r.Header.Get("Content-Type") != "application/x-amz-json-1.1" {
		s.refuse(w, fmt.Sprintf("unexpected request %s %s target %q type %q", r.Method, r.URL.Path, r.Header.Get("X-Amz-Target"), r.Header.Get("Content-Type")))
		return
	}
	var in struct{ Entries []map[string]any }
	if err := decode(r, &in); err != nil {
		s.refuse(w, err.Error())
		return
	}
	s.calls++
	type result struct {
		EventId      string `json:",omitempty"`
		ErrorCode    string `json:",omitempty"`
		ErrorMessage string `json:",omitempty"`
	}
	var out struct {
		FailedEntryCount int
		Entries          []result
	}
	for i, e := range in.Entries {
		if s.FailFirstEntry && s.calls == 1 && i == 0 {
			out.FailedEntryCount++
			out.Entries = append(out.Entries, result{ErrorCode: "ThrottlingException", ErrorMessage: "slow down"})
			continue
		}
		s.entries = append(s.entries, e)
		out.Entries = append(out.Entries, result{EventId: fmt.Sprintf("ev-%d", len(s.entries))})
	}
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	json.NewEncoder(w).Encode(out)
}

func (s *EventBridge) refuse(w http.ResponseWriter, why string) {
	s.bad = append(s.bad, why)
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	w.WriteHeader(http.StatusBadRequest)
	fmt.Fprintf(w, `{"__type":"ValidationException","message":%q}`, why)
}

// Calls is the number of well-formed PutEvents calls.
func (s *EventBridge) Calls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls
}

// Entries are the accepted entries, as the SDK sent them.
func (s *EventBridge) Entries() []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]map[string]any(nil), s.entries...)
}

// Refused are the reasons requests were refused.
func (s *EventBridge) Refused() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.bad...)
}

// SecurityHub serves BatchImportFindings (REST JSON, POST /findings/import). With
// FailFirstFinding, the first finding of the first call fails.
type SecurityHub struct {
	FailFirstFinding bool

	mu       sync.Mutex
	calls    int
	findings []map[string]any
	bad      []string
}

// ServeHTTP implements http.Handler.
func (s *SecurityHub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.Method != http.MethodPost || r.URL.Path != "/findings/import" {
		s.refuse(w, fmt.Sprintf("unexpected request %s %s", r.Method, r.URL.Path))
		return
	}
	var in struct{ Findings []map[string]any }
	if err := decode(r, &in); err != nil {
		s.refuse(w, err.Error())
		return
	}
	s.calls++
	type failed struct{ Id, ErrorCode, ErrorMessage string }
	out := struct {
		FailedCount, SuccessCount int
		FailedFindings            []failed
	}{FailedFindings: []failed{}}
	for i, f := range in.Findings {
		if s.FailFirstFinding && s.calls == 1 && i == 0 {
			id, _ := f["Id"].(string)
			out.FailedCount++
			out.FailedFindings = append(out.FailedFindings, failed{Id: id, ErrorCode: "InternalFailure", ErrorMessage: "try again"})
			continue
		}
		out.SuccessCount++
		s.findings = append(s.findings, f)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

func (s *SecurityHub) refuse(w http.ResponseWriter, why string) {
	s.bad = append(s.bad, why)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Amzn-ErrorType", "InvalidInputException")
	w.WriteHeader(http.StatusBadRequest)
	fmt.Fprintf(w, `{"Message":%q}`, why)
}

// Calls is the number of well-formed BatchImportFindings calls.
func (s *SecurityHub) Calls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls
}

// Findings are the imported findings, as the SDK sent them.
func (s *SecurityHub) Findings() []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]map[string]any(nil), s.findings...)
}

// Refused are the reasons requests were refused.
func (s *SecurityHub) Refused() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.bad...)
}
