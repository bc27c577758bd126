package config

import (
	"fmt"
	"reflect"
	"sort"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// schema is the tree of keys a file may contain, taken from the yaml tags of Config so
// the two cannot drift apart.
type schema map[string]schema

func reflectKeys() schema { return keysOf(reflect.TypeOf(Config{})) }

var durationType = reflect.TypeOf(time.Duration(0))

func keysOf(t reflect.Type) schema {
	if t.Kind() == reflect.Slice {
		t = t.Elem() // a list of mappings: each element has the element's keys
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
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	if s == nil {
		return nil
	}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
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

// lineOf finds the line of a dotted key in the parsed file, 0 when the key is absent
// (its value then came from the defaults).
func lineOf(root *yaml.Node, key string) int {
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	line := 0
	for _, part := range strings.Split(key, ".") {
		idx := -1
		if open := strings.IndexByte(part, '['); open > 0 && strings.HasSuffix(part, "]") {
			fmt.Sscanf(part[open+1:len(part)-1], "%d", &idx)
			part = part[:open]
		}
		if n.Kind != yaml.MappingNode {
			return 0
		}
		found := false
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == part {
				line, n, found = n.Content[i].Line, n.Content[i+1], true
				break
			}
		}
		if !found {
			return 0
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

// String renders the effective configuration, for check-config.
func (c Config) String() string {
	out, err := yaml.Marshal(c)
	if err != nil {
		return fmt.Sprintf("marshal config: %v", err)
	}
	return string(out)
}

// keyAtLine names the dotted key whose value starts on line, for decoder errors that
// only carry a line number.
func keyAtLine(root *yaml.Node, line int) string {
	var walk func(n *yaml.Node, prefix string) string
	walk = func(n *yaml.Node, prefix string) string {
		if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
			return walk(n.Content[0], prefix)
		}
		if n.Kind == yaml.SequenceNode {
			for i, item := range n.Content {
				if found := walk(item, fmt.Sprintf("%s[%d].", strings.TrimSuffix(prefix, "."), i)); found != "" {
					return found
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
