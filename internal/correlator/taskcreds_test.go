package correlator

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
	"github.com/imdsguard/imdsguard/internal/correlator/iddoc"
	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
	"github.com/imdsguard/imdsguard/internal/testing/syncbuf"
)

// The host, its task and its pod of TestServeTaskAndPodCredentials.
const (
	tcAccount   = "123456789012"
	tcAffiliate = "210987654321"
	tcHost      = "i-0ec5aa00000000001"
	tcTaskKey   = "ASIATASKCREDS000001"
	tcPodKey    = "ASIAPODCREDS0000001"
	tcTaskARN   = "arn:aws:ecs:us-east-1:123456789012:task/prod/0f3c9b1d2e4a4c5f8a6b7c8d9e0f1a2b"
	tcTaskID    = "0f3c9b1d2e4a4c5f8a6b7c8d9e0f1a2b"
	tcPodSess   = "eks-prod-api-0-5f3c2a1b-7d8e-4f90-a1b2-c3d4e5f60718"
)

// tcFingerprints are an ECS task's and a pod's credential fetches as the agent's
// forwarder posts them: wire JSON, with the host's addresses, the endpoint, and the
// process's container, task and pod. The ECS answer names the role; the Pod Identity
// answer does not.
func tcFingerprints(now time.Time) string {
	exp := now.Add(6 * time.Hour).Format(time.RFC3339)
	return fmt.Sprintf(`[
{"id":"fp-task","access_key_id":%q,"role":"billing-task","role_arn":"arn:aws:iam::123456789012:role/billing-task","endpoint":"ecs",
 "last_updated":"0001-01-01T00:00:00Z","expiration":%q,
 "instance":{"id":%q,"account_id":%q,"region":"us-east-1","availability_zone":"us-east-1a"},
 "host_addresses":["10.0.0.5","3.5.1.11"],"imds_version":"","token_hmac":"9f00",
 "process":{"pid":4242,"exe":"/usr/local/bin/billing","user":"app","container_id":"c0ffee0000000000000000000000000000000000000000000000000000000001",
  "container_runtime":"docker","ecs_task":{"arn":%q,"family":"billing","container":"worker"}}},
{"id":"fp-pod","access_key_id":%q,"role":"","endpoint":"pod_identity",
 "last_updated":"0001-01-01T00:00:00Z","expiration":%q,
 "instance":{"id":%q,"account_id":%q,"region":"us-east-1","availability_zone":"us-east-1a"},
 "host_addresses":["10.0.0.5","3.5.1.11"],"imds_version":"","token_hmac":"9f01",
 "process":{"pid":5151,"exe":"/app/api","user":"65532","container_id":"beef000000000000000000000000000000000000000000000000000000000002",
  "container_runtime":"containerd","pod":{"namespace":"payments","name":"api-0","uid":"5e1f0c4a-1111-2222-3333-444455556666","container":"api","service_account":"api"}}}
]`, tcTaskKey, exp, tcHost, tcAccount, tcTaskARN, tcPodKey, exp, tcHost, tcAccount)
}

// tcInventory is what `aws ec2 describe-network-interfaces` says: the host's primary
// interface; an awsvpc task's own interface (its IPv6 address is global) and the ECS
// trunk interface, both attached to the host; and an instance of the affiliate account.
const tcInventory = `{"NetworkInterfaces":[
 {"NetworkInterfaceId":"eni-0host","OwnerId":"123456789012","InterfaceType":"interface",
  "Attachment":{"InstanceId":"i-0ec5aa00000000001","AttachTime":"2026-11-01T00:00:00+00:00"},
  "PrivateIpAddress":"10.0.0.5","Association":{"PublicIp":"3.5.1.11"}},
 {"NetworkInterfaceId":"eni-0awsvpctask","OwnerId":"123456789012","InterfaceType":"interface","RequesterManaged":true,
  "Description":"arn:aws:ecs:us-east-1:123456789012:attachment/1c2d3e4f-5a6b-7c8d-9e0f-1a2b3c4d5e6f",
  "Attachment":{"InstanceId":"i-0ec5aa00000000001","AttachTime":"2026-11-01T00:00:00+00:00"},
  "PrivateIpAddress":"10.0.7.20","Ipv6Addresses":[{"Ipv6Address":"2600:1f18:1111:2222::20"}]},
 {"NetworkInterfaceId":"eni-0trunk","OwnerId":"123456789012","InterfaceType":"trunk",
  "Attachment":{"InstanceId":"i-0ec5aa00000000001","AttachTime":"2026-11-01T00:00:00+00:00"},
  "PrivateIpAddress":"10.0.7.30","Ipv6Addresses":[{"Ipv6Address":"2600:1f18:1111:2222::30"}]},
 {"NetworkInterfaceId":"eni-0affiliate","OwnerId":"210987654321","InterfaceType":"interface",
  "Attachment":{"InstanceId":"i-0affa000000000001","AttachTime":"2026-11-01T00:00:00+00:00"},
  "PrivateIpAddress":"172.31.0.9","Association":{"PublicIp":"3.9.9.9"}}
]}`

// tcCall is a call with the task's or the pod's key as CloudTrail logs it: an
// AssumedRole session of the task role (named by the task id) or of the pod's role
// (named eks-CLUSTER-POD-UUID), with no ec2RoleDelivery.
func tcCall(at time.Time, n int, key, src string) string {
	role, session := "billing-task", tcTaskID
	if key == tcPodKey {
		role, session = "payments-api", tcPodSess
	}
	return fmt.Sprintf(`{"eventVersion":"1.09","eventTime":%q,"eventSource":"s3.amazonaws.com","eventName":"ListBuckets","awsRegion":"us-east-1",
"sourceIPAddress":%q,"userAgent":"aws-sdk-go-v2/1.30","recipientAccountId":"123456789012","eventID":"tc-%d","eventType":"AwsApiCall","readOnly":true,
"userIdentity":{"type":"AssumedRole","principalId":"AROAEXAMPLEROLE00001:%s","arn":"arn:aws:sts::123456789012:assumed-role/%s/%s","accountId":"123456789012","accessKeyId":%q,
"sessionContext":{"sessionIssuer":{"type":"Role","principalId":"AROAEXAMPLEROLE00001","arn":"arn:aws:iam::123456789012:role/%s","accountId":"123456789012","userName":%q},
"attributes":{"creationDate":%q,"mfaAuthenticated":"false"}}}}`,
		at.Format(time.RFC3339), src, n, session, role, session, key, role, role, at.Add(-time.Hour).Format(time.RFC3339))
}

// TestServeTaskAndPodCredentials: an ECS task's and a pod's credential fetches reach
// serve through the intake as the agent sends them; CloudTrail then shows each key used
// (a) from the host's own addresses, and the task's from the global address of its
// awsvpc interface attached to the host: no finding; (b) from outside AWS: a finding that
// names the endpoint, the task (ARN, family, container) or the pod (namespace, name,
// service account, container), the process and the role; (c) from an address of
// another account's instance or an AWS address not the host's: Medium (an affiliate)
// or High, as for instance credentials.
func TestServeTaskAndPodCredentials(t *testing.T) {
	signer, err := iddoc.NewSigner()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	watched := filepath.Join(dir, "trail")
	os.MkdirAll(watched, 0o755)
	cfg := write("c.yaml", fmt.Sprintf(`ip_ranges: %s
affiliate_accounts: [%q]
inventory:
  files: [%s]
serve:
  directory: %s
  poll_interval: 100ms
intake:
  listen: 127.0.0.1:0
  plain_http: true
  aws_certificates: [%s]
  allowed_accounts: [%q]
  database: %s
`, write("ip-ranges.json", ctcorpus.IPRangesJSON), tcAffiliate, write("inventory.json", tcInventory), watched,
		write("aws.pem", string(signer.CertPEM)), tcAccount, filepath.Join(dir, "db", "fingerprints.db")))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errb syncbuf.Buffer
	done := make(chan int, 1)
	go func() { done <- Run(ctx, "", []string{"serve", "--config", cfg}, nil, &out, &errb) }()
	stopped := false
	defer func() {
		if !stopped {
			cancel()
			<-done
		}
	}()
	logs := func() string { return "out:\n" + out.String() + "\nerr:\n" + errb.String() }
	addrRE := regexp.MustCompile(`"event":"intake_listening","addr":"([^"]+)"`)
	waitFor(t, "the intake", 20*time.Second, func() bool { return addrRE.MatchString(errb.String()) }, logs)
	addr := addrRE.FindStringSubmatch(errb.String())[1]

	now := time.Now().UTC().Truncate(time.Second)
	doc := fmt.Sprintf("{\n  \"accountId\" : %q,\n  \"instanceId\" : %q,\n  \"region\" : \"us-east-1\"\n}", tcAccount, tcHost)
	p7, err := signer.Sign([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	body := fmt.Sprintf(`{"document":%q,"pkcs7":%q,"batch_id":"tc-1","fingerprints":%s}`, doc, p7, tcFingerprints(now))
	resp, err := http.Post("http://"+addr+"/v1/fingerprints", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("intake answered %d", resp.StatusCode)
	}

	at := now.Add(-10 * time.Minute)
	// An hour before, the trail gave the host's public address to another instance; the
	// inventory dates the host's hold on it only by its interface's attach time, earlier.
	// The fingerprints (which carry no issue time from these endpoints) must still place
	// the host there when the keys are used.
	moved := fmt.Sprintf(`{"eventVersion":"1.09","eventTime":%q,"eventSource":"ec2.amazonaws.com","eventName":"AssociateAddress","awsRegion":"us-east-1",
"sourceIPAddress":"198.51.100.99","recipientAccountId":"123456789012","eventID":"tc-0","eventType":"AwsApiCall",
"userIdentity":{"type":"IAMUser","arn":"arn:aws:iam::123456789012:user/ops","accountId":"123456789012","accessKeyId":"AKIAOPS0000000000001"},
"requestParameters":{"instanceId":"i-0a01d000000000001","publicIp":"3.5.1.11"}}`, now.Add(-time.Hour).Format(time.RFC3339))
	calls := []string{
		moved,
		tcCall(at, 1, tcTaskKey, "3.5.1.11"), // (a) the host's public address
		tcCall(at, 2, tcTaskKey, "2600:1f18:1111:2222::20"), // (a) the task's awsvpc interface, attached to the host
		tcCall(at, 3, tcPodKey, "3.5.1.11"),                 // (a)
		tcCall(at, 4, tcTaskKey, "198.51.100.23"),           // (b) outside AWS
		tcCall(at, 5, tcPodKey, "203.0.113.7"),              // (b)
		tcCall(at, 6, tcTaskKey, "3.9.9.9"),                 // (c) the affiliate account's instance
		tcCall(at, 7, tcPodKey, "3.7.7.7"),                  // (c) an AWS address no one claims
	}
	trail := filepath.Join(watched, "trail.json")
	os.WriteFile(trail, []byte(`{"Records":[`+strings.Join(calls, ",")+`]}`), 0o644)
	past := time.Now().Add(-time.Minute)
	os.Chtimes(trail, past, past)
	waitFor(t, "the trail read and judged", 20*time.Second, func() bool {
		return strings.Contains(errb.String(), `"event":"log_file_read"`) && regexp.MustCompile(`"event":"detect_cycle","files":1`).MatchString(errb.String())
	}, logs)
	cancel()
	stopped = true
	if code := <-done; code != 0 {
		t.Fatalf("serve exit %d: %s", code, logs())
	}

	bySource := map[string]detector.Finding{}
	for _, f := range decodeFindings(t, out.String()) {
		bySource[f.SourceIP] = f
	}
	for _, own := range []string{"3.5.1.11", "2600:1f18:1111:2222::20"} {
		if f, ok := bySource[own]; ok {
			t.Errorf("use from the host's own address %s raised a finding: %+v", own, f)
		}
	}
	want := []struct {
		src, key, typ, severity, sourceAccount, endpoint, role, placedBy string
	}{
		{"198.51.100.23", tcTaskKey, detector.TypeOutsideAWS, detector.High, "", "ecs", "billing-task", detector.PlacedByFingerprint},
		{"203.0.113.7", tcPodKey, detector.TypeOutsideAWS, detector.High, "", "pod_identity", "payments-api", detector.PlacedByFingerprint},
		// Placed by the inventory: the evidence that the source is the other account's.
		{"3.9.9.9", tcTaskKey, detector.TypeInsideAWS, detector.Medium, tcAffiliate, "ecs", "billing-task", detector.PlacedByInventory},
		{"3.7.7.7", tcPodKey, detector.TypeInsideAWS, detector.High, "", "pod_identity", "payments-api", detector.PlacedByFingerprint},
	}
	for _, w := range want {
		f, ok := bySource[w.src]
		if !ok {
			t.Errorf("no finding for the use from %s; findings:\n%s", w.src, out.String())
			continue
		}
		if f.AccessKeyID != w.key || f.Type != w.typ || f.Severity != w.severity || f.SourceAccountID != w.sourceAccount ||
			f.Endpoint != w.endpoint || f.Role != w.role || f.InstanceID != tcHost || f.AccountID != tcAccount ||
			f.CredentialSource != "fingerprint" || f.PlacedBy != w.placedBy || f.IMDSVersion != "" {
			t.Errorf("finding for %s: %+v; want %+v", w.src, f, w)
		}
		if len(f.Processes) != 1 {
			t.Errorf("finding for %s names %d processes: %+v", w.src, len(f.Processes), f.Processes)
			continue
		}
		p := f.Processes[0]
		switch w.key {
		case tcTaskKey:
			if p.PID != 4242 || p.Exe != "/usr/local/bin/billing" || p.ContainerRuntime != "docker" || p.ECSTask == nil ||
				p.ECSTask.ARN != tcTaskARN || p.ECSTask.Family != "billing" || p.ECSTask.Container != "worker" {
				t.Errorf("finding for %s does not name the task's process: %+v %+v", w.src, p, p.ECSTask)
			}
			if !strings.Contains(f.Reason, "ECS task "+tcTaskARN) || !strings.Contains(f.Reason, "container worker") {
				t.Errorf("reason does not name the task: %q", f.Reason)
			}
		case tcPodKey:
			if p.PID != 5151 || p.Exe != "/app/api" || p.Pod == nil || p.Pod.Namespace != "payments" || p.Pod.Name != "api-0" ||
				p.Pod.ServiceAccount != "api" || p.Pod.Container != "api" {
				t.Errorf("finding for %s does not name the pod's process: %+v %+v", w.src, p, p.Pod)
			}
			if !strings.Contains(f.Reason, "pod payments/api-0") || !strings.Contains(f.Reason, "container api") {
				t.Errorf("reason does not name the pod: %q", f.Reason)
			}
		}
	}
	if len(bySource) != len(want) {
		t.Errorf("%d findings, want %d:\n%s", len(bySource), len(want), out.String())
	}
}
