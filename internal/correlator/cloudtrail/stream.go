package cloudtrail

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// stream walks a JSON stream token by token like encoding/json's Decoder (the same
// states, the same errors, the same offsets), but decodes records with the parser.
type stream struct {
	r       io.Reader
	rerr    error // what the last Read returned with its bytes; io.EOF at the end
	buf     []byte
	scanp   int   // start of unread data in buf
	scanned int64 // bytes dropped from the front of buf
	err     error // a broken stream: every later decode returns it

	tokenState int
	tokenStack []int
	strs       *repeats
}

// The token states of encoding/json's Decoder.
const (
	tokenTopValue = iota
	tokenArrayStart
	tokenArrayValue
	tokenArrayComma
	tokenObjectStart
	tokenObjectKey
	tokenObjectColon
	tokenObjectValue
	tokenObjectComma
)

// syntaxError is a broken stream, worded as encoding/json words it.
type syntaxError struct {
	msg    string
	Offset int64
}

func (e *syntaxError) Error() string { return e.msg }

const streamBuf = 256 << 10

func newStream(r io.Reader, strs *repeats) *stream {
	return &stream{r: r, strs: strs}
}

// InputOffset is the offset of the next unread byte.
func (s *stream) InputOffset() int64 { return s.scanned + int64(s.scanp) }

// refill drops the bytes read, makes room (at least as much again as is buffered) and
// reads. A read error (io.EOF at the end) is kept: it is returned from then on.
func (s *stream) refill() error {
	if s.rerr != nil {
		return s.rerr
	}
	if s.scanp > 0 {
		s.scanned += int64(s.scanp)
		n := copy(s.buf, s.buf[s.scanp:])
		s.buf = s.buf[:n]
		s.scanp = 0
	}
	if cap(s.buf)-len(s.buf) < max(len(s.buf), 512) {
		nb := make([]byte, len(s.buf), max(2*cap(s.buf), streamBuf))
		copy(nb, s.buf)
		s.buf = nb
	}
	// Read until as much again as was buffered has come, so that a value larger than
	// the buffer is parsed a bounded number of times, but do not wait for more than
	// that: the input may be a pipe.
	want, got := len(s.buf), 0
	for len(s.buf) < cap(s.buf) {
		n, err := s.r.Read(s.buf[len(s.buf):cap(s.buf)])
		s.buf = s.buf[:len(s.buf)+n]
		got += n
		if err != nil {
			s.rerr = err
			return err
		}
		if n == 0 || got > want {
			break
		}
	}
	return nil
}

// peek returns the next byte that is not white space, leaving it unread.
func (s *stream) peek() (byte, error) {
	var err error
	for {
		for i := s.scanp; i < len(s.buf); i++ {
			c := s.buf[i]
			if c == ' ' || c == '\t' || c == '\r' || c == '\n' {
				continue
			}
			s.scanp = i
			return c, nil
		}
		if err != nil {
			return 0, err
		}
		err = s.refill()
	}
}

// More reports whether there is another element in the array or object.
func (s *stream) More() bool {
	c, err := s.peek()
	return err == nil && c != ']' && c != '}'
}

func (s *stream) tokenValueAllowed() bool {
	switch s.tokenState {
	case tokenTopValue, tokenArrayStart, tokenArrayValue, tokenObjectValue:
		return true
	}
	return false
}

func (s *stream) tokenValueEnd() {
	switch s.tokenState {
	case tokenArrayStart, tokenArrayValue:
		s.tokenState = tokenArrayComma
	case tokenObjectValue:
		s.tokenState = tokenObjectComma
	}
}

func (s *stream) tokenPrepareForDecode() error {
	switch s.tokenState {
	case tokenArrayComma:
		c, err := s.peek()
		if err != nil {
			return err
		}
		if c != ',' {
			return &syntaxError{"expected comma after array element", s.InputOffset()}
		}
		s.scanp++
		s.tokenState = tokenArrayValue
	case tokenObjectColon:
		c, err := s.peek()
		if err != nil {
			return err
		}
		if c != ':' {
			return &syntaxError{"expected colon after object key", s.InputOffset()}
		}
		s.scanp++
		s.tokenState = tokenObjectValue
	}
	return nil
}

// decode reads the next value with parse, which is called again from the value's start
// with more bytes when the value goes on past the buffer. target is what
// encoding/json would decode into; it is used only to word an error.
func (s *stream) decode(parse func(p *parser), target func() any) error {
	if s.err != nil {
		return s.err
	}
	if err := s.tokenPrepareForDecode(); err != nil {
		return err
	}
	if !s.tokenValueAllowed() {
		return &syntaxError{"not at beginning of value", s.InputOffset()}
	}
	for {
		p := parser{b: s.buf[s.scanp:], final: s.rerr != nil, strs: s.strs}
		parse(&p)
		switch p.err {
		case nil:
			value := s.buf[s.scanp : s.scanp+p.i]
			s.scanp += p.i
			s.tokenValueEnd()
			if p.typeErr {
				return json.NewDecoder(bytes.NewReader(value)).Decode(target())
			}
			return nil
		case errMore:
			_ = s.refill() // a read error ends the input: the next parse is final
		case errEnd:
			s.err = s.rerr
			if errors.Is(s.rerr, io.EOF) && nonSpace(s.buf[s.scanp:]) {
				s.err = io.ErrUnexpectedEOF
			}
			return s.err
		default: // errSyntax: encoding/json words it
			s.err = json.NewDecoder(bytes.NewReader(s.buf[s.scanp:])).Decode(target())
			if s.err == nil { // unreachable: the two disagree
				s.err = fmt.Errorf("byte %d: %w", s.InputOffset()+int64(p.i), errSyntax)
			}
			return s.err
		}
	}
}

func nonSpace(b []byte) bool {
	for _, c := range b {
		if c != ' ' && c != '\t' && c != '\r' && c != '\n' {
			return true
		}
	}
	return false
}

func skipValue(p *parser) { p.skip() }

func anyValue() any { return new(any) }

// Token returns the next token: a json.Delim, an object key (string), or for any other
// value something that is neither.
func (s *stream) Token() (any, error) {
	for {
		c, err := s.peek()
		if err != nil {
			return nil, err
		}
		switch c {
		case '[', '{':
			if !s.tokenValueAllowed() {
				return s.tokenError(c)
			}
			s.scanp++
			s.tokenStack = append(s.tokenStack, s.tokenState)
			s.tokenState = tokenArrayStart
			if c == '{' {
				s.tokenState = tokenObjectStart
			}
			return json.Delim(c), nil
		case ']', '}':
			if c == ']' && s.tokenState != tokenArrayStart && s.tokenState != tokenArrayComma ||
				c == '}' && s.tokenState != tokenObjectStart && s.tokenState != tokenObjectComma {
				return s.tokenError(c)
			}
			s.scanp++
			s.tokenState = s.tokenStack[len(s.tokenStack)-1]
			s.tokenStack = s.tokenStack[:len(s.tokenStack)-1]
			s.tokenValueEnd()
			return json.Delim(c), nil
		case ':':
			if s.tokenState != tokenObjectColon {
				return s.tokenError(c)
			}
			s.scanp++
			s.tokenState = tokenObjectValue
			continue
		case ',':
			if s.tokenState == tokenArrayComma {
				s.scanp++
				s.tokenState = tokenArrayValue
				continue
			}
			if s.tokenState == tokenObjectComma {
				s.scanp++
				s.tokenState = tokenObjectKey
				continue
			}
			return s.tokenError(c)
		case '"':
			if s.tokenState == tokenObjectStart || s.tokenState == tokenObjectKey {
				var key string
				old := s.tokenState
				s.tokenState = tokenTopValue
				err := s.decode(func(p *parser) {
					if body, slow := p.str(); p.err == nil {
						key = text(body, slow)
					}
				}, func() any { return new(string) })
				s.tokenState = old
				if err != nil {
					return nil, err
				}
				s.tokenState = tokenObjectColon
				return key, nil
			}
			fallthrough
		default:
			if !s.tokenValueAllowed() {
				return s.tokenError(c)
			}
			if err := s.decode(skipValue, anyValue); err != nil {
				return nil, err
			}
			return struct{}{}, nil
		}
	}
}

func (s *stream) tokenError(c byte) (any, error) {
	var context string
	switch s.tokenState {
	case tokenTopValue, tokenArrayStart, tokenArrayValue, tokenObjectValue:
		context = " looking for beginning of value"
	case tokenArrayComma:
		context = " after array element"
	case tokenObjectKey:
		context = " looking for beginning of object key string"
	case tokenObjectColon:
		context = " after object key"
	case tokenObjectComma:
		context = " after object key:value pair"
	}
	return nil, &syntaxError{"invalid character " + quoteChar(c) + context, s.InputOffset()}
}

// quoteChar formats c as encoding/json does in its messages.
func quoteChar(c byte) string {
	if c == '\'' {
		return `'\''`
	}
	if c == '"' {
		return `'"'`
	}
	s := fmt.Sprintf("%q", string(rune(c)))
	return "'" + s[1:len(s)-1] + "'"
}
