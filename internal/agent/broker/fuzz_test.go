package broker

import (
	"bufio"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// FuzzRequest sends arbitrary bytes as a request: the broker must answer with an HTTP
// error or close the connection, never crash and never hang.
func FuzzRequest(f *testing.F) {
	for _, seed := range []string{
		"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
		"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n",
		"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
		"GARBAGE\r\n\r\n",
		"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
		"CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n",
		"\x00\x01\x02",
		// Issue 11 item 9: token requests however spelt, PUTs with X-Forwarded-For, a
		// bogus token.
		"put /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n",
		"PUT /latest/api/token/ HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
		"pUT //latest/./api/%74oken?x HTTP/1.1\r\nHost: x\r\nx-forwarded-for: 1.2.3.4\r\n\r\n",
		"PUT /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\nContent-Length: 0\r\n\r\n",
		"GET /latest/meta-data/iam/security-credentials/r HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token: AQAEAbogus==\r\n\r\n",
	} {
		f.Add([]byte(seed))
	}
	b := start(f, true, v4Redirect(true))
	addr := strings.TrimPrefix(b.url, "http://")
	f.Fuzz(func(t *testing.T, data []byte) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(3 * time.Second))
		conn.Write(data)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatalf("broker hung on %q", data)
			}
			return // closed without an answer: fine for garbage
		}
		resp.Body.Close()
		if resp.StatusCode >= 500 {
			t.Fatalf("broker answered %d to %q", resp.StatusCode, data)
		}
	})
}
