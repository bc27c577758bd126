package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCLI(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(good, []byte("imds:\n  port: 8080\n"), 0o600)
	os.WriteFile(bad, []byte("imds:\n  port: 80\n  colour: blue\n"), 0o600)
	// A rule naming a script (as /usr/bin/aws is) never matches: the kernel sees the
	// interpreter. A rule naming a binary is fine.
	script, binary := filepath.Join(dir, "aws"), filepath.Join(dir, "tool")
	os.WriteFile(script, []byte("#!/usr/bin/python3\nprint('hi')\n"), 0o755)
	os.WriteFile(binary, []byte("\x7fELF\x02\x01"), 0o755)
	rule := "rules:\n  - name: cli\n    exe: %s\n    action: allow\n"
	scriptRule, binaryRule := filepath.Join(dir, "script.yaml"), filepath.Join(dir, "binary.yaml")
	os.WriteFile(scriptRule, []byte(fmt.Sprintf(rule, script)), 0o600)
	os.WriteFile(binaryRule, []byte(fmt.Sprintf(rule, binary)), 0o600)
	v2 := filepath.Join(dir, "v2.yaml")
	os.WriteFile(v2, []byte("rules:\n  - name: app\n    user: root\n    action: allow\n    imdsv2: required\n"), 0o600)
	cases := []struct {
		args        []string
		code        int
		out, errOut string
	}{
		{nil, 2, "", "Usage:"},
		{[]string{"version"}, 0, "imdsguard ", ""},
		{[]string{"frobnicate"}, 2, "", `unknown command "frobnicate"`},
		{[]string{"check-config"}, 2, "", "exactly one file"},
		{[]string{"check-config", good}, 0, "port: 8080", ""},
		{[]string{"check-config", v2}, 0, "note: rules[0] (app): imdsv2: required is kept by the broker, so connections this rule allows that cannot be brokered are refused", ""},
		{[]string{"check-config", bad}, 1, "", bad + ":3: imds.colour: unknown key"},
		{[]string{"check-config", filepath.Join(dir, "none.yaml")}, 1, "", "no such file"},
		{[]string{"check-config", scriptRule}, 1, "", scriptRule + ":3: rules[0].exe: " + script + " is a script (#!/usr/bin/python3): the kernel runs its interpreter"},
		{[]string{"check-config", binaryRule}, 0, "exe: " + binary, ""},
		{[]string{"run", "--config", bad}, 1, "", "imds.colour: unknown key"},
		{[]string{"run", "--bogus"}, 2, "", "flag provided but not defined"},
		{[]string{"run", "extra"}, 2, "", `unexpected argument "extra"`},
		{[]string{"preflight", "--config", filepath.Join(dir, "none.yaml")}, 1, "", "preflight: read config"},
		{[]string{"preflight", "extra"}, 2, "", `unexpected argument "extra"`},
		{[]string{"preflight", "--config", bad}, 1, "", "imds.colour: unknown key"},
	}
	for _, c := range cases {
		var out, errOut bytes.Buffer
		code := run(c.args, &out, &errOut)
		if code != c.code || !strings.Contains(out.String(), c.out) || !strings.Contains(errOut.String(), c.errOut) {
			t.Errorf("imdsguard %v: code %d\nstdout: %s\nstderr: %s", c.args, code, out.String(), errOut.String())
		}
	}
}
