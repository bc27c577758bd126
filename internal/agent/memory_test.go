package agent

import (
	"os"
	"strconv"
	"strings"
	"testing"
)

// rssFileKB is this process's resident size in file-backed pages.
func rssFileKB(t *testing.T) int {
	t.Helper()
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "RssFile:"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no RssFile in /proc/self/status")
	return 0
}

// The test binary, like the agent, has most of its file resident after start-up.
func TestDropStartupPages(t *testing.T) {
	before := rssFileKB(t)
	n, err := dropStartupPages()
	if err != nil {
		t.Fatal(err)
	}
	after := rssFileKB(t)
	t.Logf("%d mappings; RssFile %d kB -> %d kB", n, before, after)
	if n < 2 || after > before/2 {
		t.Fatalf("%d mappings; RssFile %d kB -> %d kB: want the text and read-only data of the binary, at least halved", n, before, after)
	}
}
