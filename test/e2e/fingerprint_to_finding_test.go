package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedBrokerFingerprintToFinding is the whole story on one machine: a client
// fetches role credentials through the broker on the test bed, the agent fingerprints
// the fetch, CloudTrail shows the key used from outside AWS, and the correlator's
// finding names the client process. No output anywhere carries the secret.
func TestPrivilegedBrokerFingerprintToFinding(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	agent, err := bed.StartAgent("")
	if err != nil {
		t.Fatal(err)
	}
	client, err := testbed.ClientBinary()
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(agent.Log(), `"event":"host_meta_learnt"`); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("agent never learnt the host's metadata:\n%s", agent.Log())
		}
	}
	r := bed.RunCommand(context.Background(), "sdk", "", testbed.Placement{}, client, "sdk")
	if r.Err != nil {
		t.Fatal(r.Err)
	}
	fps := waitFingerprint(t, agent.FingerprintsPath, r.PID)
	var fp struct {
		InstanceProfileARN string   `json:"instance_profile_arn"`
		HostAddresses      []string `json:"host_addresses"`
	}
	data, _ := os.ReadFile(fps)
	json.Unmarshal([]byte(strings.SplitN(string(data), "\n", 2)[0]), &fp)
	// The emulator's instance profile and public IPv4; never IMDS's link-local address.
	if addrs := strings.Join(fp.HostAddresses, " "); !strings.Contains(fp.InstanceProfileARN, "instance-profile/") ||
		!strings.Contains(addrs, "192.0.2.54") || strings.Contains(addrs, testbed.IMDSv4.String()) {
		t.Errorf("fingerprint host facts: %+v", fp)
	}
	if err := agent.Stop(); err != nil {
		t.Fatalf("agent stop: %v", err)
	}

	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ranges := write("ip-ranges.json", `{"syncToken":"1","createDate":"2026-11-20-00-00-00","prefixes":[{"ip_prefix":"3.0.0.0/8","region":"us-east-1","service":"AMAZON","network_border_group":"us-east-1"}],"ipv6_prefixes":[]}`)
	cfg := write("config.yaml", "ip_ranges: "+ranges+"\n")
	at := time.Now().UTC().Format(time.RFC3339)
	trail := write("trail.json", fmt.Sprintf(`{"Records":[{"eventVersion":"1.08","eventTime":%q,"eventSource":"s3.amazonaws.com","eventName":"ListBuckets","awsRegion":"us-east-1","sourceIPAddress":"198.51.100.23","userAgent":"aws-cli/2","userIdentity":{"type":"AssumedRole","principalId":"AROAEXAMPLE:%s","arn":"arn:aws:sts::123456789012:assumed-role/%s/%s","accountId":"123456789012","accessKeyId":%q,"sessionContext":{"sessionIssuer":{"type":"Role","arn":"arn:aws:iam::123456789012:role/%s","accountId":"123456789012","userName":%q},"ec2RoleDelivery":"2.0"}},"recipientAccountId":"123456789012","eventID":"e1","readOnly":true,"eventType":"AwsApiCall"}]}`,
		at, bed.InstanceID, testbed.Role, bed.InstanceID, bed.Creds.AccessKeyID, testbed.Role, testbed.Role))

	code, out, errs := runCmd(t, "", "detect", "--config", cfg, "--fingerprints", fps, trail)
	if code != 0 {
		t.Fatalf("detect exit %d: %s", code, errs)
	}
	findings := decodeFindings(t, out)
	var f *detector.Finding
	for i := range findings {
		if findings[i].AccessKeyID == bed.Creds.AccessKeyID {
			f = &findings[i]
		}
	}
	if f == nil || !strings.HasSuffix(f.Type, "InstanceCredentialExfiltration.OutsideAWS") || f.Severity != "High" {
		t.Fatalf("findings %s", out)
	}
	if len(f.Processes) != 1 || f.Processes[0].PID != r.PID || f.Processes[0].Exe != r.Exe {
		t.Fatalf("finding does not name the client (pid %d, %s): %+v", r.PID, r.Exe, f.Processes)
	}
	// Secrets never leave the host, nor appear in any output on it.
	for _, p := range []string{agent.EventsPath, agent.FingerprintsPath} {
		data, _ := os.ReadFile(p)
		checkNoSecrets(t, p, string(data), bed)
	}
	checkNoSecrets(t, "agent log", agent.Log(), bed)
	checkNoSecrets(t, "findings", out, bed)
}

func checkNoSecrets(t *testing.T, where, s string, bed *testbed.Bed) {
	t.Helper()
	for _, secret := range []string{bed.Creds.SecretAccessKey, bed.Creds.Token} {
		if strings.Contains(s, secret) {
			t.Errorf("%s carries a secret", where)
		}
	}
}

func waitFingerprint(t *testing.T, path string, pid int) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		data, _ := os.ReadFile(path)
		for _, line := range strings.Split(string(data), "\n") {
			var fp struct {
				Process struct{ PID int } `json:"process"`
			}
			if json.Unmarshal([]byte(line), &fp) == nil && fp.Process.PID == pid {
				return path
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no fingerprint for pid %d in %s", pid, path)
	return ""
}
