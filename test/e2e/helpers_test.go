// Package e2e runs the built programs on the test bed (internal/testing/testbed): the
// agent against real clients in its own cgroup and network namespace, and the paths that
// span both programs, from a fetched credential to the correlator's finding. All of it
// needs root (IMDSGUARD_PRIVILEGED=1).
package e2e

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/imdsguard/imdsguard/internal/correlator"
	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/testing/findingtest"
)

// runCmd runs one imdsguard-correlator command line in process.
func runCmd(t *testing.T, stdin string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := correlator.Run(context.Background(), "", args, strings.NewReader(stdin), &out, &errb)
	return code, out.String(), errb.String()
}

func decodeFindings(t *testing.T, s string) []detector.Finding { return findingtest.Decode(t, s) }
