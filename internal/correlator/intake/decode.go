package intake

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"time"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/imdsguard/imdsguard/internal/wire"
)

// DecodeBatch is the intake's decoder of a batch body (see decodeBatch), for
// benchmarks that hold the intake against decoding alone.
func DecodeBatch(data []byte) (wire.Batch, [][]byte, error) { return decodeBatch(data) }

// decodeBatch decodes one batch body (a wire.Batch) in one pass and returns each
// fingerprint's bytes as sent, for the store to keep without encoding them again.
//
// It accepts and refuses exactly what encoding/json does when it decodes the body
// strictly (DisallowUnknownFields, one value and nothing after it but white space),
// and gives the same Batch: field names matched without regard to case as
// encoding/json folds them, null leaving a string, struct or time as it was, a key
// given twice decoded again into what the first left, invalid UTF-8 in strings
// replaced by U+FFFD. The fuzz test holds it against encoding/json. It exists because
// encoding/json, which must scan the body once to find its end and again to decode
// it, and a third and fourth time to keep each fingerprint's bytes, cost more than
// the rest of the intake together.
func decodeBatch(data []byte) (wire.Batch, [][]byte, error) {
	// Strings without escapes are cut from one copy of the body: one allocation
	// instead of one per field.
	p := &parser{data: data, text: string(data)}
	var b wire.Batch
	var fps []wire.Fingerprint
	var raws [][]byte
	p.space()
	if p.i == len(p.data) {
		return b, nil, errors.New("empty body")
	}
	switch p.data[p.i] {
	case 'n':
		if err := p.literal("null"); err != nil {
			return b, nil, err
		}
	case '{':
		var err error
		if fps, raws, err = p.batch(&b); err != nil {
			return wire.Batch{}, nil, err
		}
	default:
		return b, nil, p.errorf("the batch is not an object")
	}
	p.space()
	if p.i != len(p.data) {
		return wire.Batch{}, nil, p.errorf("data after the batch")
	}
	if fps == nil { // never an array, or null
		fps, raws = []wire.Fingerprint{}, [][]byte{}
	}
	b.Fingerprints = fps
	return b, raws, nil
}

// parser reads JSON from data at i.
type parser struct {
	data   []byte
	text   string // data as a string
	i      int
	folded []byte // fold's buffer
}

// fold is foldKey into a buffer reused from key to key.
func (p *parser) fold(key []byte) []byte {
	p.folded = appendFolded(p.folded[:0], key)
	return p.folded
}

func (p *parser) errorf(format string, args ...any) error {
	return fmt.Errorf("offset %d: %s", p.i, fmt.Sprintf(format, args...))
}

func (p *parser) space() {
	for p.i < len(p.data) {
		switch p.data[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

func (p *parser) peek() byte {
	if p.i < len(p.data) {
		return p.data[p.i]
	}
	return 0
}

func (p *parser) literal(word string) error {
	if len(p.data)-p.i < len(word) || string(p.data[p.i:p.i+len(word)]) != word {
		return p.errorf("invalid literal")
	}
	p.i += len(word)
	return nil
}

// object reads an object, calling field for each key with the parser at the value,
// which field must consume.
func (p *parser) object(field func(key []byte) error) error {
	p.i++ // {
	p.space()
	if p.peek() == '}' {
		p.i++
		return nil
	}
	for {
		if p.peek() != '"' {
			return p.errorf("expected a key")
		}
		key, err := p.str()
		if err != nil {
			return err
		}
		p.space()
		if p.peek() != ':' {
			return p.errorf("expected ':'")
		}
		p.i++
		p.space()
		if err := field(key); err != nil {
			return err
		}
		p.space()
		switch p.peek() {
		case ',':
			p.i++
			p.space()
		case '}':
			p.i++
			return nil
		default:
			return p.errorf("expected ',' or '}'")
		}
	}
}

// array reads an array, calling elem with the parser at each element, which elem
// must consume.
func (p *parser) array(elem func(i int) error) error {
	p.i++ // [
	p.space()
	if p.peek() == ']' {
		p.i++
		return nil
	}
	for n := 0; ; n++ {
		if err := elem(n); err != nil {
			return err
		}
		p.space()
		switch p.peek() {
		case ',':
			p.i++
			p.space()
		case ']':
			p.i++
			return nil
		default:
			return p.errorf("expected ',' or ']'")
		}
	}
}

// batch reads the batch object but its fingerprints, returned with their bytes.
func (p *parser) batch(b *wire.Batch) ([]wire.Fingerprint, [][]byte, error) {
	var fps []wire.Fingerprint
	var raws [][]byte
	// encoding/json decodes the fingerprints of the last "fingerprints" key only,
	// having checked the syntax of all: a fingerprint that does not decode refuses the
	// batch unless another "fingerprints" follows.
	var pending error
	err := p.object(func(key []byte) error {
		switch string(p.fold(key)) {
		case "DOCUMENT":
			return p.stringInto(&b.Document)
		case "PKCS7":
			return p.stringInto(&b.PKCS7)
		case "BATCH_ID":
			return p.stringInto(&b.BatchID)
		case "FINGERPRINTS":
			// Each fingerprint is decoded on its own (a key given twice starts
			// again from none), as encoding/json decodes each of a batch's
			// json.RawMessage.
			pending = nil
			switch p.peek() {
			case 'n':
				fps, raws = nil, nil
				return p.literal("null")
			case '[':
				fps, raws = []wire.Fingerprint{}, [][]byte{}
				return p.array(func(i int) error {
					start := p.i
					fps = append(fps, wire.Fingerprint{})
					var err error
					switch p.peek() {
					case 'n': // a zero fingerprint
						if err := p.literal("null"); err != nil {
							return err
						}
					case '{':
						err = p.fingerprint(&fps[i])
					default:
						err = p.errorf("not an object")
					}
					if err != nil {
						if pending == nil {
							pending = fmt.Errorf("fingerprints[%d]: %w", i, err)
						}
						// Its syntax still counts: a syntax error is final.
						p.i = start
						if err := p.skip(2); err != nil {
							return err
						}
					}
					raws = append(raws, p.data[start:p.i])
					return nil
				})
			}
			return p.errorf("fingerprints is not an array")
		}
		return p.errorf("unknown field %q", key)
	})
	if err == nil {
		err = pending
	}
	return fps, raws, err
}

func (p *parser) fingerprint(fp *wire.Fingerprint) error {
	return p.object(func(key []byte) error {
		switch string(p.fold(key)) {
		case "ID":
			return p.stringInto(&fp.ID)
		case "ACCESS_KEY_ID":
			return p.stringInto(&fp.AccessKeyID)
		case "ROLE":
			return p.stringInto(&fp.Role)
		case "INSTANCE_PROFILE_ARN":
			return p.stringInto(&fp.InstanceProfileARN)
		case "LAST_UPDATED":
			return p.timeInto(&fp.LastUpdated)
		case "EXPIRATION":
			return p.timeInto(&fp.Expiration)
		case "INSTANCE":
			return p.instance(&fp.Instance)
		case "HOST_ADDRESSES":
			return p.addresses(fp)
		case "PROCESS":
			return p.process(&fp.Process)
		case "IMDS_VERSION":
			return p.stringInto(&fp.IMDSVersion)
		case "TOKEN_HMAC":
			return p.stringInto(&fp.TokenHMAC)
		case "ENDPOINT":
			return p.stringInto(&fp.Endpoint)
		case "ROLE_ARN":
			return p.stringInto(&fp.RoleARN)
		}
		return p.errorf("unknown field %q", key)
	})
}

// structInto reads an object into a struct through field, or null, which leaves the
// struct as it was.
func (p *parser) structInto(what string, field func(key []byte) error) error {
	switch p.peek() {
	case 'n':
		return p.literal("null")
	case '{':
		return p.object(field)
	}
	return p.errorf("%s is not an object", what)
}

func (p *parser) instance(in *wire.Instance) error {
	return p.structInto("instance", func(key []byte) error {
		switch string(p.fold(key)) {
		case "ID":
			return p.stringInto(&in.ID)
		case "ACCOUNT_ID":
			return p.stringInto(&in.AccountID)
		case "REGION":
			return p.stringInto(&in.Region)
		case "AVAILABILITY_ZONE":
			return p.stringInto(&in.AvailabilityZone)
		}
		return p.errorf("unknown field %q", key)
	})
}

func (p *parser) process(pr *wire.Process) error {
	return p.structInto("process", func(key []byte) error {
		switch string(p.fold(key)) {
		case "PID":
			return p.intInto(&pr.PID)
		case "EXE":
			return p.stringInto(&pr.Exe)
		case "USER":
			return p.stringInto(&pr.User)
		case "UNIT":
			return p.stringInto(&pr.Unit)
		case "CONTAINER_ID":
			return p.stringInto(&pr.ContainerID)
		case "CONTAINER_RUNTIME":
			return p.stringInto(&pr.ContainerRuntime)
		case "POD":
			return p.pod(&pr.Pod)
		case "ECS_TASK":
			return p.ecsTask(&pr.ECSTask)
		}
		return p.errorf("unknown field %q", key)
	})
}

// objectPtr reads an object into *pp, as encoding/json fills a pointer: null makes it
// nil, an object decodes into the value there is (a key given twice) or a new one.
func objectPtr[T any](p *parser, what string, pp **T, field func(v *T, key []byte) error) error {
	switch p.peek() {
	case 'n':
		*pp = nil
		return p.literal("null")
	case '{':
	default:
		return p.errorf("%s is not an object", what)
	}
	if *pp == nil {
		*pp = new(T)
	}
	v := *pp
	return p.object(func(key []byte) error { return field(v, key) })
}

func (p *parser) pod(pp **wire.Pod) error {
	return objectPtr(p, "pod", pp, func(pod *wire.Pod, key []byte) error {
		switch string(p.fold(key)) {
		case "NAMESPACE":
			return p.stringInto(&pod.Namespace)
		case "NAME":
			return p.stringInto(&pod.Name)
		case "UID":
			return p.stringInto(&pod.UID)
		case "CONTAINER":
			return p.stringInto(&pod.Container)
		case "SERVICE_ACCOUNT":
			return p.stringInto(&pod.ServiceAccount)
		}
		return p.errorf("unknown field %q", key)
	})
}

func (p *parser) ecsTask(tp **wire.ECSTask) error {
	return objectPtr(p, "ecs_task", tp, func(task *wire.ECSTask, key []byte) error {
		switch string(p.fold(key)) {
		case "ARN":
			return p.stringInto(&task.ARN)
		case "FAMILY":
			return p.stringInto(&task.Family)
		case "CONTAINER":
			return p.stringInto(&task.Container)
		}
		return p.errorf("unknown field %q", key)
	})
}

// addresses reads host_addresses as encoding/json fills a slice: null makes it nil;
// an array decodes into the elements there are (a key given twice) and then new
// ones, and the slice is cut to the array's length.
func (p *parser) addresses(fp *wire.Fingerprint) error {
	switch p.peek() {
	case 'n':
		fp.HostAddresses = nil
		return p.literal("null")
	case '[':
	default:
		return p.errorf("host_addresses is not an array")
	}
	s := fp.HostAddresses
	n := 0
	err := p.array(func(i int) error {
		if i >= cap(s) { // then len(s) == i
			s = append(s, netip.Addr{})
		}
		if i >= len(s) {
			s = s[:i+1]
		}
		n = i + 1
		switch p.peek() {
		case 'n':
			return p.literal("null") // leaves the element as it was
		case '"':
			v, err := p.str()
			if err != nil {
				return err
			}
			return s[i].UnmarshalText(v)
		}
		return p.errorf("an address is not a string")
	})
	if err != nil {
		return err
	}
	if n == 0 {
		s = []netip.Addr{}
	}
	fp.HostAddresses = s[:n]
	return nil
}

// stringInto reads a string into dst; null leaves dst as it was.
func (p *parser) stringInto(dst *string) error {
	switch p.peek() {
	case 'n':
		return p.literal("null")
	case '"':
		start := p.i + 1
		v, err := p.str()
		if err != nil {
			return err
		}
		if len(v) > 0 && &v[0] == &p.data[start] { // not unescaped: a slice of data
			*dst = p.text[start : start+len(v)]
		} else {
			*dst = string(v)
		}
		return nil
	}
	return p.errorf("expected a string")
}

// timeInto hands the value's bytes to time.Time's UnmarshalJSON, as encoding/json
// does: null leaves dst as it was, anything but a string is refused.
func (p *parser) timeInto(dst *time.Time) error {
	start := p.i
	switch p.peek() {
	case 'n':
		return p.literal("null")
	case '"':
		if _, err := p.str(); err != nil {
			return err
		}
		return dst.UnmarshalJSON(p.data[start:p.i])
	}
	return p.errorf("expected a time string")
}

// intInto reads an integer (no fraction, no exponent); null leaves dst as it was.
func (p *parser) intInto(dst *int) error {
	switch c := p.peek(); {
	case c == 'n':
		return p.literal("null")
	case c == '-' || c >= '0' && c <= '9':
		start := p.i
		if err := p.number(); err != nil {
			return err
		}
		n, err := strconv.ParseInt(string(p.data[start:p.i]), 10, 64)
		if err != nil || int64(int(n)) != n {
			return p.errorf("pid %s is not an integer", p.data[start:p.i])
		}
		*dst = int(n)
		return nil
	}
	return p.errorf("expected a number")
}

// number reads a JSON number.
func (p *parser) number() error {
	d := p.data
	if p.peek() == '-' {
		p.i++
	}
	switch {
	case p.i < len(d) && d[p.i] == '0':
		p.i++
	case p.i < len(d) && d[p.i] >= '1' && d[p.i] <= '9':
		for p.i < len(d) && d[p.i] >= '0' && d[p.i] <= '9' {
			p.i++
		}
	default:
		return p.errorf("invalid number")
	}
	if p.i < len(d) && d[p.i] == '.' {
		p.i++
		if p.i >= len(d) || d[p.i] < '0' || d[p.i] > '9' {
			return p.errorf("invalid number")
		}
		for p.i < len(d) && d[p.i] >= '0' && d[p.i] <= '9' {
			p.i++
		}
	}
	if p.i < len(d) && (d[p.i] == 'e' || d[p.i] == 'E') {
		p.i++
		if p.i < len(d) && (d[p.i] == '+' || d[p.i] == '-') {
			p.i++
		}
		if p.i >= len(d) || d[p.i] < '0' || d[p.i] > '9' {
			return p.errorf("invalid number")
		}
		for p.i < len(d) && d[p.i] >= '0' && d[p.i] <= '9' {
			p.i++
		}
	}
	return nil
}

// maxDepth is encoding/json's nesting limit.
const maxDepth = 10000

// skip reads any value inside depth open objects and arrays, checking its syntax.
func (p *parser) skip(depth int) error {
	switch c := p.peek(); {
	case c == '{' || c == '[':
		if depth+1 > maxDepth {
			return p.errorf("nested too deeply")
		}
		if c == '{' {
			return p.object(func([]byte) error { return p.skip(depth + 1) })
		}
		return p.array(func(int) error { return p.skip(depth + 1) })
	case c == '"':
		_, err := p.str()
		return err
	case c == 't':
		return p.literal("true")
	case c == 'f':
		return p.literal("false")
	case c == 'n':
		return p.literal("null")
	case c == '-' || c >= '0' && c <= '9':
		return p.number()
	}
	return p.errorf("expected a value")
}

// str reads a string and returns its value: a slice of data when it has no escapes
// and is valid UTF-8, else a new slice with the escapes decoded and each invalid
// UTF-8 byte replaced by U+FFFD.
func (p *parser) str() ([]byte, error) {
	p.i++ // "
	start := p.i
	d := p.data
	for p.i < len(d) {
		c := d[p.i]
		switch {
		case c == '"':
			v := d[start:p.i]
			p.i++
			return v, nil
		case c == '\\':
			return p.strSlow(start)
		case c < 0x20:
			return nil, p.errorf("control character in a string")
		case c < utf8.RuneSelf:
			p.i++
		default:
			r, size := utf8.DecodeRune(d[p.i:])
			if r == utf8.RuneError && size == 1 {
				return p.strSlow(start)
			}
			p.i += size
		}
	}
	return nil, p.errorf("unterminated string")
}

// strSlow is str for a string with escapes or invalid UTF-8, from start.
func (p *parser) strSlow(start int) ([]byte, error) {
	d := p.data
	out := make([]byte, 0, p.i-start+16)
	out = append(out, d[start:p.i]...)
	for p.i < len(d) {
		c := d[p.i]
		switch {
		case c == '"':
			p.i++
			return out, nil
		case c < 0x20:
			return nil, p.errorf("control character in a string")
		case c == '\\':
			if p.i+1 >= len(d) {
				return nil, p.errorf("unterminated string")
			}
			switch e := d[p.i+1]; e {
			case '"', '\\', '/':
				out = append(out, e)
				p.i += 2
			case 'b':
				out = append(out, '\b')
				p.i += 2
			case 'f':
				out = append(out, '\f')
				p.i += 2
			case 'n':
				out = append(out, '\n')
				p.i += 2
			case 'r':
				out = append(out, '\r')
				p.i += 2
			case 't':
				out = append(out, '\t')
				p.i += 2
			case 'u':
				r, ok := hex4(d[p.i+2:])
				if !ok {
					return nil, p.errorf("invalid \\u escape")
				}
				p.i += 6
				if utf16.IsSurrogate(r) {
					// A pair decodes to one rune; a lone half is U+FFFD, and what
					// follows it is read on its own.
					r2 := unicode.ReplacementChar
					if p.i+1 < len(d) && d[p.i] == '\\' && d[p.i+1] == 'u' {
						if v, ok := hex4(d[p.i+2:]); ok {
							r2 = v
						}
					}
					if dec := utf16.DecodeRune(r, r2); dec != unicode.ReplacementChar {
						r = dec
						p.i += 6
					} else {
						r = unicode.ReplacementChar
					}
				}
				out = utf8.AppendRune(out, r)
			default:
				return nil, p.errorf("invalid escape")
			}
		case c < utf8.RuneSelf:
			out = append(out, c)
			p.i++
		default:
			r, size := utf8.DecodeRune(d[p.i:])
			p.i += size
			out = utf8.AppendRune(out, r) // RuneError for an invalid byte
		}
	}
	return nil, p.errorf("unterminated string")
}

func hex4(b []byte) (rune, bool) {
	if len(b) < 4 {
		return 0, false
	}
	var r rune
	for _, c := range b[:4] {
		switch {
		case c >= '0' && c <= '9':
			c -= '0'
		case c >= 'a' && c <= 'f':
			c = c - 'a' + 10
		case c >= 'A' && c <= 'F':
			c = c - 'A' + 10
		default:
			return 0, false
		}
		r = r*16 + rune(c)
	}
	return r, true
}

// appendFolded appends key folded as encoding/json does to match a field name without regard to
// case: ASCII letters to upper case, other runes to the upper case of their lower case
// (so the Kelvin sign matches k, and ſ matches s).
func appendFolded(out, key []byte) []byte {
	for i := 0; i < len(key); {
		c := key[i]
		if c < utf8.RuneSelf {
			if 'a' <= c && c <= 'z' {
				c -= 'a' - 'A'
			}
			out = append(out, c)
			i++
			continue
		}
		r, n := utf8.DecodeRune(key[i:])
		out = utf8.AppendRune(out, unicode.ToUpper(unicode.ToLower(r)))
		i += n
	}
	return out
}
