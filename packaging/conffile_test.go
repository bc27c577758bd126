package packaging

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/testing/doctable"
)

// In config.yaml, a commented-out setting is "#" followed directly by the YAML line
// ("#cgroup: x", "#  ipv4: y"); prose is "# " and text, or a lone "#".
var settingRE = regexp.MustCompile(`^#(\S|  )`)

// uncomment returns config.yaml with its commented-out settings turned into YAML.
func uncomment(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile("config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(data), "\n")
	for i, l := range lines {
		if settingRE.MatchString(l) {
			lines[i] = l[1:]
		}
	}
	return lines
}

// The conffile holds every key of the agent's configuration at its default, so that an
// operator finds each one where they edit. When this fails after a key was added to
// internal/agent/config, add the key to packaging/config.yaml, commented out, at its
// default, with a comment, and to docs/agent-configuration.md.
func TestConffileHoldsEveryKeyAtItsDefault(t *testing.T) {
	lines := uncomment(t)
	text := strings.Join(lines, "\n")

	got, err := config.Parse([]byte(text))
	if err != nil {
		t.Fatalf("packaging/config.yaml with its settings uncommented does not parse: %v", err)
	}
	want, err := config.Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	if got.String() != want.String() {
		g, w := strings.Split(got.String(), "\n"), strings.Split(want.String(), "\n")
		for i := range min(len(g), len(w)) {
			if g[i] != w[i] {
				t.Errorf("packaging/config.yaml shows a value that is not the default: effective config line %d is %q, the default is %q", i+1, g[i], w[i])
				break
			}
		}
	}

	var root yaml.Node
	if err := yaml.Unmarshal([]byte(text), &root); err != nil {
		t.Fatal(err)
	}
	inFile := map[string]bool{}
	fileKeys(root.Content[0], "", inFile)
	for _, k := range doctable.YAMLKeys(config.Config{}) {
		// A list of mappings with no default (rules) is shown empty; its keys are
		// described in the comment above it.
		if list, sub, ok := strings.Cut(k, "[]."); ok && inFile[list] {
			if !strings.Contains(text, sub) {
				t.Errorf("packaging/config.yaml: %s is shown, but the comment above it does not mention %q", list, sub)
			}
			continue
		}
		if !inFile[k] {
			t.Errorf("packaging/config.yaml: key %s (internal/agent/config) is missing: add it, commented out, at its default, with a comment", k)
		}
	}
}

// fileKeys records the full key of every leaf in a YAML mapping.
func fileKeys(n *yaml.Node, prefix string, out map[string]bool) {
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i].Value, n.Content[i+1]
		if prefix != "" {
			k = prefix + "." + k
		}
		if v.Kind == yaml.MappingNode {
			fileKeys(v, k, out)
			continue
		}
		out[k] = true
	}
}

// Every setting in the conffile says what it is: it has a comment of its own at the end
// of its line, or its block (the top-level key it sits under) has one on the line above.
func TestConffileCommentsEverySetting(t *testing.T) {
	data, err := os.ReadFile("config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(data), "\n")
	blockCommented := false
	for i, l := range lines {
		if !settingRE.MatchString(l) {
			continue
		}
		setting := l[1:]
		if !strings.HasPrefix(setting, " ") { // a top-level key starts a block
			blockCommented = i > 0 && strings.HasPrefix(lines[i-1], "# ")
		}
		leaf := !strings.HasSuffix(strings.TrimSpace(stripComment(setting)), ":")
		if leaf && !blockCommented && !strings.Contains(setting, " # ") {
			t.Errorf("packaging/config.yaml:%d: %q has no comment: add one at the end of the line or above its block", i+1, l)
		}
	}
	if !slices.ContainsFunc(lines, func(l string) bool { return strings.Contains(l, "docs/agent-configuration.md") }) {
		t.Error("packaging/config.yaml should point at docs/agent-configuration.md")
	}
}

func stripComment(s string) string {
	if i := strings.Index(s, " #"); i >= 0 {
		return s[:i]
	}
	return s
}
