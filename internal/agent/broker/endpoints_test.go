package broker

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials/endpointcreds"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/testing/containercreds"
)

// Secrets the stand-ins hand out; none may appear in a record (but its Body, which the
// agent drops after fingerprinting) or in the broker's log.
const (
	ecsID        = "3b0a7c1e-5d1f-4f4e-9a7b-credsidtaskA"
	otherID      = "9c2e4f6a-1b3d-4c5e-8f7a-credsidtaskB"
	podToken     = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwb2QifQ.c2lnbmF0dXJlUE9EVE9LRU4"
	ecsSecret    = "ECSSECRETACCESSKEY"
	ecsSession   = "ECSSESSIONTOKEN"
	podSecret    = "PODSECRETACCESSKEY"
	podSession   = "PODSESSIONTOKEN"
	taskA, taskB = "arn:aws:ecs:us-east-1:123456789012:task/default/aaaa", "arn:aws:ecs:us-east-1:123456789012:task/default/bbbb"
)

type endpointsBed struct {
	*bed
	ecs     *containercreds.ECS
	pod     *containercreds.PodIdentity
	ecsAddr netip.AddrPort
	podAddr netip.AddrPort
	log     *syncBuf
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// dstRedirects vouches for every connection as one to dst, made by a process that a
// rule requires IMDSv2 of (which must not matter for these endpoints).
type dstRedirects struct{ dst netip.AddrPort }

func (d *dstRedirects) LookupRedirect(client, server netip.AddrPort) (hook.Redirect, error) {
	return hook.Redirect{PID: 7, UID: 1000, SocketCookie: 99, V2Required: true, Dst: d.dst}, nil
}

// startEndpoints starts both stand-ins and a broker that knows them as the ECS and Pod
// Identity endpoints; every connection to the broker is recorded as one to which.
func startEndpoints(t *testing.T, enforce bool, which string) *endpointsBed {
	t.Helper()
	exp := time.Now().Add(time.Hour)
	e := &endpointsBed{ecs: containercreds.NewECS(), pod: containercreds.NewPodIdentity(), log: &syncBuf{}}
	e.ecs.Add(ecsID, containercreds.Creds{RoleArn: "arn:aws:iam::123456789012:role/task-a", AccessKeyID: "ASIAECSTASKA",
		SecretAccessKey: ecsSecret, Token: ecsSession, Expiration: exp})
	e.ecs.Add(otherID, containercreds.Creds{RoleArn: "arn:aws:iam::123456789012:role/task-b", AccessKeyID: "ASIAECSTASKB",
		SecretAccessKey: ecsSecret, Token: ecsSession, Expiration: exp})
	e.pod.Hosts = nil // reached through the broker's loopback port
	e.pod.Add(podToken, containercreds.Creds{AccountID: "123456789012", AccessKeyID: "ASIAPODID",
		SecretAccessKey: podSecret, Token: podSession, Expiration: exp})
	ecsSrv, podSrv := httptest.NewServer(e.ecs), httptest.NewServer(e.pod)
	t.Cleanup(ecsSrv.Close)
	t.Cleanup(podSrv.Close)
	e.ecsAddr = netip.MustParseAddrPort(ecsSrv.Listener.Addr().String())
	e.podAddr = netip.MustParseAddrPort(podSrv.Listener.Addr().String())
	dst := e.ecsAddr
	if which == "pod" {
		dst = e.podAddr
	}
	e.bed = startWith(t, enforce, &dstRedirects{dst: dst}, func(c *Config) {
		c.Endpoints = []Endpoint{
			{Kind: EndpointECS, Addrs: []netip.Addr{e.ecsAddr.Addr()}, Port: int(e.ecsAddr.Port())},
			{Kind: EndpointPodIdentity, Addrs: []netip.Addr{e.podAddr.Addr()}, Port: int(e.podAddr.Port())},
		}
		c.CredentialsOwner = func(conn hook.Redirect, id string) (string, bool) {
			switch id {
			case ecsID:
				return taskA, false // the requester's own task
			case otherID:
				return taskB, true
			}
			return "", false
		}
	}, zerolog.New(e.log))
	return e
}

// checkNoSecrets fails when a secret shows in a record (its Body aside) or the log.
func (e *endpointsBed) checkNoSecrets(t *testing.T, recs []Request) {
	t.Helper()
	var dump strings.Builder
	for _, r := range recs {
		r.Body = nil
		fmt.Fprintf(&dump, "%+v\n", r)
	}
	dump.WriteString(e.log.String())
	for _, s := range []string{ecsID, otherID, podToken, ecsSecret, ecsSession, podSecret, podSession, "credsidtask", "PODTOKEN"} {
		if strings.Contains(dump.String(), s) {
			t.Fatalf("a secret (%s) is recorded or logged:\n%s", s, dump.String())
		}
	}
}

func TestECSCredentialsCapturedIdRedacted(t *testing.T) {
	e := startEndpoints(t, true, "ecs")
	c := &http.Client{}
	st, body := do(t, c, "GET", e.url+"/v2/credentials/"+ecsID, nil)
	if st != 200 || !strings.Contains(body, `"AccessKeyId":"ASIAECSTASKA"`) || !strings.Contains(body, `"RoleArn":"arn:aws:iam::123456789012:role/task-a"`) {
		t.Fatalf("credentials through the broker: %d %s", st, body)
	}
	st, body = do(t, c, "GET", e.url+"/v1/credentials?id="+ecsID, nil)
	if st != 200 || !strings.Contains(body, "ASIAECSTASKA") {
		t.Fatalf("v1 credentials: %d %s", st, body)
	}
	st, body = do(t, c, "GET", e.url+"/v2/metadata", nil)
	if st != 200 || !strings.Contains(body, "TaskARN") {
		t.Fatalf("task metadata: %d %s", st, body)
	}
	st, body = do(t, c, "GET", e.url+"/v2/credentials/unknown-id", nil)
	if st != 400 || !strings.Contains(body, `"code":"InvalidIdInRequest"`) {
		t.Fatalf("an unknown id gets the ECS agent's own answer, got %d %s", st, body)
	}
	recs := e.recorded(4)
	if len(recs) != 4 {
		t.Fatalf("recorded %d requests", len(recs))
	}
	for i, r := range recs {
		if r.Endpoint != EndpointECS || r.Version != "" || r.Refused != "" || r.WouldRefuse != "" || r.ForeignTask != "" {
			t.Errorf("request %d recorded as %+v", i, r)
		}
	}
	if recs[0].Path != "/v2/credentials/REDACTED" || recs[1].Path != "/v1/credentials" || recs[2].Path != "/v2/metadata" {
		t.Errorf("paths %q %q %q", recs[0].Path, recs[1].Path, recs[2].Path)
	}
	if !bytes.Contains(recs[0].Body, []byte("ASIAECSTASKA")) || !bytes.Contains(recs[1].Body, []byte("ASIAECSTASKA")) ||
		recs[2].Body != nil || recs[3].Body != nil {
		t.Errorf("captured bodies: credential answers only")
	}
	if len(e.imds.requests()) != 0 {
		t.Error("an ECS request reached IMDS")
	}
	e.checkNoSecrets(t, recs)
}

func TestECSForeignTaskCredentials(t *testing.T) {
	for _, enforce := range []bool{true, false} {
		t.Run(fmt.Sprintf("enforce=%v", enforce), func(t *testing.T) {
			e := startEndpoints(t, enforce, "ecs")
			st, body := do(t, &http.Client{}, "GET", e.url+"/v2/credentials/"+otherID, nil)
			recs := e.recorded(1)
			if len(recs) != 1 || recs[0].ForeignTask != taskB {
				t.Fatalf("recorded %+v", recs)
			}
			if enforce {
				if st != 403 || !strings.Contains(body, `"code":"AccessDenied"`) || strings.Contains(body, "ASIA") ||
					recs[0].Refused != RefusedForeignTask || len(e.ecs.Seen()) != 0 || recs[0].Body != nil {
					t.Fatalf("enforce: %d %s, %+v, endpoint saw %d", st, body, recs[0], len(e.ecs.Seen()))
				}
			} else if st != 200 || recs[0].WouldRefuse != RefusedForeignTask || recs[0].Refused != "" || recs[0].Body == nil {
				t.Fatalf("audit: %d, %+v", st, recs[0])
			}
			e.checkNoSecrets(t, recs)
		})
	}
}

func TestPodIdentityCredentials(t *testing.T) {
	e := startEndpoints(t, true, "pod")
	c := &http.Client{}
	st, body := do(t, c, "GET", e.url+"/v1/credentials", map[string]string{"Authorization": podToken})
	if st != 200 || !strings.Contains(body, `"AccountId":"123456789012"`) {
		t.Fatalf("credentials: %d %s", st, body)
	}
	st, body = do(t, c, "GET", e.url+"/v1/credentials", nil)
	if st != 400 || body != "Service account token cannot be empty\n" {
		t.Fatalf("no token: the agent's own answer passes through, got %d %q", st, body)
	}
	st, body = do(t, c, "GET", e.url+"/v1/credentials", map[string]string{"Authorization": "not-a-jwt"})
	if st != 400 || !strings.HasPrefix(body, "Service account token cannot be parsed") {
		t.Fatalf("bad token: %d %q", st, body)
	}
	st, _ = do(t, c, "GET", e.url+"/v1/credentials", map[string]string{"Authorization": "a.b.c"})
	if st != 403 {
		t.Fatalf("unknown token: %d", st)
	}
	recs := e.recorded(4)
	if len(recs) != 4 || recs[0].Endpoint != EndpointPodIdentity || recs[0].Body == nil || recs[0].Path != "/v1/credentials" {
		t.Fatalf("recorded %+v", recs)
	}
	for i, r := range recs[1:] {
		if r.Body != nil || r.Refused != "" || r.Status == 200 {
			t.Errorf("refused fetch %d recorded %+v", i+1, r)
		}
	}
	if seen := e.pod.Seen(); len(seen) != 4 || seen[0].Authorization != podToken {
		t.Fatalf("the token must reach the agent as sent: %+v", seen)
	}
	e.checkNoSecrets(t, recs)
}

// The real SDK's container credential provider, through the broker, against both.
func TestSDKContainerCredentialsThroughBroker(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	e := startEndpoints(t, true, "pod")
	creds, err := endpointcreds.New(e.url+"/v1/credentials", func(o *endpointcreds.Options) {
		o.AuthorizationToken = podToken
	}).Retrieve(ctx)
	if err != nil || creds.AccessKeyID != "ASIAPODID" || creds.SecretAccessKey != podSecret || creds.AccountID != "123456789012" {
		t.Fatalf("pod identity via the SDK: %+v %v", creds, err)
	}
	if _, err := endpointcreds.New(e.url + "/v1/credentials").Retrieve(ctx); err == nil {
		t.Fatal("the SDK without its token got credentials")
	}
	e2 := startEndpoints(t, true, "ecs")
	creds, err = endpointcreds.New(e2.url + "/v2/credentials/" + ecsID).Retrieve(ctx)
	if err != nil || creds.AccessKeyID != "ASIAECSTASKA" {
		t.Fatalf("ECS via the SDK: %+v %v", creds, err)
	}
	if _, err := endpointcreds.New(e2.url + "/v2/credentials/" + otherID).Retrieve(ctx); err == nil {
		t.Fatal("enforce: the SDK got another task's credentials")
	}
}

// An endpoint that does not answer: the client's connection is reset, as it would have
// failed without the broker.
func TestEndpointUnreachableResets(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	b := startWith(t, true, &dstRedirects{dst: dead}, func(c *Config) {
		c.Endpoints = []Endpoint{{Kind: EndpointECS, Addrs: []netip.Addr{dead.Addr()}, Port: int(dead.Port())}}
	}, zerolog.Nop())
	resp, err := http.Get(b.url + "/v2/credentials/" + ecsID)
	if err == nil {
		resp.Body.Close()
		t.Fatalf("got %d, want a reset connection", resp.StatusCode)
	}
	recs := b.recorded(1)
	if len(recs) != 1 || recs[0].Refused != "upstream_error" || recs[0].Endpoint != EndpointECS {
		t.Fatalf("recorded %+v", recs)
	}
	if len(b.imds.requests()) != 0 {
		t.Fatal("fell back to IMDS")
	}
}

func TestRedactedPath(t *testing.T) {
	for in, want := range map[string]string{
		"/v2/credentials/abc":        "/v2/credentials/REDACTED",
		"//v2/./credentials/abc/x":   "/v2/credentials/REDACTED/REDACTED",
		"/v2/credentials/abc/../def": "/v2/credentials/REDACTED",
		"/v2/metadata":               "/v2/metadata",
	} {
		if got := redactedPath(EndpointECS, in); got != want {
			t.Errorf("redactedPath(%q) = %q, want %q", in, got, want)
		}
	}
	if got := redactedPath(EndpointIMDS, "/v2/credentials/abc"); got != "/v2/credentials/abc" {
		t.Errorf("IMDS paths are kept: %q", got)
	}
}
