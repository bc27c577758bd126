package broker

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// raw sends one or more raw requests on a fresh connection and returns what came back
// until the broker closed the connection (or 3 s passed).
func raw(t *testing.T, b *bed, data string) string {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(b.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	io.WriteString(conn, data)
	out, _ := io.ReadAll(conn)
	return string(out)
}

// Requests parsed at least as strictly as IMDS and net/http do; each of these is
// refused before anything reaches IMDS.
func TestStrictParsing(t *testing.T) {
	b := start(t, true, v4Redirect(false))
	for name, req := range map[string]string{
		"bare LF":            "GET /latest/meta-data/ HTTP/1.1\nHost: x\n\n",
		"obs-fold":           "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n",
		"absolute-form":      "GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
		"CONNECT":            "CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: x\r\n\r\n",
		"asterisk":           "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
		"no Host":            "GET /latest/meta-data/ HTTP/1.1\r\n\r\n",
		"two Hosts":          "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
		"space before colon": "GET /latest/meta-data/ HTTP/1.1\r\nHost : x\r\n\r\n",
		"two lengths":        "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nab",
		"bad length":         "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\na",
		"chunked body":       "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		"CL and TE":          "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		"HTTP/2":             "GET / HTTP/2.0\r\nHost: x\r\n\r\n",
		"NUL in value":       "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
		"CR in line":         "GET / HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n",
		"bad escape":         "GET /latest/%zz HTTP/1.1\r\nHost: x\r\n\r\n",
		"space in target":    "GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
	} {
		out := raw(t, b, req)
		if !strings.HasPrefix(out, "HTTP/1.1 4") {
			t.Errorf("%s: got %q, want a 4xx", name, out)
		}
	}
	if n := len(b.imds.requests()); n != 0 {
		t.Fatalf("IMDS saw %d malformed requests", n)
	}
}

// Hop-by-hop fields (RFC 9110 7.6.1) and those Connection names are dropped both ways;
// every other field and the body pass as sent.
func TestHopByHop(t *testing.T) {
	b := start(t, true, v4Redirect(false))
	out := raw(t, b, "GET /latest/meta-data/hop HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: X-Private, close\r\n"+
		"X-Private: drop-me\r\nKeep-Alive: 5\r\nProxy-Authorization: Basic x\r\nTE: trailers\r\nUpgrade: h2c\r\nX-aws-ec2-metadata-token: T\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(out)), nil)
	if err != nil {
		t.Fatalf("%v: %q", err, out)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || string(body) != "hop" || resp.Header.Get("X-Hop") != "" || resp.Header.Get("Keep-Alive") != "" ||
		resp.Header.Get("X-End") != "kept" || !resp.Close {
		t.Errorf("answer %q", out)
	}
	seen := b.imds.requests()
	if len(seen) != 1 {
		t.Fatalf("IMDS saw %d requests", len(seen))
	}
	h := seen[0].Header
	for _, f := range []string{"X-Private", "Keep-Alive", "Proxy-Authorization", "Te", "Upgrade", "Connection"} {
		if h.Get(f) != "" {
			t.Errorf("%s reached IMDS: %v", f, h)
		}
	}
	if h.Get("X-aws-ec2-metadata-token") != "T" {
		t.Errorf("token field lost: %v", h)
	}
}

// Answers are relayed as IMDS framed them: chunked, large, HEAD, HTTP/1.0, pipelined.
func TestFraming(t *testing.T) {
	b := start(t, true, v4Redirect(false))
	c := &http.Client{}
	st, body := do(t, c, "GET", b.url+"/latest/user-data", nil)
	if st != 200 || len(body) != 200<<10 {
		t.Errorf("large answer: %d, %d bytes", st, len(body))
	}
	st, body = do(t, c, "GET", b.url+"/latest/meta-data/iam/security-credentials/chunked", nil)
	if st != 200 || !strings.Contains(body, "ASIACHUNK") {
		t.Errorf("chunked credential answer: %d %q", st, body)
	}
	recs := b.recorded(2)
	if last := recs[len(recs)-1]; !strings.Contains(string(last.Body), `"AccessKeyId":"ASIACHUNK"`) || !strings.HasPrefix(string(last.Body), `{"Code"`) {
		t.Errorf("chunked credential answer kept as %q", last.Body)
	}
	if recs[0].Body != nil {
		t.Errorf("a non-credential body was kept")
	}
	if st, body := do(t, c, "HEAD", b.url+"/latest/meta-data/instance-id", nil); st != 200 || body != "" {
		t.Errorf("HEAD: %d %q", st, body)
	}
	out := raw(t, b, "GET /latest/meta-data/instance-id HTTP/1.0\r\n\r\n")
	if !strings.HasPrefix(out, "HTTP/1.") || !strings.HasSuffix(out, "i-0123456789") {
		t.Errorf("HTTP/1.0: %q", out)
	}
	// Two requests in one write, the second asking to close: both answered, in order.
	out = raw(t, b, "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n"+
		"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
	if strings.Count(out, "HTTP/1.1 200") != 2 || !strings.HasSuffix(out, "TOKEN") {
		t.Errorf("pipelined: %q", out)
	}
	// A body, announced with Expect: 100-continue, reaches IMDS.
	out = raw(t, b, "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\nConnection: close\r\n\r\nab")
	if !strings.HasPrefix(out, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200") {
		t.Errorf("expect: %q", out)
	}
}

// One upstream connection per client connection, redialled when IMDS closed it while
// idle; the client never notices.
func TestUpstreamPerClientConnection(t *testing.T) {
	b := start(t, true, v4Redirect(false))
	conn, err := net.Dial("tcp", strings.TrimPrefix(b.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rd := bufio.NewReader(conn)
	get := func() {
		t.Helper()
		fmt.Fprintf(conn, "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(rd, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
	}
	for i := 0; i < 3; i++ {
		get()
	}
	if n := b.upstreamConns(); n != 1 {
		t.Errorf("3 requests on one client connection used %d upstream connections", n)
	}
	b.closeUpstreamIdle()
	get()
	if n := b.upstreamConns(); n != 2 {
		t.Errorf("after IMDS closed the idle connection: %d upstream connections, want 2", n)
	}
}
