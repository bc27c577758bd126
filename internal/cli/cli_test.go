package cli

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestRunExitCodesAndUsage(t *testing.T) {
	p := Program{Name: "prog", Usage: "Usage: prog ok|fail|bad\n", Version: "1.2.3", Commands: map[string]func([]string) error{
		"ok":   func([]string) error { return nil },
		"fail": func([]string) error { return errors.New("disk on fire") },
		"bad":  func(a []string) error { return Usagef("bad takes no %q", a[0]) },
	}}
	for _, c := range []struct {
		args           []string
		code           int
		stdout, stderr string
	}{
		{nil, 2, "", "Usage: prog"},
		{[]string{"ok"}, 0, "", ""},
		{[]string{"fail"}, 1, "", "prog: disk on fire\n"},
		{[]string{"bad", "x"}, 2, "", "prog: usage: bad takes no \"x\"\n\nUsage: prog"},
		{[]string{"nope"}, 2, "", "unknown command \"nope\""},
		{[]string{"version"}, 0, "prog 1.2.3\n", ""},
		{[]string{"--help"}, 0, "Usage: prog", ""},
	} {
		var out, errb bytes.Buffer
		code := p.Run(c.args, &out, &errb)
		if code != c.code || !strings.Contains(out.String(), c.stdout) || !strings.Contains(errb.String(), c.stderr) ||
			(c.stderr == "" && errb.Len() > 0) {
			t.Errorf("%v: code %d stdout %q stderr %q", c.args, code, out.String(), errb.String())
		}
	}
}
