package config

import (
	"strings"
	"testing"
)

func TestContainersKeys(t *testing.T) {
	cfg, err := Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Containers.Fallback != FallbackDirect || cfg.Containers.MaxNamespaces != 1024 || cfg.Containers.Fallback.Denies() {
		t.Fatalf("defaults %+v, want direct and 1024", cfg.Containers)
	}
	cfg, err = Parse([]byte("containers:\n  fallback: deny\n  max_namespaces: 0\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Containers.Fallback.Denies() || cfg.Containers.MaxNamespaces != 0 {
		t.Fatalf("parsed %+v", cfg.Containers)
	}
	for _, tc := range []struct{ yaml, want string }{
		{"containers:\n  fallback: open\n", `2: containers.fallback: must be "direct" or "deny", got "open"`},
		{"\ncontainers:\n  max_namespaces: -1\n", "3: containers.max_namespaces: must be 0-65536"},
		{"containers:\n  max_namespaces: 70000\n", "2: containers.max_namespaces: must be 0-65536"},
		{"containers:\n  fallbak: deny\n", "2: containers.fallbak: unknown key"},
	} {
		if _, err := Parse([]byte(tc.yaml)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want %q", tc.yaml, err, tc.want)
		}
	}
}
