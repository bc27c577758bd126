package capture

import (
	"bytes"
	"encoding/json"
	"path/filepath"
	"testing"
	"time"

	"github.com/imdsguard/imdsguard/internal/wire"
)

func TestCaptureKeepsNoSecrets(t *testing.T) {
	body := []byte(`{"Code":"Success","LastUpdated":"2026-11-23T10:00:00Z","Type":"AWS-HMAC","AccessKeyId":"ASIATESTKEY","SecretAccessKey":"VERYSECRETVALUE","Token":"SESSIONTOKENVALUE","Expiration":"2026-11-23T16:00:00Z"}`)
	secret, err := HostSecret(filepath.Join(t.TempDir(), "state", "host.key"))
	if err != nil {
		t.Fatal(err)
	}
	c := NewCapturer(secret, func() wire.Instance { return wire.Instance{ID: "i-1"} }, nil)
	proc := wire.Process{PID: 42, Exe: "/usr/bin/curl", User: "root"}
	fp, first, err := c.Observe("/latest/meta-data/iam/security-credentials/web", body, proc, 7, "v2")
	if err != nil || !first {
		t.Fatalf("first observe: %v %v", first, err)
	}
	if fp.AccessKeyID != "ASIATESTKEY" || fp.Role != "web" || fp.Instance.ID != "i-1" || fp.Process.PID != 42 ||
		fp.IMDSVersion != "v2" || len(fp.TokenHMAC) != 64 || fp.ID == "" || fp.Expiration.IsZero() {
		t.Fatalf("fingerprint %+v", fp)
	}
	out, _ := json.Marshal(fp)
	for _, s := range []string{"VERYSECRETVALUE", "SESSIONTOKENVALUE"} {
		if bytes.Contains(out, []byte(s)) {
			t.Fatalf("fingerprint carries a secret: %s", out)
		}
	}
	again, first, _ := c.Observe("/latest/meta-data/iam/security-credentials/web", body, proc, 7, "v2")
	if first || again.ID != fp.ID {
		t.Fatalf("repeat: first=%v id %s vs %s", first, again.ID, fp.ID)
	}
	other, first, _ := c.Observe("/latest/meta-data/iam/security-credentials/web", body, wire.Process{PID: 43}, 9, "v1")
	if !first || other.ID == fp.ID {
		t.Fatal("another process's fetch is another fingerprint")
	}
	if _, _, err := c.Observe("/x", []byte("not json SESSIONTOKENVALUE"), proc, 7, "v1"); err == nil || bytes.Contains([]byte(err.Error()), []byte("SESSION")) {
		t.Fatalf("bad body error %v", err)
	}
}

// Credentials from the ECS and Pod Identity endpoints: the role from the answer (never
// the path, which holds the task's credentials id), the endpoint named, no secret kept.
func TestCaptureContainerEndpoints(t *testing.T) {
	c := NewCapturer([]byte("k"), nil, nil)
	before := time.Now().UTC().Truncate(time.Second)
	ecs := []byte(`{"RoleArn":"arn:aws:iam::123456789012:role/app/task-a","AccessKeyId":"ASIAECS","SecretAccessKey":"ECSSECRET","Token":"ECSTOKEN","Expiration":"2026-11-23T16:00:00Z"}`)
	fp, _, err := c.ObserveEndpoint("ecs", "/v2/credentials/SECRETID", ecs, wire.Process{PID: 1}, 1, "")
	if err != nil || fp.Endpoint != "ecs" || fp.Role != "task-a" || fp.RoleARN != "arn:aws:iam::123456789012:role/app/task-a" ||
		fp.AccessKeyID != "ASIAECS" || fp.Expiration.IsZero() {
		t.Fatalf("ecs fingerprint %+v %v", fp, err)
	}
	pod := []byte(`{"AccessKeyId":"ASIAPOD","SecretAccessKey":"PODSECRET","Token":"PODTOKEN","AccountId":"123456789012","Expiration":"2026-11-23T16:00:00Z"}`)
	fp2, _, err := c.ObserveEndpoint("pod_identity", "/v1/credentials", pod, wire.Process{PID: 1}, 1, "")
	if err != nil || fp2.Endpoint != "pod_identity" || fp2.Role != "" || fp2.AccessKeyID != "ASIAPOD" {
		t.Fatalf("pod identity fingerprint %+v %v", fp2, err)
	}
	// Neither answer says when its key was issued: the fetch is when the host had it.
	after := time.Now().UTC()
	for _, f := range []wire.Fingerprint{fp, fp2} {
		if f.LastUpdated.Before(before) || f.LastUpdated.After(after) {
			t.Fatalf("%s: last_updated %v, want the fetch time (%v..%v)", f.Endpoint, f.LastUpdated, before, after)
		}
	}
	out, _ := json.Marshal([]wire.Fingerprint{fp, fp2})
	for _, s := range []string{"SECRETID", "ECSSECRET", "ECSTOKEN", "PODSECRET", "PODTOKEN"} {
		if bytes.Contains(out, []byte(s)) {
			t.Fatalf("fingerprint carries %s: %s", s, out)
		}
	}
}
