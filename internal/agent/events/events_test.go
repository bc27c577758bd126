package events

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestWriteSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "events.json")
	w, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 11, 23, 10, 0, 0, 123456789, time.UTC)
	w.Write(Record{Time: at, PID: 10, TID: 11, PPID: 1, UID: 1000, GID: 1000, User: "alice", Comm: "curl",
		Exe: "/usr/bin/curl", Cmdline: []string{"curl", "-H", "a b"}, Cgroup: "/system.slice/x.service",
		CgroupID: 99, Unit: "x.service", Netns: 4026531840, SocketCookie: 5, Dst: "169.254.169.254:80", Verdict: "allow"})
	w.Write(Record{Time: at, PID: 12, Missing: []string{"cmdline"}, Verdict: "allow"})
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(path); strings.Count(string(data), "\n") != 2 {
		t.Fatalf("after Flush the file holds %q", data)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("events file mode: %v %v", fi.Mode(), err)
	}
	f, _ := os.Open(path)
	defer f.Close()
	sc := bufio.NewScanner(f)
	var lines []map[string]any
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		lines = append(lines, m)
	}
	if len(lines) != 2 {
		t.Fatalf("%d lines", len(lines))
	}
	first := lines[0]
	for _, k := range []string{"time", "event", "pid", "tid", "ppid", "uid", "user", "comm", "exe", "cmdline",
		"cgroup", "unit", "container_id", "netns", "dst", "verdict"} {
		if _, ok := first[k]; !ok {
			t.Errorf("field %q missing", k)
		}
	}
	if first["time"] != "2026-11-23T10:00:00.123456789Z" || first["event"] != "imds_connect" || first["pid"] != float64(10) ||
		first["cmdline"].([]any)[2] != "a b" || first["dst"] != "169.254.169.254:80" {
		t.Errorf("first line %v", first)
	}
	if _, ok := first["missing"]; ok {
		t.Error("missing present on a complete record")
	}
	if m := lines[1]["missing"].([]any); len(m) != 1 || m[0] != "cmdline" {
		t.Errorf("missing %v", lines[1]["missing"])
	}
	if c := lines[1]["cmdline"].([]any); len(c) != 0 {
		t.Errorf("cmdline %v", c)
	}
}

func TestOpenFailsClearly(t *testing.T) {
	dir := t.TempDir()
	blocker := filepath.Join(dir, "file")
	os.WriteFile(blocker, nil, 0o600)
	if _, err := Open(filepath.Join(blocker, "events.json")); err == nil {
		t.Fatal("opened a file below a regular file")
	}
}
