// Package containercreds is a pair of test stand-ins for the endpoints that hand
// credentials to containers: the ECS agent's task credential endpoint
// (169.254.170.2, AWS_CONTAINER_CREDENTIALS_RELATIVE_URI) and the EKS Pod Identity agent
// (169.254.170.23 and [fd00:ec2::23], AWS_CONTAINER_CREDENTIALS_FULL_URI with an
// Authorization token). Each answers as the real one does, on success and on error, so
// that the broker and real SDK clients can be tested against them without AWS:
//
//   - ECS (amazon-ecs-agent's credentials handler): GET /v2/credentials/<id> → 200
//     {"RoleArn","AccessKeyId","SecretAccessKey","Token","Expiration"}; the older
//     /v1/credentials?id=<id> likewise; no id → 400 {"code":"NoIdInRequest",...}; an id
//     it never issued → 400 {"code":"InvalidIdInRequest","message":"CredentialsV2Request:
//     Credentials not found"}. It also serves task metadata at /v2/metadata.
//   - Pod Identity (eks-pod-identity-agent): GET /v1/credentials → 200
//     {"AccessKeyId","SecretAccessKey","Token","AccountId","Expiration"}; no token → 400
//     "Service account token cannot be empty"; a token that is no JWT → 400 "Service
//     account token cannot be parsed"; a JWT it does not know → 403 (what EKS Auth's
//     AccessDeniedException becomes); called through another address (the Host field) →
//     400 "Access Denied. Called agent through invalid address".
package containercreds

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

// Creds is one set of temporary credentials an endpoint hands out.
type Creds struct {
	RoleArn         string // ECS only
	AccountID       string // Pod Identity only
	AccessKeyID     string
	SecretAccessKey string
	Token           string
	Expiration      time.Time
}

// Seen is one request a stand-in answered.
type Seen struct {
	Path          string
	Authorization string // the Authorization field, as received
	Status        int
}

type log struct {
	mu   sync.Mutex
	seen []Seen
}

func (l *log) add(s Seen) {
	l.mu.Lock()
	l.seen = append(l.seen, s)
	l.mu.Unlock()
}

// Seen returns the requests answered so far.
func (l *log) Seen() []Seen {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Seen(nil), l.seen...)
}

// ECS stands in for the ECS agent's task credential endpoint.
type ECS struct {
	log
	mu    sync.Mutex
	creds map[string]Creds // by credentials id
	// TaskARN is what /v2/metadata names.
	TaskARN string
}

// NewECS returns an ECS stand-in with no credentials.
func NewECS() *ECS {
	return &ECS{creds: map[string]Creds{}, TaskARN: "arn:aws:ecs:us-east-1:123456789012:task/default/0123456789abcdef"}
}

// Add hands c out under credentials id id.
func (e *ECS) Add(id string, c Creds) {
	e.mu.Lock()
	e.creds[id] = c
	e.mu.Unlock()
}

// ecsError is the ECS agent's error body.
type ecsError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *ECS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	status := e.serve(w, r)
	e.add(Seen{Path: r.URL.Path, Authorization: r.Header.Get("Authorization"), Status: status})
}

func (e *ECS) serve(w http.ResponseWriter, r *http.Request) int {
	var id, prefix string
	switch {
	case r.URL.Path == "/v2/metadata" || r.URL.Path == "/v2/metadata/":
		return writeJSON(w, http.StatusOK, map[string]string{"Cluster": "default", "TaskARN": e.TaskARN})
	case strings.HasPrefix(r.URL.Path, "/v2/credentials"):
		prefix = "CredentialsV2Request"
		id = strings.TrimPrefix(strings.TrimPrefix(r.URL.Path, "/v2/credentials"), "/")
	case r.URL.Path == "/v1/credentials":
		prefix = "CredentialsV1Request"
		id = r.URL.Query().Get("id")
	default:
		http.NotFound(w, r)
		return http.StatusNotFound
	}
	if id == "" {
		return writeJSON(w, http.StatusBadRequest, ecsError{"NoIdInRequest", prefix + ": No ID in the request"})
	}
	e.mu.Lock()
	c, ok := e.creds[id]
	e.mu.Unlock()
	if !ok {
		return writeJSON(w, http.StatusBadRequest, ecsError{"InvalidIdInRequest", prefix + ": Credentials not found"})
	}
	return writeJSON(w, http.StatusOK, struct {
		RoleArn         string
		AccessKeyID     string `json:"AccessKeyId"`
		SecretAccessKey string
		Token           string
		Expiration      string
	}{c.RoleArn, c.AccessKeyID, c.SecretAccessKey, c.Token, c.Expiration.UTC().Format(time.RFC3339)})
}

// PodIdentity stands in for the EKS Pod Identity agent.
type PodIdentity struct {
	log
	mu    sync.Mutex
	creds map[string]Creds // by service account token
	// Hosts are the Host fields the agent answers on (it refuses to be reached through
	// any other address); nil accepts any, for tests whose clients reach it through a
	// loopback port.
	Hosts []string
}

// NewPodIdentity returns a Pod Identity stand-in that answers on its real addresses.
func NewPodIdentity() *PodIdentity {
	return &PodIdentity{creds: map[string]Creds{},
		Hosts: []string{"169.254.170.23", "169.254.170.23:80", "[fd00:ec2::23]", "[fd00:ec2::23]:80"}}
}

// Add hands c out to the bearer of the service account token token (a JWT: three
// dot-separated parts).
func (p *PodIdentity) Add(token string, c Creds) {
	p.mu.Lock()
	p.creds[token] = c
	p.mu.Unlock()
}

func (p *PodIdentity) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	status := p.serve(w, r)
	p.add(Seen{Path: r.URL.Path, Authorization: r.Header.Get("Authorization"), Status: status})
}

func (p *PodIdentity) serve(w http.ResponseWriter, r *http.Request) int {
	if r.URL.Path != "/v1/credentials" {
		http.NotFound(w, r)
		return http.StatusNotFound
	}
	if p.Hosts != nil && !slices.Contains(p.Hosts, r.Host) {
		return text(w, http.StatusBadRequest, fmt.Sprintf("Access Denied. Called agent through invalid address, please use either 169.254.170.23 or [fd00:ec2::23] address not %s", r.Host))
	}
	token := strings.TrimSpace(r.Header.Get("Authorization"))
	if token == "" {
		return text(w, http.StatusBadRequest, "Service account token cannot be empty")
	}
	if strings.Count(token, ".") != 2 {
		return text(w, http.StatusBadRequest, "Service account token cannot be parsed: token contains an invalid number of segments")
	}
	p.mu.Lock()
	c, ok := p.creds[token]
	p.mu.Unlock()
	if !ok {
		return text(w, http.StatusForbidden, "Access Denied: the service account token is not valid for this cluster")
	}
	return writeJSON(w, http.StatusOK, struct {
		AccessKeyID     string `json:"AccessKeyId"`
		SecretAccessKey string
		Token           string
		AccountID       string `json:"AccountId"`
		Expiration      string
	}{c.AccessKeyID, c.SecretAccessKey, c.Token, c.AccountID, c.Expiration.UTC().Format(time.RFC3339)})
}

func writeJSON(w http.ResponseWriter, status int, v any) int {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
	return status
}

// text answers as the Pod Identity agent's http.Error does.
func text(w http.ResponseWriter, status int, msg string) int {
	http.Error(w, msg, status)
	return status
}
