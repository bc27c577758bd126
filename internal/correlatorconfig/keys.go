package correlatorconfig

import (
	"fmt"
	"reflect"
	"sort"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// schema is the tree of keys a file may contain, taken from the yaml tags of Config so
// the two cannot drift apart. A list of mappings has the schema of its elements.
type schema map[string]schema

func reflectKeys() schema { return keysOf(reflect.TypeOf(Config{})) }

var durationType = reflect.TypeOf(time.Duration(0))

func keysOf(t reflect.Type) schema {
	if t.Kind() == reflect.Slice {
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

// valueOf finds the value node of a dotted key, nil when absent.
func valueOf(root *yaml.Node, key string) (keyLine int, v *yaml.Node) {
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	for _, part := range strings.Split(key, ".") {
		if n.Kind != yaml.MappingNode {
			return 0, nil
		}
		found := false
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == part {
				keyLine, n, found = n.Content[i].Line, n.Content[i+1], true
				break
			}
		}
		if !found {
			return 0, nil
		}
	}
	return keyLine, n
}

// lineOf finds the line of a dotted key in the parsed file, 0 when the key is absent
// (its value then came from the defaults).
func lineOf(root *yaml.Node, key string) int {
	line, _ := valueOf(root, key)
	return line
}

// itemLine is the line of the i-th element of the list at key.
func itemLine(root *yaml.Node, key string, i int) int {
	line, v := valueOf(root, key)
	if v != nil && v.Kind == yaml.SequenceNode && i < len(v.Content) {
		return v.Content[i].Line
	}
	return line
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
