package broker

import (
	"bufio"
	"bytes"
	"errors"
	"net/url"
	"strconv"
)

// The broker parses each request head once, by hand, to see what it must judge (method,
// path, the token headers, the body's length) and builds from the same pass the head it
// sends to IMDS: the client's bytes, less the hop-by-hop fields. Its parsing is at least
// as strict as IMDS's and Go's net/http; where it is stricter, the request is refused
// with 400 and documented in docs/broker.md.

// httpError is a request the broker answers itself and then closes the connection on.
type httpError struct {
	status      int
	body        string
	contentType string // "": text/plain
}

func (e *httpError) Error() string { return e.body }

var (
	errBadRequest   = &httpError{status: 400, body: "400 - Bad Request\n"}
	errHeadTooLarge = &httpError{status: 431, body: "431 - Request Header Fields Too Large\n"}
	errNoMethod     = &httpError{status: 405, body: "405 - Method Not Allowed\n"}
)

// request is what the broker knows of one request once its head is read.
type request struct {
	method        string
	path          string // decoded, as the client spelt it; Segments gives its canonical form
	query         string // after "?", undecoded; may hold a secret (ECS's v1 credentials id)
	http11        bool
	contentLength int64
	close         bool // the client's connection ends after this exchange
	token         bool // carries X-aws-ec2-metadata-token
	forwardedFor  bool // carries X-Forwarded-For
	expect100     bool
	head          []byte // request line and forwarded fields, CRLF-terminated: what IMDS gets
}

// hopByHop fields describe one connection, not the message (RFC 9110 7.6.1, plus the
// proxy fields of RFC 2616 that proxies still drop): never relayed in either direction.
// Transfer-Encoding is refused in requests and relayed with the body it frames in
// responses; Expect the broker answers itself.
func hopByHop(name []byte) bool {
	for _, h := range [...]string{"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
		"Proxy-Authorization", "TE", "Upgrade"} {
		if asciiEqualFold(name, h) {
			return true
		}
	}
	return false
}

// field is one header line in head: [start, end) including its CRLF, and its name.
type field struct {
	start, end int
	name       []byte
}

// readHead reads one request head from br into a request whose head field reuses buf.
// maxBytes caps the request line and fields together.
func readHead(br *bufio.Reader, maxBytes int, buf []byte) (request, error) {
	var req request
	head := buf[:0]
	line, err := readLine(br, &maxBytes)
	if err != nil {
		return req, err
	}
	method, rest, ok1 := bytes.Cut(line, []byte{' '})
	target, proto, ok2 := bytes.Cut(rest, []byte{' '})
	if !ok1 || !ok2 || !isToken(method) {
		return req, errBadRequest
	}
	switch string(proto) {
	case "HTTP/1.1":
		req.http11 = true
	case "HTTP/1.0":
	default: // HTTP/2 and later never arrive on this port in clear text
		return req, errBadRequest
	}
	// Only origin-form (RFC 9112 3.2.1): no absolute URLs, no CONNECT authority, no "*".
	if len(target) == 0 || target[0] != '/' || string(method) == "CONNECT" {
		if string(method) == "CONNECT" {
			return req, errNoMethod
		}
		return req, errBadRequest
	}
	for _, c := range target {
		if c <= ' ' || c >= 0x7f || c == '#' {
			return req, errBadRequest
		}
	}
	req.method = internMethod(method)
	p := target
	if i := bytes.IndexByte(p, '?'); i >= 0 {
		req.query = string(p[i+1:])
		p = p[:i]
	}
	if bytes.IndexByte(p, '%') >= 0 {
		s, err := url.PathUnescape(string(p))
		if err != nil {
			return req, errBadRequest
		}
		req.path = s
	} else {
		req.path = string(p)
	}
	head = append(head, line...)
	head = append(head, '\r', '\n')

	var (
		fields     []field
		connTokens [][]byte
		hosts      int
		haveCL     bool
		dropSome   bool
	)
	for {
		line, err := readLine(br, &maxBytes)
		if err != nil {
			return req, err
		}
		if len(line) == 0 {
			break
		}
		if line[0] == ' ' || line[0] == '\t' { // obs-fold (RFC 9112 5.2): refused
			return req, errBadRequest
		}
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 || !isToken(line[:colon]) { // also refuses space before the colon
			return req, errBadRequest
		}
		name, value := line[:colon], bytes.Trim(line[colon+1:], " \t")
		for _, c := range value {
			if (c < ' ' && c != '\t') || c == 0x7f {
				return req, errBadRequest
			}
		}
		start := len(head)
		head = append(head, line...)
		head = append(head, '\r', '\n')
		f := field{start: start, end: len(head), name: head[start : start+colon]}
		fields = append(fields, f)
		switch {
		case asciiEqualFold(name, "Host"):
			hosts++
		case asciiEqualFold(name, "Content-Length"):
			n, ok := parseLength(value)
			if !ok || haveCL {
				return req, errBadRequest
			}
			haveCL, req.contentLength = true, n
		case asciiEqualFold(name, "Transfer-Encoding"):
			// No IMDS client sends a request body in chunks: refused rather than
			// de-chunked, which also closes the door on CL/TE smuggling.
			return req, errBadRequest
		case asciiEqualFold(name, "Connection"):
			dropSome = true
			for tok := range bytes.SplitSeq(value, []byte{','}) {
				tok = bytes.Trim(tok, " \t")
				switch {
				case asciiEqualFold(tok, "close"):
					req.close = true
				case asciiEqualFold(tok, "keep-alive"):
				case len(tok) > 0:
					connTokens = append(connTokens, tok)
				}
			}
		case asciiEqualFold(name, "Expect"):
			dropSome = true
			if !asciiEqualFold(value, "100-continue") {
				return req, &httpError{status: 417, body: "417 - Expectation Failed\n"}
			}
			req.expect100 = true
		case asciiEqualFold(name, "X-aws-ec2-metadata-token"):
			req.token = req.token || len(value) > 0
		case asciiEqualFold(name, "X-Forwarded-For"):
			req.forwardedFor = true
		case hopByHop(name):
			dropSome = true
		}
	}
	if (req.http11 && hosts != 1) || hosts > 1 {
		return req, errBadRequest
	}
	if !req.http11 {
		req.close = true // HTTP/1.0: one exchange per connection, as IMDS itself does unasked
	}
	if dropSome {
		// Drop the hop-by-hop fields and those the Connection field names (RFC 9110
		// 7.6.1), keeping every other byte as the client sent it.
		w := fields[0].start
		for _, f := range fields {
			if dropField(f.name, connTokens) {
				continue
			}
			w += copy(head[w:], head[f.start:f.end])
		}
		head = head[:w]
	}
	req.head = append(head, '\r', '\n')
	return req, nil
}

func dropField(name []byte, connTokens [][]byte) bool {
	if hopByHop(name) || asciiEqualFold(name, "Expect") {
		return true
	}
	for _, t := range connTokens {
		if bytes.EqualFold(name, t) {
			return true
		}
	}
	return false
}

// readLine reads one CRLF-terminated line, without its CRLF, charging its length to
// budget. The slice is valid until the next read of br.
func readLine(br *bufio.Reader, budget *int) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	*budget -= len(line)
	if errors.Is(err, bufio.ErrBufferFull) || *budget < 0 {
		return nil, errHeadTooLarge
	}
	if err != nil {
		return nil, err
	}
	// CRLF only: a bare LF or a CR inside the line is refused (RFC 9112 2.2 lets a
	// recipient refuse both; some parsers disagree on them, which smuggling exploits).
	if len(line) < 2 || line[len(line)-2] != '\r' {
		return nil, errBadRequest
	}
	line = line[:len(line)-2]
	if bytes.IndexByte(line, '\r') >= 0 {
		return nil, errBadRequest
	}
	return line, nil
}

func parseLength(v []byte) (int64, bool) {
	if len(v) == 0 || len(v) > 18 {
		return 0, false
	}
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(string(v), 10, 64)
	return n, err == nil
}

// isToken reports whether b is an RFC 9110 token (method and field names).
func isToken(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for _, c := range b {
		if c >= 0x80 || !tokenChar[c] {
			return false
		}
	}
	return true
}

var tokenChar = func() (t [128]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c], t[c-'a'+'A'] = true, true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

// asciiEqualFold compares a field name with a lower- or mixed-case constant.
func asciiEqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := 0; i < len(b); i++ {
		x, y := b[i], s[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// internMethod avoids an allocation per request for the methods IMDS clients use.
func internMethod(m []byte) string {
	for _, s := range [...]string{"GET", "PUT", "HEAD"} {
		if string(m) == s {
			return s
		}
	}
	return string(m)
}
