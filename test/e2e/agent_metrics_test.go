package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/metrics"
	"github.com/imdsguard/imdsguard/internal/agent/metrics/metricstest"
	"github.com/imdsguard/imdsguard/internal/testing/testbed"
)

// TestPrivilegedAgentPublishesMetrics runs the agent binary on the test bed with every
// metrics sink on, runs the bed's clients, and checks that CloudWatch (a stand-in that
// decodes the SDK's real requests), the EMF lines, the Prometheus scrape and
// `imdsguard status` all tell the numbers the event lines do. The agent learns its
// identity and its credentials (standard chain, EC2 role) from the bed's IMDS emulator,
// as it would on EC2.
func TestPrivilegedAgentPublishesMetrics(t *testing.T) {
	bed := testbed.Start(t, testbed.Options{})
	// Nothing from the host's AWS configuration may stand in for the credential chain.
	for _, v := range []string{"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
		"AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_CLOUDWATCH", "AWS_EC2_METADATA_DISABLED",
		"AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
		"AWS_WEB_IDENTITY_TOKEN_FILE"} {
		t.Setenv(v, "")
	}
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(bed.Dir, "no-aws-config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(bed.Dir, "no-aws-credentials"))

	// The CloudWatch stand-in listens inside the bed's namespace, where the agent runs.
	cw := metricstest.NewCloudWatch()
	var ln net.Listener
	if err := testbed.InNetns(bed.NetnsPath, func() error {
		var err error
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatalf("listen in the bed: %v", err)
	}
	srv := &http.Server{Handler: cw}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	emfPath := filepath.Join(bed.Dir, "emf.log")
	const promAddr = "127.0.0.1:9775" // inside the bed's private namespace
	agent, err := bed.StartAgent(fmt.Sprintf(`metrics:
  interval: 1s
  max_executables: 20
  cloudwatch:
    enabled: true
    endpoint: http://%s
  emf:
    output: %s
  prometheus:
    listen: %s
`, ln.Addr(), emfPath, promAddr))
	if err != nil {
		t.Fatal(err)
	}
	// Clients run once the instance is known, so every interval carries InstanceId.
	if err := waitLog(agent, `"event":"identity_learnt"`); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	runs, err := bed.RunClients(ctx)
	if err != nil {
		t.Fatalf("clients: %v", err)
	}
	var pids []int
	for _, r := range runs {
		pids = append(pids, r.PID)
	}
	events, err := agent.WaitEvents(pids...)
	if err != nil {
		t.Fatal(err)
	}
	// What every sink must say, from the event lines.
	want := map[string]float64{}
	inst := "InstanceId=" + bed.InstanceID
	var connects []testbed.Event
	v1 := 0
	for _, e := range events {
		switch {
		case e.Event == "imds_connect":
			connects = append(connects, e)
		case e.Event == "imds_request" && e.IMDSVersion == "v1" && e.Refused == "":
			v1++
		}
	}
	events = connects // MetadataRequests counts connections; requests are counted by version
	for _, e := range events {
		want["MetadataRequests{"+inst+"}"]++
		want["MetadataRequests{Executable="+e.Exe+","+inst+"}"]++
		want["MetadataRequests{"+inst+",User="+e.User+"}"]++
		// The test bed's cgroup is no runtime's container: the host.
		want["MetadataRequests{Container=host,"+inst+"}"]++
	}
	if want["MetadataRequests{"+inst+",User=nobody}"] != 1 || want["MetadataRequests{Executable=/usr/bin/curl,"+inst+"}"] < 5 {
		t.Fatalf("unexpected events: %v", want)
	}

	// Prometheus: counters advance each interval; wait for the total to catch up.
	scrape := bed.HTTPClient()
	promURL := "http://" + promAddr + "/metrics"
	deadline := time.Now().Add(20 * time.Second)
	for {
		fams, err := metricstest.Scrape(scrape, promURL)
		if err == nil {
			if v, _ := metricstest.Counter(fams, "imdsguard_metadata_requests_total", "", ""); v == float64(len(events)) {
				for key, n := range want {
					label, value := promLabel(key)
					if label == "" {
						continue
					}
					family := "imdsguard_metadata_requests_by_" + label + "_total"
					if got, _ := metricstest.Counter(fams, family, label, value); got != n {
						t.Errorf("prometheus %s{%s=%q} = %v, want %v", family, label, value, got, n)
					}
				}
				// The broker's IMDSv1 count: what AWS's MetadataNoToken says, per process.
				// Request lines reach the file within the writer's flush interval: read
				// them until they match or a deadline says they never will.
				got, _ := metricstest.Counter(fams, metrics.PromName(metrics.MetadataNoToken), "", "")
				for until := time.Now().Add(3 * time.Second); got != float64(v1) && time.Now().Before(until); time.Sleep(50 * time.Millisecond) {
					v1 = countV1(t, agent)
				}
				if got != float64(v1) || v1 == 0 {
					t.Errorf("prometheus MetadataNoToken = %v, want %d IMDSv1 requests", got, v1)
				}
				if info := fams["imdsguard_instance_info"]; info == nil || !strings.Contains(info.String(), bed.InstanceID) {
					t.Errorf("instance info: %v", info)
				}
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus never reached %d requests (last error %v)\n%s", len(events), err, agent.Log())
		}
		time.Sleep(200 * time.Millisecond)
	}

	// imdsguard status, as an operator runs it.
	bin, err := testbed.Agent()
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "status", "--socket", agent.StatusSocket).CombinedOutput()
	if err != nil {
		t.Fatalf("imdsguard status: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "instance "+bed.InstanceID) || !statusRow(string(out), "/usr/bin/curl", "nobody", "host", 1) {
		t.Errorf("status table:\n%s", out)
	}
	t.Logf("imdsguard status:\n%s", out)

	// For the record: the agent's resident memory with every sink on.
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", agent.Cmd.Process.Pid)); err == nil {
		for _, line := range strings.Split(string(st), "\n") {
			if strings.HasPrefix(line, "VmRSS:") || strings.HasPrefix(line, "VmHWM:") {
				t.Logf("agent %s", strings.Join(strings.Fields(line), " "))
			}
		}
	}

	// Stop: the last interval is published to every sink before exit.
	if err := agent.Stop(); err != nil {
		t.Fatalf("agent exit: %v\n%s", err, agent.Log())
	}

	// EMF: every line valid, the sums equal the events.
	data, err := os.ReadFile(emfPath)
	if err != nil {
		t.Fatal(err)
	}
	emf := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		vals, err := metricstest.ValidateEMF(sc.Bytes())
		if err != nil {
			t.Fatalf("invalid EMF line: %v\n%s", err, sc.Bytes())
		}
		for k, v := range vals {
			emf[k] += v
		}
	}
	checkSums(t, "emf", emf, want)

	// CloudWatch: decoded from the wire, signed with the role credentials from IMDS.
	if errs := cw.Errors(); len(errs) > 0 {
		t.Fatalf("CloudWatch stand-in refused requests: %v", errs)
	}
	reqs := cw.Requests()
	if len(reqs) == 0 {
		t.Fatalf("no PutMetricData received\n%s", agent.Log())
	}
	for _, r := range reqs {
		if !strings.Contains(r.Authorization, "Credential="+bed.Creds.AccessKeyID+"/") ||
			!strings.Contains(r.Authorization, "/us-east-1/monitoring/") {
			t.Errorf("request not signed with the instance role in the instance's region: %q", r.Authorization)
		}
	}
	checkSums(t, "cloudwatch", cw.Sums(), want)
	for _, d := range cw.Datums() {
		if d.Namespace != "IMDSGuard" {
			t.Errorf("namespace %q", d.Namespace)
		}
	}
	t.Logf("%d events; %d PutMetricData requests, %d data points; %d EMF lines", len(events), len(reqs),
		len(cw.Datums()), bytes.Count(data, []byte("\n")))
}

// checkSums compares the MetadataRequests sums of a sink with the events' counts and
// checks that nothing counted was left out or invented.
func checkSums(t *testing.T, sink string, got, want map[string]float64) {
	t.Helper()
	for k, n := range want {
		if got[k] != n {
			t.Errorf("%s %s = %v, want %v", sink, k, got[k], n)
		}
	}
	for k, v := range got {
		if strings.HasPrefix(k, "MetadataRequests{") && v != 0 && want[k] == 0 {
			t.Errorf("%s %s = %v, not in the events", sink, k, v)
		}
	}
}

// promLabel maps a "MetadataRequests{Executable=x,InstanceId=i}" key to its Prometheus
// label ("executable", "x"); "" for the per-instance key.
func promLabel(key string) (string, string) {
	inner := strings.TrimSuffix(key[strings.Index(key, "{")+1:], "}")
	for _, kv := range strings.Split(inner, ",") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "Executable":
			return "executable", v
		case "User":
			return "user", v
		case "Container":
			return "container", v
		}
	}
	return "", ""
}

func statusRow(table, exe, user, container string, requests int) bool {
	for _, line := range strings.Split(table, "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[0] == exe && f[1] == user && f[2] == container && f[3] == fmt.Sprint(requests) {
			return true
		}
	}
	return false
}

func waitLog(a *testbed.AgentProc, want string) error {
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(a.Log(), want) {
		if time.Now().After(deadline) {
			return errors.New("agent never logged " + want + ":\n" + a.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// countV1 counts the IMDSv1 requests the broker answered, as MetadataNoToken does.
func countV1(t *testing.T, agent *testbed.AgentProc) int {
	t.Helper()
	events, err := agent.Events()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range events {
		if e.Event == "imds_request" && e.IMDSVersion == "v1" && e.Refused == "" {
			n++
		}
	}
	return n
}
