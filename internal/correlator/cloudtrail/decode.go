package cloudtrail

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"unicode/utf8"
)

// This file decodes one record in a single pass over bytes in memory, filling only the
// fields of Record and skipping the rest of the record after checking its syntax. It
// follows encoding/json to the letter on what it accepts and how it fills the fields
// (keys matched exactly, then case-insensitively; the last of duplicate keys wins; null
// leaves a string unchanged; invalid UTF-8 becomes U+FFFD; nesting deeper than 10000 is
// an error), so that the records and the problems are the same as with encoding/json,
// which still produces the error text when a record is bad: errors are rare, and its
// messages are the ones users know. The fuzz test holds the two against each other.

var (
	// errMore: the value goes on past the bytes in memory, and more may come.
	errMore = errors.New("value continues past the buffer")
	// errSyntax: the bytes are not JSON; encoding/json says why.
	errSyntax = errors.New("syntax error")
	// errEnd: the input ends inside the value.
	errEnd = errors.New("input ends inside the value")
)

// maxDepth is encoding/json's limit on nesting.
const maxDepth = 10000

// parser reads one JSON value from b starting at i.
type parser struct {
	b     []byte
	i     int
	final bool // nothing follows b
	depth int
	// err stops the parse: errMore, errSyntax or errEnd.
	err error
	// strs, when not nil, keeps one copy of the strings that repeat from record to record.
	strs *repeats
	// typeErr is set when a value had the wrong type for its field. encoding/json goes
	// on filling the other fields and reports the first such error at the end; so does
	// the parser, and the record is then bad.
	typeErr bool
}

// short records that the value ran past the end of b.
func (p *parser) short() {
	if p.final {
		p.err = errEnd
	} else {
		p.err = errMore
	}
}

// ws skips white space; false (with err set) when b ends first.
func (p *parser) ws() bool {
	for p.i < len(p.b) {
		switch p.b[p.i] {
		case ' ', '\t', '\r', '\n':
			p.i++
		default:
			return true
		}
	}
	p.short()
	return false
}

// strEnd marks the bytes that end or interrupt the fast scan of a string.
var strEnd = func() (t [256]bool) {
	for c := range 0x20 {
		t[c] = true
	}
	t['"'], t['\\'] = true, true
	for c := 0x80; c < 256; c++ {
		t[c] = true
	}
	return t
}()

// str reads a string whose opening quote is at i. It returns the bytes between the
// quotes and whether they need encoding/json's unquoting (escapes or non-ASCII).
func (p *parser) str() (body []byte, slow bool) {
	start := p.i + 1
	i := start
	b := p.b
	for {
		for i+8 <= len(b) && plainWord(binary.LittleEndian.Uint64(b[i:])) {
			i += 8
		}
		for i < len(b) && !strEnd[b[i]] {
			i++
		}
		if i >= len(b) {
			p.i = i
			p.short()
			return nil, false
		}
		switch c := b[i]; {
		case c == '"':
			p.i = i + 1
			return b[start:i], slow
		case c == '\\':
			slow = true
			i++
			if i >= len(b) {
				p.i = i
				p.short()
				return nil, false
			}
			switch b[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i++
			case 'u':
				i++
				for range 4 {
					if i >= len(b) {
						p.i = i
						p.short()
						return nil, false
					}
					if !isHex(b[i]) {
						p.err = errSyntax
						return nil, false
					}
					i++
				}
			default:
				p.err = errSyntax
				return nil, false
			}
		case c < 0x20:
			p.err = errSyntax
			return nil, false
		default: // non-ASCII: valid or not, the scanner takes it
			slow = true
			i++
		}
	}
}

// plainWord reports whether none of the 8 bytes in w ends or interrupts the fast scan
// of a string (a quote, a backslash, a control character, a non-ASCII byte), testing
// them all at once: a byte is zero in x exactly when (x-1) &^ x has its top bit set.
func plainWord(w uint64) bool {
	const ones, tops = 0x0101010101010101, 0x8080808080808080
	quote := w ^ ('"' * ones)
	backslash := w ^ ('\\' * ones)
	control := (w - 0x20*ones) &^ w // top bit set for bytes below 0x20 (and any above 0x7f)
	return ((quote-ones)&^quote|(backslash-ones)&^backslash|control|w)&tops == 0
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

// text turns the body of a string into a Go string as encoding/json would.
func text(body []byte, slow bool) string {
	if !slow || !bytes.ContainsRune(body, '\\') && utf8.Valid(body) {
		return string(body)
	}
	quoted := make([]byte, 0, len(body)+2)
	quoted = append(append(append(quoted, '"'), body...), '"')
	var s string
	if err := json.Unmarshal(quoted, &s); err != nil {
		return string(body) // the parser already checked it; unreachable
	}
	return s
}

// literal reads true, false or null.
func (p *parser) literal(word string) {
	for k := 0; k < len(word); k++ {
		if p.i+k >= len(p.b) {
			p.i += k
			p.short()
			return
		}
		if p.b[p.i+k] != word[k] {
			p.err = errSyntax
			return
		}
	}
	p.i += len(word)
}

// number reads a JSON number. At the end of b it needs to see what follows, unless
// nothing does.
func (p *parser) number() {
	b, i := p.b, p.i
	digits := func() int {
		n := 0
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
			n++
		}
		return n
	}
	// more reports whether b ended where the number could go on.
	more := func() bool {
		if i < len(b) {
			return false
		}
		p.i = i
		p.short()
		return true
	}
	if b[i] == '-' {
		i++
		if more() {
			return
		}
	}
	switch {
	case b[i] == '0':
		i++
	case b[i] >= '1' && b[i] <= '9':
		digits()
	default:
		p.err = errSyntax
		return
	}
	if i >= len(b) {
		if !p.final {
			p.i = i
			p.err = errMore
		}
		p.i = i
		return
	}
	if b[i] == '.' {
		i++
		if more() {
			return
		}
		if digits() == 0 {
			p.err = errSyntax
			return
		}
		if i >= len(b) {
			p.i = i
			if !p.final {
				p.err = errMore
			}
			return
		}
	}
	if b[i] == 'e' || b[i] == 'E' {
		i++
		if more() {
			return
		}
		if b[i] == '+' || b[i] == '-' {
			i++
			if more() {
				return
			}
		}
		if digits() == 0 {
			p.err = errSyntax
			return
		}
		if i >= len(b) && !p.final {
			p.i = i
			p.err = errMore
			return
		}
	}
	p.i = i
}

// skip reads any value without keeping it.
func (p *parser) skip() {
	if !p.ws() {
		return
	}
	switch c := p.b[p.i]; {
	case c == '{':
		p.object(func(key []byte, slow bool) { p.skip() })
	case c == '[':
		p.array()
	case c == '"':
		p.str()
	case c == '-' || c >= '0' && c <= '9':
		p.number()
	case c == 't':
		p.literal("true")
	case c == 'f':
		p.literal("false")
	case c == 'n':
		p.literal("null")
	default:
		p.err = errSyntax
	}
}

// open enters an object or array whose opening bracket is at i.
func (p *parser) open() bool {
	p.depth++
	if p.depth > maxDepth {
		p.err = errSyntax
		return false
	}
	p.i++
	return true
}

// array reads an array whose '[' is at i, skipping its elements.
func (p *parser) array() {
	if !p.open() || !p.ws() {
		return
	}
	if p.b[p.i] == ']' {
		p.i++
		p.depth--
		return
	}
	for {
		if p.skip(); p.err != nil || !p.ws() {
			return
		}
		if !p.sep(']') {
			return
		}
	}
}

// sep reads what follows a member or element: ',' (another follows: true) or end, the
// container's closing byte (it is done: false); anything else is a syntax error.
func (p *parser) sep(end byte) bool {
	switch p.b[p.i] {
	case ',':
		p.i++
		return true
	case end:
		p.i++
		p.depth--
	default:
		p.err = errSyntax
	}
	return false
}

// object reads an object whose '{' is at i, calling member with each key (see str)
// when the parser stands just before the key's value; member must read the value.
func (p *parser) object(member func(key []byte, slow bool)) {
	if !p.open() || !p.ws() {
		return
	}
	if p.b[p.i] == '}' {
		p.i++
		p.depth--
		return
	}
	for {
		if !p.ws() {
			return
		}
		if p.b[p.i] != '"' {
			p.err = errSyntax
			return
		}
		key, slow := p.str()
		if p.err != nil || !p.ws() {
			return
		}
		if p.b[p.i] != ':' {
			p.err = errSyntax
			return
		}
		p.i++
		if member(key, slow); p.err != nil || !p.ws() {
			return
		}
		if !p.sep('}') {
			return
		}
	}
}

// structValue reads the value of a field of struct type: an object goes to member,
// null leaves the field alone, anything else is a type error.
func (p *parser) structValue(member func(key []byte, slow bool)) {
	if !p.ws() {
		return
	}
	switch p.b[p.i] {
	case '{':
		p.object(member)
	case 'n':
		p.literal("null")
	default:
		p.typeErr = true
		p.skip()
	}
}

// repeats keeps one copy of each of the first values of the string fields that repeat
// (event names and sources, regions, accounts, roles, user agents…), so that a record
// allocates only for what is new in it.
type repeats struct {
	m map[string]string
}

// maxStrings bounds the copies kept by one reader.
const maxStrings = 8192

func (c *repeats) get(body []byte) string {
	if s, ok := c.m[string(body)]; ok {
		return s
	}
	s := string(body)
	if c.m == nil {
		c.m = make(map[string]string)
	}
	if len(c.m) < maxStrings {
		c.m[s] = s
	}
	return s
}

// stringValue reads the value of a string field whose values repeat.
func (p *parser) stringValue(dst *string) {
	p.stringField(dst, p.strs)
}

// uniqueValue reads the value of a string field that is new in every record.
func (p *parser) uniqueValue(dst *string) {
	p.stringField(dst, nil)
}

func (p *parser) stringField(dst *string, strs *repeats) {
	if !p.ws() {
		return
	}
	switch p.b[p.i] {
	case '"':
		body, slow := p.str()
		switch {
		case p.err != nil:
		case !slow && strs != nil:
			*dst = strs.get(body)
		default:
			*dst = text(body, slow)
		}
	case 'n':
		p.literal("null")
	default:
		p.typeErr = true
		p.skip()
	}
}

// rawValue reads a value into a json.RawMessage field (null included, as "null").
func (p *parser) rawValue(dst *json.RawMessage) {
	if !p.ws() {
		return
	}
	start := p.i
	if p.skip(); p.err == nil {
		*dst = append((*dst)[:0], p.b[start:p.i]...)
	}
}

// fields names the JSON keys of one struct; a key's index is its field.
type fields []string

// find returns the field a key fills, -1 for none: the exact name, else one equal under
// Unicode case folding, as encoding/json does.
func (fs fields) find(key []byte, slow bool) int {
	for n, f := range fs {
		if string(key) == f {
			return n
		}
	}
	if slow {
		k := []byte(text(key, slow))
		for n, f := range fs {
			if bytes.EqualFold(k, []byte(f)) {
				return n
			}
		}
		return -1
	}
	for n, f := range fs {
		if len(f) == len(key) && asciiEqualFold(key, f) {
			return n
		}
	}
	return -1
}

func asciiEqualFold(a []byte, b string) bool {
	for i := range len(a) {
		x, y := a[i], b[i]
		if 'a' <= x && x <= 'z' {
			x -= 'a' - 'A'
		}
		if 'a' <= y && y <= 'z' {
			y -= 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// The keys of Record and the structs in it, in the order of the switches below.
var (
	recordFields = fields{"eventVersion", "userIdentity", "eventTime", "eventSource", "eventName", "awsRegion",
		"sourceIPAddress", "userAgent", "errorCode", "requestParameters", "responseElements", "eventID",
		"recipientAccountId", "vpcEndpointId", "vpcEndpointAccountId", "@timestamp", "detail"}
	identityFields = fields{"type", "principalId", "arn", "accountId", "accessKeyId", "invokedBy", "sessionContext"}
	contextFields  = fields{"sessionIssuer", "ec2RoleDelivery"}
	issuerFields   = fields{"type", "arn", "accountId", "userName"}
)

// record reads a record into r. detail is non-nil for an EventBridge event (the
// eventBridge type): its "detail" member is a record of its own.
func (p *parser) record(r *Record, detail **Record) {
	if !p.ws() {
		return
	}
	switch p.b[p.i] {
	case '{':
	case 'n':
		p.literal("null")
		return
	default:
		p.typeErr = true
		p.skip()
		return
	}
	p.object(func(key []byte, slow bool) {
		f := recordFields.find(key, slow)
		if f == 16 && detail == nil {
			f = -1
		}
		switch f {
		case 0:
			p.stringValue(&r.EventVersion)
		case 1:
			p.structValue(func(key []byte, slow bool) { p.identity(&r.UserIdentity, key, slow) })
		case 2:
			p.uniqueValue(&r.EventTime)
		case 3:
			p.stringValue(&r.EventSource)
		case 4:
			p.stringValue(&r.EventName)
		case 5:
			p.stringValue(&r.AWSRegion)
		case 6:
			p.uniqueValue(&r.SourceIPAddress)
		case 7:
			p.stringValue(&r.UserAgent)
		case 8:
			p.stringValue(&r.ErrorCode)
		case 9:
			p.rawValue(&r.RequestParameters)
		case 10:
			p.rawValue(&r.ResponseElements)
		case 11:
			p.uniqueValue(&r.EventID)
		case 12:
			p.stringValue(&r.RecipientAccountID)
		case 13:
			p.stringValue(&r.VPCEndpointID)
		case 14:
			p.stringValue(&r.VPCEndpointAccountID)
		case 15:
			p.uniqueValue(&r.Timestamp)
		case 16:
			p.detail(detail)
		default:
			p.skip()
		}
	})
}

// detail reads an EventBridge event's detail: null clears it, an object fills it (the
// record already there, for a repeated key).
func (p *parser) detail(d **Record) {
	if !p.ws() {
		return
	}
	switch p.b[p.i] {
	case 'n':
		if p.literal("null"); p.err == nil {
			*d = nil
		}
	case '{':
		if *d == nil {
			*d = new(Record)
		}
		p.record(*d, nil)
	default:
		p.typeErr = true
		p.skip()
	}
}

func (p *parser) identity(u *UserIdentity, key []byte, slow bool) {
	switch identityFields.find(key, slow) {
	case 0:
		p.stringValue(&u.Type)
	case 1:
		p.uniqueValue(&u.PrincipalID)
	case 2:
		p.uniqueValue(&u.ARN)
	case 3:
		p.stringValue(&u.AccountID)
	case 4:
		p.uniqueValue(&u.AccessKeyID)
	case 5:
		p.stringValue(&u.InvokedBy)
	case 6:
		p.structValue(func(key []byte, slow bool) { p.sessionContext(&u.SessionContext, key, slow) })
	default:
		p.skip()
	}
}

func (p *parser) sessionContext(s *SessionContext, key []byte, slow bool) {
	switch contextFields.find(key, slow) {
	case 0:
		si := &s.SessionIssuer
		p.structValue(func(key []byte, slow bool) {
			switch issuerFields.find(key, slow) {
			case 0:
				p.stringValue(&si.Type)
			case 1:
				p.stringValue(&si.ARN)
			case 2:
				p.stringValue(&si.AccountID)
			case 3:
				p.stringValue(&si.UserName)
			default:
				p.skip()
			}
		})
	case 1:
		p.stringValue(&s.EC2RoleDelivery)
	default:
		p.skip()
	}
}
