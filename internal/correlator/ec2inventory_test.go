package correlator

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
	"github.com/imdsguard/imdsguard/internal/testing/syncbuf"
)

// TestServePlacesInstancesFromTheEC2API runs serve with inventory.ec2 against an EC2
// stand-in (the SDK's endpoint and credentials from the environment, as in production):
// the thief's AWS-hosted use comes first, the host's own later from the public address
// only the EC2 API knows. With the polled inventory the thief is flagged and the host is
// not; the finding says the inventory placed the instance.
func TestServePlacesInstancesFromTheEC2API(t *testing.T) {
	const inst, key = "i-0a1a1a1a1a1a1a1a1", "ASIASERVEINVENTORY1"
	var calls syncbuf.Buffer
	ec2 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		fmt.Fprintf(&calls, "%s %s\n", r.Form.Get("Action"), r.Header.Get("Authorization"))
		w.Header().Set("Content-Type", "text/xml")
		switch r.Form.Get("Action") {
		case "DescribeNetworkInterfaces":
			fmt.Fprintf(w, `<DescribeNetworkInterfacesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><networkInterfaceSet><item>
<networkInterfaceId>eni-1</networkInterfaceId><ownerId>111111111111</ownerId><interfaceType>interface</interfaceType>
<attachment><instanceId>%s</instanceId><attachTime>2026-11-20T09:00:00.000Z</attachTime></attachment>
<privateIpAddress>10.0.0.5</privateIpAddress><association><publicIp>3.5.1.11</publicIp></association></item></networkInterfaceSet>
</DescribeNetworkInterfacesResponse>`, inst)
		case "DescribeAddresses":
			fmt.Fprint(w, `<DescribeAddressesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><addressesSet/></DescribeAddressesResponse>`)
		case "DescribeVpcEndpoints":
			fmt.Fprint(w, `<DescribeVpcEndpointsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><vpcEndpointSet/></DescribeVpcEndpointsResponse>`)
		default:
			http.Error(w, "unexpected", http.StatusBadRequest)
		}
	}))
	defer ec2.Close()
	t.Setenv("AWS_ENDPOINT_URL_EC2", ec2.URL)
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIACORRELATOR00001")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	t.Setenv("AWS_CONFIG_FILE", os.DevNull)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", os.DevNull)
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")

	work := t.TempDir()
	watched := filepath.Join(work, "trail")
	os.MkdirAll(watched, 0o755)
	ranges := filepath.Join(work, "ip-ranges.json")
	os.WriteFile(ranges, []byte(ctcorpus.IPRangesJSON), 0o644)
	call := func(min int, src string) map[string]any {
		return map[string]any{"eventVersion": "1.09", "eventTime": time.Date(2026, 11, 20, 10, min, 0, 0, time.UTC).Format(time.RFC3339),
			"eventSource": "s3.amazonaws.com", "eventName": "ListBuckets", "awsRegion": "us-east-1", "sourceIPAddress": src,
			"eventID": fmt.Sprintf("e-%d", min), "recipientAccountId": "111111111111",
			"userIdentity": map[string]any{"type": "AssumedRole", "arn": "arn:aws:sts::111111111111:assumed-role/web/" + inst, "accountId": "111111111111",
				"accessKeyId": key, "sessionContext": map[string]any{"sessionIssuer": map[string]any{"type": "Role", "userName": "web", "accountId": "111111111111"},
					"ec2RoleDelivery": "2.0"}}}
	}
	doc, _ := json.Marshal(map[string]any{"Records": []any{call(1, "52.9.9.9"), call(5, "3.5.1.11"), call(7, "3.5.1.11")}})
	os.WriteFile(filepath.Join(watched, "trail.json"), doc, 0o644)
	past := time.Now().Add(-time.Minute)
	os.Chtimes(filepath.Join(watched, "trail.json"), past, past)
	cfg := filepath.Join(work, "c.yaml")
	os.WriteFile(cfg, []byte("ip_ranges: "+ranges+"\nserve:\n  directory: "+watched+"\n  poll_interval: 100ms\n"+
		"inventory:\n  ec2:\n    regions: [us-east-1]\n    interval: 1h\n"), 0o600)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errb syncbuf.Buffer
	done := make(chan int)
	go func() { done <- Run(ctx, "", []string{"serve", "--config", cfg}, nil, &out, &errb) }()
	deadline := time.After(20 * time.Second)
	for !strings.Contains(out.String(), "\n") {
		select {
		case code := <-done:
			t.Fatalf("serve exited %d: %s", code, errb.String())
		case <-deadline:
			t.Fatalf("no finding; err:\n%s", errb.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("serve exit %d: %s", code, errb.String())
	}
	fs := decodeFindings(t, out.String())
	if len(fs) != 1 || fs[0].SourceIP != "52.9.9.9" || fs[0].PlacedBy != detector.PlacedByInventory {
		t.Fatalf("findings %+v\nlog:\n%s", fs, errb.String())
	}
	if !strings.Contains(calls.String(), "DescribeNetworkInterfaces AWS4-HMAC-SHA256 Credential=AKIACORRELATOR00001/") ||
		!strings.Contains(errb.String(), `"event":"inventory_polled"`) {
		t.Fatalf("calls:\n%s\nlog:\n%s", calls.String(), errb.String())
	}
}
