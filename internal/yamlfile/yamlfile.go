// Package yamlfile decodes configuration files strictly: an unknown key, a wrong type or
// a bad value is an error that names the file, the line and the full key
// (`rules[1].exe`), so an operator can fix a file without guessing. The agent's and the
// correlator's configurations both read through it.
package yamlfile

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Error is a configuration problem tied to a key and, when known, a line.
type Error struct {
	File string
	Line int
	Key  string
	Msg  string
}

func (e *Error) Error() string {
	var b strings.Builder
	if e.File != "" {
		b.WriteString(e.File)
		b.WriteString(":")
	}
	if e.Line > 0 {
		fmt.Fprintf(&b, "%d:", e.Line)
	}
	if b.Len() > 0 {
		b.WriteString(" ")
	}
	if e.Key != "" {
		fmt.Fprintf(&b, "%s: ", e.Key)
	}
	b.WriteString(e.Msg)
	return b.String()
}

// WithFile names path in err when it is an *Error.
func WithFile(err error, path string) error {
	var ye *Error
	if errors.As(err, &ye) {
		ye.File = path
	}
	return err
}

// Validator is a configuration that checks its decoded values; root is the parsed
// document, so that an error can name the line (see Errorf).
type Validator interface {
	Validate(root *yaml.Node) error
}

// Parse decodes data over the defaults in def, refusing unknown keys and wrong types,
// then validates the result.
func Parse[T any, PT interface {
	*T
	Validator
}](data []byte, def T) (T, error) {
	cfg := def
	root, err := Decode(data, &cfg)
	if err != nil {
		var zero T
		return zero, err
	}
	if err := PT(&cfg).Validate(root); err != nil {
		var zero T
		return zero, err
	}
	return cfg, nil
}

// Load reads the file at path and parses it as Parse does; errors name the file.
func Load[T any, PT interface {
	*T
	Validator
}](path string, def T) (T, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		var zero T
		return zero, fmt.Errorf("read config: %w", err)
	}
	cfg, err := Parse[T, PT](data, def)
	return cfg, WithFile(err, path)
}

// Decode decodes data into out (a pointer to a struct holding the defaults), refusing
// keys out's yaml tags do not name. It returns the parsed document, for Errorf.
func Decode(data []byte, out any) (*yaml.Node, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, fromYAML(err)
	}
	if len(root.Content) == 0 {
		return &root, nil
	}
	if err := checkKeys(root.Content[0], keysOf(reflect.TypeOf(out).Elem()), ""); err != nil {
		return nil, err
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(out); err != nil && !errors.Is(err, io.EOF) {
		ye := fromYAML(err)
		ye.Key = keyAtLine(&root, ye.Line)
		return nil, ye
	}
	return &root, nil
}

// Errorf is an error about key (`a.b`, `list[2].c`), at its line in root when present.
func Errorf(root *yaml.Node, key, format string, args ...any) *Error {
	return &Error{Line: LineOf(root, key), Key: key, Msg: fmt.Sprintf(format, args...)}
}

// fromYAML turns yaml.v3's "yaml: line N: msg" into an Error with the line.
func fromYAML(err error) *Error {
	var te *yaml.TypeError
	if errors.As(err, &te) && len(te.Errors) > 0 {
		err = errors.New(te.Errors[0])
	}
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	var line int
	if n, _ := fmt.Sscanf(msg, "line %d:", &line); n == 1 {
		msg = strings.TrimSpace(msg[strings.Index(msg, ":")+1:])
	}
	return &Error{Line: line, Msg: msg}
}

// schema is the tree of keys a file may contain, taken from the yaml tags so the two
// cannot drift apart.
type schema map[string]schema

var durationType = reflect.TypeOf(time.Duration(0))

func keysOf(t reflect.Type) schema {
	if t.Kind() == reflect.Slice {
		t = t.Elem() // a list of mappings: each element has the element's keys
	}
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct || t == durationType {
		return nil
	}
	s := schema{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "" || name == "-" {
			continue
		}
		s[name] = keysOf(f.Type)
	}
	return s
}

// checkKeys refuses keys the schema does not know, naming the full key and its line.
func checkKeys(n *yaml.Node, s schema, prefix string) error {
	if s == nil || (n.Kind == yaml.ScalarNode && n.Tag == "!!null") {
		return nil
	}
	if n.Kind == yaml.SequenceNode {
		for i, item := range n.Content {
			if err := checkKeys(item, s, fmt.Sprintf("%s[%d].", strings.TrimSuffix(prefix, "."), i)); err != nil {
				return err
			}
		}
		return nil
	}
	if n.Kind != yaml.MappingNode {
		key := strings.TrimSuffix(prefix, ".")
		if key == "" {
			key = "(top level)"
		}
		return &Error{Line: n.Line, Key: key, Msg: "must be a mapping of keys to values"}
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		sub, ok := s[k.Value]
		if !ok {
			return &Error{Line: k.Line, Key: prefix + k.Value, Msg: "unknown key (known: " + known(s) + ")"}
		}
		if err := checkKeys(v, sub, prefix+k.Value+"."); err != nil {
			return err
		}
	}
	return nil
}

func known(s schema) string {
	names := make([]string, 0, len(s))
	for k := range s {
		names = append(names, k)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// LineOf finds the line of a dotted key (`a.b`, `list[2].c`) in root, 0 when absent
// (its value then came from the defaults).
func LineOf(root *yaml.Node, key string) int {
	if root == nil {
		return 0
	}
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	line := 0
	for _, part := range strings.Split(key, ".") {
		idx := -1
		if open := strings.IndexByte(part, '['); open > 0 && strings.HasSuffix(part, "]") {
			if n, err := strconv.Atoi(part[open+1 : len(part)-1]); err == nil {
				idx = n
			}
			part = part[:open]
		}
		if n.Kind != yaml.MappingNode {
			return line
		}
		found := false
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == part {
				line, n, found = n.Content[i].Line, n.Content[i+1], true
				break
			}
		}
		if !found {
			return line
		}
		if idx >= 0 {
			if n.Kind != yaml.SequenceNode || idx >= len(n.Content) {
				return line
			}
			n = n.Content[idx]
			line = n.Line
		}
	}
	return line
}

// keyAtLine names the key whose value starts on line, for decoder errors that only
// carry a line number.
func keyAtLine(root *yaml.Node, line int) string {
	var walk func(n *yaml.Node, prefix string) string
	walk = func(n *yaml.Node, prefix string) string {
		if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
			return walk(n.Content[0], prefix)
		}
		if n.Kind == yaml.SequenceNode {
			for i, item := range n.Content {
				p := fmt.Sprintf("%s[%d]", strings.TrimSuffix(prefix, "."), i)
				if found := walk(item, p+"."); found != "" {
					return found
				}
				if item.Line == line {
					return p
				}
			}
			return ""
		}
		if n.Kind != yaml.MappingNode {
			return ""
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if found := walk(v, prefix+k.Value+"."); found != "" {
				return found
			}
			if k.Line == line || v.Line == line {
				return prefix + k.Value
			}
		}
		return ""
	}
	return walk(root, "")
}
