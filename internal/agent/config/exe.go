package config

import (
	"bufio"
	"fmt"
	"os"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/imdsguard/imdsguard/internal/yamlfile"
)

// ScriptInterpreter reports whether the file at path is a script ("#!" first) and, if
// so, its interpreter line. The kernel runs the interpreter, so a process running the
// script has the interpreter as its executable: an exe rule naming the script never
// matches it. A file that cannot be read is not a script.
func ScriptInterpreter(path string) (string, bool) {
	f, err := os.Open(path)
	if err != nil {
		return "", false
	}
	defer f.Close()
	line, _ := bufio.NewReader(f).ReadString('\n')
	if !strings.HasPrefix(line, "#!") {
		return "", false
	}
	return strings.TrimSpace(line[2:]), true
}

// Check loads the file at path as Load does and also looks at the files it names: an
// exe rule that names a script is an error, since it would be accepted and never match.
// check-config runs it; the agent itself only warns (a file can change after boot).
func Check(path string) (Config, error) {
	cfg, err := Load(path)
	if err != nil {
		return cfg, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("read config: %w", err)
	}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return cfg, fmt.Errorf("parse config: %w", err)
	}
	for i, r := range cfg.Rules {
		if r.Exe == "" {
			continue
		}
		if interp, ok := ScriptInterpreter(r.Exe); ok {
			e := yamlfile.Errorf(&root, fmt.Sprintf("rules[%d].exe", i),
				"%s is a script (#!%s): the kernel runs its interpreter, so the interpreter is what the process's exe is and this rule would never match; name the interpreter's binary and narrow the rule with user, unit or cgroup",
				r.Exe, interp)
			return cfg, yamlfile.WithFile(e, path)
		}
	}
	return cfg, nil
}
