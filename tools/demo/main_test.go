package main

import (
	"context"
	"strings"
	"testing"

	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedDemoTablesFilled runs the demo's table code against a bed: every row of
// both tables is filled from what the agent recorded, requests included (the go-sdk row
// of the enforce table was once printed before its requests were written).
func TestPrivilegedDemoTablesFilled(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{ContainerView: true, CredentialEndpoints: true})
	ctx := context.Background()
	who, err := whoTouched(ctx, bed)
	if err != nil {
		t.Fatal(err)
	}
	if who.outsideSeen || len(who.rows) == 0 {
		t.Fatalf("who table: outside seen %v, %d rows", who.outsideSeen, len(who.rows))
	}
	checkRows(t, who.header, who.rows, "REQUESTS")
	header, rows, err := enforceTable(ctx, bed, enforcePolicy())
	if err != nil {
		t.Fatal(err)
	}
	checkRows(t, header, rows, "REQUESTS (version status)")
	for _, r := range rows {
		if r[0] == "go-sdk" && !strings.Contains(r[5], "v2 200") {
			t.Errorf("go-sdk row without its IMDSv2 requests: %q", r)
		}
	}
	// Containers: the pod's IMDSv1 refused, its IMDSv2 and the task's credentials
	// attributed.
	header, rows, err = containersTable(ctx, bed)
	if err != nil {
		t.Fatal(err)
	}
	checkRows(t, header, rows, "REQUESTS (version status)")
	if len(rows) != 3 || !strings.Contains(rows[0][4], "v1 401 refused: imdsv2_required") || !strings.Contains(rows[0][5], "pod payments/api-0") ||
		!strings.Contains(rows[1][4], "v2 200") || !strings.Contains(rows[2][3], "ecs") || !strings.Contains(rows[2][5], "family billing") {
		t.Errorf("containers table %q", rows)
	}
}

// checkRows fails on an empty cell, and on a request cell without requests for a
// client the allowlist let through.
func checkRows(t *testing.T, header []string, rows [][]string, reqCol string) {
	t.Helper()
	col := -1
	for i, h := range header {
		if h == reqCol {
			col = i
		}
	}
	for _, r := range rows {
		if len(r) != len(header) {
			t.Errorf("row %q does not match header %q", r, header)
			continue
		}
		for i, c := range r {
			if strings.TrimSpace(c) == "" {
				t.Errorf("row %q: empty %s", r, header[i])
			}
		}
		if denied := strings.Contains(strings.Join(r, " "), "deny"); !denied && (r[col] == "-" || r[col] == "") {
			t.Errorf("row %q: no requests recorded", r)
		}
	}
}
