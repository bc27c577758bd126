package yamlfile

import (
	"strings"
	"testing"
	"time"
)

type conf struct {
	Name  string        `yaml:"name"`
	Every time.Duration `yaml:"every"`
	Items []struct {
		ID   int    `yaml:"id"`
		Path string `yaml:"path"`
	} `yaml:"items"`
	Sub struct {
		On bool `yaml:"on"`
	} `yaml:"sub"`
}

func TestDecode(t *testing.T) {
	c := conf{Name: "default"}
	root, err := Decode([]byte("every: 5s\nitems:\n  - id: 1\n  - id: 2\n    path: /x\nsub:\n  on: true\n"), &c)
	if err != nil || c.Name != "default" || c.Every != 5*time.Second || len(c.Items) != 2 || !c.Sub.On {
		t.Fatalf("%+v %v", c, err)
	}
	if got := LineOf(root, "items[1].path"); got != 5 {
		t.Errorf("LineOf items[1].path = %d", got)
	}
	if e := Errorf(root, "items[1]", "bad"); e.Line != 4 || e.Error() != "4: items[1]: bad" {
		t.Errorf("Errorf = %v", e)
	}
	for yaml, want := range map[string]string{
		"items:\n  - id: 1\n    colour: red\n": "3: items[0].colour: unknown key (known: id, path)",
		"sub:\n  on: maybe\n":                  "2: sub.on: cannot unmarshal",
		"every: soon\n":                        "1: every: cannot unmarshal",
		"sub: 3\n":                             "1: sub: must be a mapping",
		"name: [\n":                            "did not find",
	} {
		var c conf
		_, err := Decode([]byte(yaml), &c)
		if err == nil || !strings.Contains(WithFile(err, "f.yaml").Error(), want) || !strings.HasPrefix(err.Error(), "f.yaml:") {
			t.Errorf("%q: %v, want %q", yaml, err, want)
		}
	}
}
