package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclparse"
	"gopkg.in/yaml.v3"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// checkShell runs `sh -n` (or bash -n) on script: a syntax error fails t.
func checkShell(t *testing.T, shell, what, script string) {
	t.Helper()
	cmd := exec.Command(shell, "-n")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("%s: %s -n: %v\n%s\n--- script ---\n%s", what, shell, err, out, script)
	}
}

// component is the part of the EC2 Image Builder component document schema
// (schemaVersion 1.0) that the service checks when the component is created.
type component struct {
	Name          string                      `yaml:"name"`
	Description   string                      `yaml:"description"`
	SchemaVersion string                      `yaml:"schemaVersion"`
	Parameters    []map[string]componentParam `yaml:"parameters"`
	Phases        []struct {
		Name  string `yaml:"name"`
		Steps []struct {
			Name   string    `yaml:"name"`
			Action string    `yaml:"action"`
			Inputs yaml.Node `yaml:"inputs"`
		} `yaml:"steps"`
	} `yaml:"phases"`
}

type componentParam struct {
	Type        string  `yaml:"type"`
	Default     *string `yaml:"default"`
	Description string  `yaml:"description"`
}

func TestImageBuilderComponent(t *testing.T) {
	data, err := os.ReadFile("ami/imagebuilder-component.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(strings.NewReader(string(data)))
	dec.KnownFields(true)
	var c component
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("component YAML: %v", err)
	}
	if c.Name == "" || c.SchemaVersion != "1.0" || len(c.Phases) == 0 {
		t.Fatalf("component needs name, schemaVersion 1.0 and phases: %+v", c)
	}
	params := map[string]bool{}
	for _, p := range c.Parameters {
		for name, def := range p {
			if def.Type != "string" {
				t.Errorf("parameter %s: type %q, want string", name, def.Type)
			}
			params[name] = true
		}
	}
	stepName := regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$`)
	actions := []string{"ExecuteBash", "S3Download", "S3Upload", "WebDownload", "Reboot", "UpdateOS", "CreateFile", "SetFileOwner", "SetFilePermissions"}
	seenPhase := map[string]bool{}
	for _, ph := range c.Phases {
		if !slices.Contains([]string{"build", "validate", "test"}, ph.Name) || seenPhase[ph.Name] {
			t.Errorf("phase %q: must be one of build, validate, test, once each", ph.Name)
		}
		seenPhase[ph.Name] = true
		seenStep := map[string]bool{}
		for _, st := range ph.Steps {
			if !stepName.MatchString(st.Name) || seenStep[st.Name] {
				t.Errorf("phase %s: step name %q not alphanumeric or not unique", ph.Name, st.Name)
			}
			seenStep[st.Name] = true
			if !slices.Contains(actions, st.Action) {
				t.Errorf("step %s: unknown action %q", st.Name, st.Action)
			}
			switch st.Action {
			case "ExecuteBash":
				var in struct {
					Commands []string `yaml:"commands"`
				}
				if err := st.Inputs.Decode(&in); err != nil || len(in.Commands) == 0 {
					t.Errorf("step %s: ExecuteBash needs inputs.commands (%v)", st.Name, err)
				}
				checkShell(t, "bash", "step "+st.Name, strings.Join(in.Commands, "\n"))
			case "S3Download":
				var in []struct {
					Source      string `yaml:"source"`
					Destination string `yaml:"destination"`
				}
				if err := st.Inputs.Decode(&in); err != nil || len(in) == 0 || in[0].Source == "" || in[0].Destination == "" {
					t.Errorf("step %s: S3Download needs a list of source and destination (%v)", st.Name, err)
				}
			}
		}
	}
	// Every {{ Parameter }} used must be declared.
	for _, m := range regexp.MustCompile(`\{\{\s*(\w+)\s*\}\}`).FindAllStringSubmatch(string(data), -1) {
		if !params[m[1]] {
			t.Errorf("{{ %s }} used but not declared under parameters", m[1])
		}
	}
}

func TestCloudInit(t *testing.T) {
	data, err := os.ReadFile("ami/cloud-init.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(data), "#cloud-config\n") {
		t.Fatal("cloud-init user data must start with #cloud-config")
	}
	var doc struct {
		WriteFiles []struct {
			Path        string `yaml:"path"`
			Owner       string `yaml:"owner"`
			Permissions string `yaml:"permissions"`
			Content     string `yaml:"content"`
		} `yaml:"write_files"`
		Runcmd [][]string `yaml:"runcmd"`
	}
	dec := yaml.NewDecoder(strings.NewReader(string(data)))
	dec.KnownFields(true)
	if err := dec.Decode(&doc); err != nil {
		t.Fatalf("cloud-config YAML: %v", err)
	}
	if len(doc.WriteFiles) != 1 || doc.WriteFiles[0].Path != "/etc/imdsguard/config.yaml" || doc.WriteFiles[0].Permissions != "0600" {
		t.Errorf("write_files should write /etc/imdsguard/config.yaml 0600: %+v", doc.WriteFiles)
	}
	// The config it writes must be one the agent accepts.
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(cfg, []byte(doc.WriteFiles[0].Content), 0o600); err != nil {
		t.Fatal(err)
	}
	checkConfig(t, cfg)
	if len(doc.Runcmd) != 1 || len(doc.Runcmd[0]) != 3 || doc.Runcmd[0][1] != "-c" {
		t.Fatalf("runcmd should be one [sh, -c, script]: %v", doc.Runcmd)
	}
	checkShell(t, "sh", "runcmd", doc.Runcmd[0][2])
}

// checkConfig runs the agent's own validation on a config file.
func checkConfig(t *testing.T, path string) {
	t.Helper()
	out, err := exec.Command("go", "run", "../cmd/imdsguard", "check-config", path).CombinedOutput()
	if err != nil {
		t.Errorf("imdsguard check-config %s: %v\n%s", path, err, out)
	}
}

func TestShippedConfig(t *testing.T) {
	checkConfig(t, "config.yaml")
}

func TestPackerTemplate(t *testing.T) {
	p := hclparse.NewParser()
	f, diags := p.ParseHCLFile("ami/imdsguard.pkr.hcl")
	if diags.HasErrors() {
		t.Fatalf("HCL: %s", diags.Error())
	}
	content, diags := f.Body.Content(&hcl.BodySchema{Blocks: []hcl.BlockHeaderSchema{
		{Type: "packer"},
		{Type: "variable", LabelNames: []string{"name"}},
		{Type: "locals"},
		{Type: "source", LabelNames: []string{"type", "name"}},
		{Type: "build"},
	}})
	if diags.HasErrors() {
		t.Fatalf("top-level blocks: %s", diags.Error())
	}
	vars := map[string]bool{}
	var source, build *hcl.Block
	for _, b := range content.Blocks {
		switch b.Type {
		case "variable":
			vars[b.Labels[0]] = true
		case "source":
			if b.Labels[0] != "amazon-ebs" {
				t.Errorf("source %q: want amazon-ebs", b.Labels[0])
			}
			source = b
		case "build":
			build = b
		}
	}
	for _, v := range []string{"package", "config", "http_tokens", "http_put_response_hop_limit"} {
		if !vars[v] {
			t.Errorf("no variable %q", v)
		}
	}
	if source == nil || build == nil {
		t.Fatal("template needs a source and a build block")
	}
	src, _, diags := source.Body.PartialContent(&hcl.BodySchema{
		Attributes: []hcl.AttributeSchema{{Name: "imds_support", Required: true}, {Name: "region", Required: true}},
		Blocks:     []hcl.BlockHeaderSchema{{Type: "metadata_options"}, {Type: "source_ami_filter"}},
	})
	if diags.HasErrors() {
		t.Errorf("source: %s", diags.Error())
	}
	if len(src.Blocks.OfType("metadata_options")) != 1 {
		t.Error("source sets no metadata_options (HttpTokens, hop limit)")
	}
	bc, _, diags := build.Body.PartialContent(&hcl.BodySchema{
		Blocks: []hcl.BlockHeaderSchema{{Type: "provisioner", LabelNames: []string{"type"}}},
	})
	if diags.HasErrors() {
		t.Fatalf("build: %s", diags.Error())
	}
	var script string
	for _, b := range bc.Blocks {
		if b.Labels[0] != "shell" {
			continue
		}
		a, _, _ := b.Body.PartialContent(&hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: "script"}}})
		if attr, ok := a.Attributes["script"]; ok {
			script = string(attr.Expr.Range().SliceBytes(f.Bytes))
		}
	}
	if !strings.Contains(script, "install-imdsguard.sh") {
		t.Fatalf("no shell provisioner runs install-imdsguard.sh (script = %s)", script)
	}
	data, err := os.ReadFile("ami/install-imdsguard.sh")
	if err != nil {
		t.Fatal(err)
	}
	checkShell(t, "sh", "install-imdsguard.sh", string(data))
}

// TestPrivilegedBakeScript runs the Packer template's install script in a Debian root,
// as in an image build (no systemd running), with a config to install.
func TestPrivilegedBakeScript(t *testing.T) {
	testbed.RequirePrivileged(t)
	pkgs := buildPackages(t)
	root := debianRoot(t)
	deb := copyInto(t, root, pkgs.deb(t, "1.0.0"))
	script := copyInto(t, root, "ami/install-imdsguard.sh")
	config := "log:\n  level: warn\n"
	if err := os.WriteFile(filepath.Join(root, "tmp/config.yaml"), []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := inRoot(root, "env", "PACKAGE="+deb, "CONFIG=/tmp/config.yaml", "sh", script)
	if err != nil {
		t.Fatalf("install-imdsguard.sh: %v", err)
	}
	t.Logf("install-imdsguard.sh:\n%s", tail([]byte(out), 12))
	if got, err := os.ReadFile(filepath.Join(root, "etc/imdsguard/config.yaml")); err != nil || string(got) != config {
		t.Errorf("config not installed: %q %v", got, err)
	}
	if !exists(filepath.Join(root, wantsLink)) {
		t.Error("service not enabled")
	}
	if m := mode(t, filepath.Join(root, "etc/imdsguard/config.yaml")); m != 0o600 {
		t.Errorf("config mode %o, want 600", m)
	}
}
