// Package doctable keeps the documentation's tables honest, for tests: it lists the keys
// a configuration struct accepts (its yaml tags) and the fields a JSON type writes (its
// json tags), reads the tables of a Markdown page that are marked as mirroring the code,
// and reports, by page and key, what one side has and the other lacks.
//
// A checked table is any Markdown table that follows a marker line
//
//	<!-- checked-table: NAME -->
//
// Its rows name keys in their first cell, in backticks (`imds.port`; a cell may name
// several: `type`, `severity`). Several tables may carry the same NAME; their rows add up.
package doctable

import (
	"bufio"
	"encoding"
	"encoding/json"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// YAMLKeys lists the full key of every leaf that the struct v (a value or a pointer)
// accepts, as its yaml tags name them: nested structs join with ".", a slice of structs
// adds "[]" (`rules[].exe`). Fields tagged "-" are skipped.
func YAMLKeys(v any) []string { return keys(reflect.TypeOf(v), "yaml") }

// JSONKeys is YAMLKeys for json tags: the fields a value of v's type is written with.
// Types that marshal themselves (time.Time, netip.Addr) are leaves.
func JSONKeys(v any) []string { return keys(reflect.TypeOf(v), "json") }

func keys(t reflect.Type, tag string) []string {
	var out []string
	walk(t, tag, "", &out)
	slices.Sort(out)
	return out
}

var (
	jsonMarshaler = reflect.TypeFor[json.Marshaler]()
	textMarshaler = reflect.TypeFor[encoding.TextMarshaler]()
)

func walk(t reflect.Type, tag, prefix string, out *[]string) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	leaf := t.Implements(jsonMarshaler) || t.Implements(textMarshaler) ||
		reflect.PointerTo(t).Implements(jsonMarshaler) || reflect.PointerTo(t).Implements(textMarshaler)
	switch {
	case leaf:
		*out = append(*out, prefix)
	case t.Kind() == reflect.Struct:
		for i := range t.NumField() {
			f := t.Field(i)
			if !f.IsExported() {
				continue
			}
			name, _, _ := strings.Cut(f.Tag.Get(tag), ",")
			if name == "-" {
				continue
			}
			if name == "" {
				name = strings.ToLower(f.Name)
			}
			if prefix != "" {
				name = prefix + "." + name
			}
			walk(f.Type, tag, name, out)
		}
	case t.Kind() == reflect.Slice && elemIsStruct(t.Elem()):
		walk(t.Elem(), tag, prefix+"[]", out)
	default:
		*out = append(*out, prefix)
	}
}

func elemIsStruct(t reflect.Type) bool {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Implements(jsonMarshaler) || t.Implements(textMarshaler) || reflect.PointerTo(t).Implements(textMarshaler) {
		return false
	}
	return t.Kind() == reflect.Struct
}

// Row is one row of a checked table.
type Row struct {
	Line  int      // in the page, from 1
	Keys  []string // the backticked names of the first cell
	Cells []string // every cell, trimmed, the first included
}

var (
	markerRE   = regexp.MustCompile(`^<!--\s*checked-table:\s*([\w.-]+)\s*-->\s*$`)
	backtickRE = regexp.MustCompile("`([^`]+)`")
	separator  = regexp.MustCompile(`^\|[\s:|-]+\|$`)
)

// Table returns the rows of every table in page marked with name. It fails the test when
// the page cannot be read or holds no such table.
func Table(t testing.TB, page, name string) []Row {
	t.Helper()
	f, err := os.Open(page)
	if err != nil {
		t.Fatalf("%s: %v", page, err)
	}
	defer f.Close()
	var rows []Row
	found, in, header := false, false, false
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if m := markerRE.FindStringSubmatch(line); m != nil {
			in, header = m[1] == name, false
			found = found || in
			continue
		}
		if !in {
			continue
		}
		if !strings.HasPrefix(line, "|") {
			if header { // the table has ended
				in = false
			}
			continue
		}
		if !header { // the header row
			header = true
			continue
		}
		if separator.MatchString(line) {
			continue
		}
		cells := splitRow(line)
		r := Row{Line: n, Cells: cells}
		for _, m := range backtickRE.FindAllStringSubmatch(cells[0], -1) {
			r.Keys = append(r.Keys, m[1])
		}
		rows = append(rows, r)
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("%s: %v", page, err)
	}
	if !found {
		t.Fatalf("%s: no table marked <!-- checked-table: %s -->; the page must keep it", page, name)
	}
	return rows
}

// splitRow splits "| a | b \| c |" into cells, keeping escaped pipes inside a cell.
func splitRow(line string) []string {
	line = strings.TrimSuffix(strings.TrimPrefix(line, "|"), "|")
	var cells []string
	var cur strings.Builder
	for i := 0; i < len(line); i++ {
		switch {
		case line[i] == '\\' && i+1 < len(line) && line[i+1] == '|':
			cur.WriteByte('|')
			i++
		case line[i] == '|':
			cells = append(cells, strings.TrimSpace(cur.String()))
			cur.Reset()
		default:
			cur.WriteByte(line[i])
		}
	}
	return append(cells, strings.TrimSpace(cur.String()))
}

// Compare checks that the table marked name in page has a row for every key of code and
// none for a key code lacks. what says where the keys come from (e.g. "config.Config's
// yaml tags"), so that the message tells an engineer which side to fix.
func Compare(t testing.TB, page, name string, code []string, what string) {
	t.Helper()
	documented := map[string]int{}
	for _, r := range Table(t, page, name) {
		if len(r.Keys) == 0 {
			t.Errorf("%s:%d: a row of table %q names no `key` in its first cell", page, r.Line, name)
		}
		for _, k := range r.Keys {
			if prev, dup := documented[k]; dup {
				t.Errorf("%s:%d: `%s` is already documented on line %d", page, r.Line, k, prev)
			}
			documented[k] = r.Line
		}
	}
	inCode := map[string]bool{}
	for _, k := range code {
		inCode[k] = true
		if _, ok := documented[k]; !ok {
			t.Errorf("%s: `%s` (from %s) is missing from the table marked <!-- checked-table: %s -->: add a row that says what it does", page, k, what, name)
		}
	}
	for k, line := range documented {
		if !inCode[k] {
			t.Errorf("%s:%d: `%s` is documented in table %q but %s has no such key: remove the row or fix its name", page, line, k, name, what)
		}
	}
}
