// Package findingtest reads what the correlator printed back into findings, for tests
// that run its commands in process.
package findingtest

import (
	"bufio"
	"encoding/json"
	"strings"
	"testing"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
)

// Decode parses JSON lines of findings, failing the test on a line that is not one.
func Decode(t testing.TB, s string) []detector.Finding {
	t.Helper()
	var fs []detector.Finding
	sc := bufio.NewScanner(strings.NewReader(s))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var f detector.Finding
		if err := json.Unmarshal(sc.Bytes(), &f); err != nil {
			t.Fatalf("bad finding line %q: %v", sc.Text(), err)
		}
		fs = append(fs, f)
	}
	return fs
}
