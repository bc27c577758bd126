package logging

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestNewLevelsAndOutputs(t *testing.T) {
	var buf bytes.Buffer
	log, closeFn, err := New("stderr", "warn", &buf)
	if err != nil {
		t.Fatal(err)
	}
	defer closeFn()
	log.Info().Str("event", "quiet").Msg("")
	log.Warn().Str("event", "loud").Msg("")
	var m map[string]any
	if err := json.Unmarshal(buf.Bytes(), &m); err != nil || m["event"] != "loud" || m["time"] == nil {
		t.Fatalf("line %q: %v", buf.String(), err)
	}
	p := filepath.Join(t.TempDir(), "agent.log")
	flog, fclose, err := New(p, "info", nil)
	if err != nil {
		t.Fatal(err)
	}
	flog.Info().Str("event", "to_file").Msg("")
	fclose()
	if data, _ := os.ReadFile(p); !strings.Contains(string(data), "to_file") {
		t.Fatalf("file holds %q", data)
	}
	if _, _, err := New("stderr", "chatty", nil); err == nil || !strings.Contains(err.Error(), "log.level") {
		t.Fatalf("bad level: %v", err)
	}
}
