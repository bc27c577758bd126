package broker

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// maxResponseHead caps the status line and fields of IMDS's answer; maxCredentialBody
// caps the one body the broker keeps (a credential answer is under 2 kB).
const (
	maxResponseHead   = 16 << 10
	maxCredentialBody = 64 << 10
)

// errUpstream marks a failure on the IMDS side of an exchange, before or during its
// answer, as opposed to a client that went away.
type upstreamError struct{ err error }

func (e *upstreamError) Error() string { return e.err.Error() }
func (e *upstreamError) Unwrap() error { return e.err }

func upErr(format string, args ...any) error {
	return &upstreamError{fmt.Errorf(format, args...)}
}

// response is what the broker learnt relaying one answer.
type response struct {
	status   int
	wrote    bool   // bytes reached (or were handed to) the client
	close    bool   // the client's connection ends after this exchange
	upClose  bool   // IMDS's connection ends after it (IMDS said so, or framed the body by its end)
	creds    []byte // the body of a credential answer, when capture was asked
	tooLarge bool   // the answer was too large to be a credential: not kept
	started  bool   // a byte of the answer arrived from IMDS
}

// relay reads IMDS's answer to req from up and writes it to client: status line and
// fields as IMDS sent them, less the hop-by-hop ones, then the body as it comes,
// framed as IMDS framed it. When capture is set and the answer is 200, the body is also
// kept (up to maxCredentialBody) for fingerprinting.
func relay(client io.Writer, up *bufio.Reader, req *request, capture bool, out []byte) (response, []byte, error) {
	var res response
	for {
		budget := maxResponseHead
		line, err := readRespLine(up, &budget)
		if err != nil {
			return res, out, upErr("read status line: %w", err)
		}
		res.started = true
		status, ok := parseStatusLine(line)
		if !ok {
			return res, out, upErr("bad status line")
		}
		out = append(out[:0], line...)
		out = append(out, '\r', '\n')
		res.status = status
		var (
			fields     []field
			connTokens [][]byte
			chunked    bool
			length     int64 = -1
			dropSome   bool
		)
		for {
			line, err := readRespLine(up, &budget)
			if err != nil {
				return res, out, upErr("read answer fields: %w", err)
			}
			if len(line) == 0 {
				break
			}
			colon := bytes.IndexByte(line, ':')
			if colon <= 0 || !isToken(line[:colon]) {
				return res, out, upErr("bad answer field")
			}
			name, value := line[:colon], bytes.Trim(line[colon+1:], " \t")
			start := len(out)
			out = append(out, line...)
			out = append(out, '\r', '\n')
			fields = append(fields, field{start: start, end: len(out), name: out[start : start+colon]})
			switch {
			case asciiEqualFold(name, "Content-Length"):
				n, ok := parseLength(value)
				if !ok || (length >= 0 && n != length) {
					return res, out, upErr("bad Content-Length %q", value)
				}
				length = n
			case asciiEqualFold(name, "Transfer-Encoding"):
				// Relayed as sent, with the body it frames: the client asked in HTTP/1.1.
				chunked = asciiEqualFold(bytes.TrimSpace(lastToken(value)), "chunked")
				if !chunked {
					return res, out, upErr("unsupported Transfer-Encoding %q", value)
				}
			case asciiEqualFold(name, "Connection"):
				dropSome = true
				for tok := range bytes.SplitSeq(value, []byte{','}) {
					tok = bytes.Trim(tok, " \t")
					if asciiEqualFold(tok, "close") {
						res.close = true
					} else if len(tok) > 0 {
						connTokens = append(connTokens, tok)
					}
				}
			case hopByHop(name):
				dropSome = true
			}
		}
		if dropSome {
			w := fields[0].start
			for _, f := range fields {
				if hopByHop(f.name) || dropNamed(f.name, connTokens) {
					continue
				}
				w += copy(out[w:], out[f.start:f.end])
			}
			out = out[:w]
		}
		interim := status >= 100 && status < 200
		if status == 101 {
			return res, out, upErr("unexpected 101 Switching Protocols") // Upgrade is never relayed
		}
		noBody := interim || status == 204 || status == 304 || req.method == "HEAD"
		if !noBody && !chunked && length < 0 {
			res.close = true // framed by the end of the connection
		}
		// An HTTP/1.0 request leaves IMDS's connection closing too; a client's own
		// "Connection: close" does not (the field is not forwarded).
		res.upClose = res.close || !req.http11
		if req.close || res.close {
			res.close = true
			if !interim {
				out = append(out, "Connection: close\r\n"...)
			}
		}
		out = append(out, '\r', '\n')
		if interim { // 1xx: relay it and read on for the final answer
			res.wrote = true
			if _, err := client.Write(out); err != nil {
				return res, out, err
			}
			continue
		}
		capture = capture && status == 200
		var err2 error
		switch {
		case noBody:
			res.wrote = true
			_, err2 = client.Write(out)
		case length >= 0:
			out, err2 = relayLength(client, up, out, length, capture, &res)
		case chunked:
			out, err2 = relayChunked(client, up, out, capture, &res)
		default:
			res.wrote = true
			if _, err2 = client.Write(out); err2 == nil {
				err2 = copyBody(client, up, -1, capture, &res)
			}
		}
		return res, out, err2
	}
}

// relayLength relays a body of n bytes. The common IMDS answer (a few hundred bytes,
// already read with the head) leaves in the same write as its head.
func relayLength(client io.Writer, up *bufio.Reader, out []byte, n int64, capture bool, res *response) ([]byte, error) {
	if int64(up.Buffered()) >= n {
		body, _ := up.Peek(int(n))
		if capture {
			keep(res, body)
		}
		out = append(out, body...)
		_, _ = up.Discard(int(n)) // a short discard fails the next read
		res.wrote = true
		_, err := client.Write(out)
		return out, err
	}
	res.wrote = true
	if _, err := client.Write(out); err != nil {
		return out, err
	}
	return out, copyBody(client, up, n, capture, res)
}

// copyBody streams n bytes (all until EOF when n < 0) from up to client.
func copyBody(client io.Writer, up *bufio.Reader, n int64, capture bool, res *response) error {
	var src io.Reader = up
	if n >= 0 {
		src = io.LimitReader(up, n)
	}
	var dst io.Writer = client
	if capture {
		dst = captureWriter{client, res}
	}
	written, err := io.Copy(dst, src)
	if err == nil && n >= 0 && written < n {
		err = upErr("answer body cut short: %w", io.ErrUnexpectedEOF)
	}
	var we *writeError
	if errors.As(err, &we) {
		return we.err
	}
	if err != nil {
		return &upstreamError{err}
	}
	return nil
}

// relayChunked relays a chunked body verbatim (sizes, extensions, trailers), reading
// the framing only to know where it ends and, for a credential answer, to keep the data.
func relayChunked(client io.Writer, up *bufio.Reader, out []byte, capture bool, res *response) ([]byte, error) {
	res.wrote = true
	flush := func() error {
		_, err := client.Write(out)
		out = out[:0]
		return err
	}
	for {
		budget := maxResponseHead
		line, err := readRespLine(up, &budget)
		if err != nil {
			return out, upErr("read chunk size: %w", err)
		}
		sizeHex, _, _ := bytes.Cut(line, []byte{';'})
		size, err := strconv.ParseInt(string(bytes.TrimSpace(sizeHex)), 16, 64)
		if err != nil || size < 0 {
			return out, upErr("bad chunk size")
		}
		out = append(out, line...)
		out = append(out, '\r', '\n')
		if size == 0 {
			for { // trailer fields, then the final CRLF
				line, err := readRespLine(up, &budget)
				if err != nil {
					return out, upErr("read trailer: %w", err)
				}
				out = append(out, line...)
				out = append(out, '\r', '\n')
				if len(line) == 0 {
					return out, flush()
				}
			}
		}
		if len(out) > 16<<10 {
			if err := flush(); err != nil {
				return out, err
			}
		}
		if int64(up.Buffered()) >= size+2 {
			data, _ := up.Peek(int(size + 2))
			if string(data[size:]) != "\r\n" {
				return out, upErr("chunk not followed by CRLF")
			}
			if capture {
				keep(res, data[:size])
			}
			out = append(out, data...)
			_, _ = up.Discard(int(size + 2)) // a short discard fails the next read
			continue
		}
		if err := flush(); err != nil {
			return out, err
		}
		if err := copyBody(client, up, size, capture, res); err != nil {
			return out, err
		}
		crlf := make([]byte, 2)
		if _, err := io.ReadFull(up, crlf); err != nil || string(crlf) != "\r\n" {
			return out, upErr("chunk not followed by CRLF")
		}
		out = append(out, crlf...)
	}
}

// keep appends body bytes to the captured credential answer; an answer too large to be
// one is not kept at all.
func keep(res *response, b []byte) {
	if res.tooLarge {
		return
	}
	if len(res.creds)+len(b) > maxCredentialBody {
		res.creds, res.tooLarge = nil, true
		return
	}
	res.creds = append(res.creds, b...)
}

// writeError tells a failed write to the client from a failed read from IMDS in io.Copy.
type writeError struct{ err error }

func (e *writeError) Error() string { return e.err.Error() }

type captureWriter struct {
	w   io.Writer
	res *response
}

func (c captureWriter) Write(p []byte) (int, error) {
	keep(c.res, p)
	n, err := c.w.Write(p)
	if err != nil {
		return n, &writeError{err}
	}
	return n, nil
}

// readRespLine reads a line of IMDS's answer. Go's servers (the emulator) and IMDS
// end lines with CRLF; a bare LF is accepted from IMDS, as clients accept it.
func readRespLine(br *bufio.Reader, budget *int) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	*budget -= len(line)
	if errors.Is(err, bufio.ErrBufferFull) || *budget < 0 {
		return nil, errors.New("answer head too large")
	}
	if err != nil {
		return nil, err
	}
	line = bytes.TrimSuffix(line[:len(line)-1], []byte{'\r'})
	return line, nil
}

// parseStatusLine parses "HTTP/1.x NNN reason".
func parseStatusLine(line []byte) (int, bool) {
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
		return 0, false
	}
	code := line[9:12]
	if len(line) > 12 && line[12] != ' ' {
		return 0, false
	}
	n := 0
	for _, c := range code {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, n >= 100
}

func lastToken(v []byte) []byte {
	if i := bytes.LastIndexByte(v, ','); i >= 0 {
		return v[i+1:]
	}
	return v
}

func dropNamed(name []byte, connTokens [][]byte) bool {
	for _, t := range connTokens {
		if bytes.EqualFold(name, t) {
			return true
		}
	}
	return false
}
