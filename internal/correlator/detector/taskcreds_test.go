package detector

import (
	"net/netip"
	"testing"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/fpstore"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// TestPodIdentityKeyTakesItsRoleFromTheTrail: the Pod Identity agent's answer names no
// role, so the key's credential (what investigate prints) takes the role of the session
// CloudTrail shows; the finding's reason names the pod, and a key fetched from IMDS gets
// no such clause.
func TestPodIdentityKeyTakesItsRoleFromTheTrail(t *testing.T) {
	const podKey = "ASIAPODROLE00000001"
	fps := fpstore.NewMemory()
	fps.Add(wire.Fingerprint{ID: "pod", AccessKeyID: podKey, Endpoint: "pod_identity",
		Instance: wire.Instance{ID: instA, AccountID: acct}, HostAddresses: []netip.Addr{netip.MustParseAddr("3.5.1.11")},
		Process: wire.Process{PID: 7, Exe: "/app", Pod: &wire.Pod{Namespace: "payments", Name: "api-0", ServiceAccount: "api"}}})
	fps.Add(wire.Fingerprint{ID: "imds", AccessKeyID: keyA, Role: "web", Instance: wire.Instance{ID: instA, AccountID: acct},
		HostAddresses: []netip.Addr{netip.MustParseAddr("3.5.1.11")}, Process: wire.Process{PID: 8, Exe: "/usr/bin/aws"}, IMDSVersion: "v2"})
	d := newTestDetector(t, zerolog.Nop())
	d.opt.Fingerprints = fps
	observeAll(t, d, call(1, podKey, "eks-prod-api-0-5f3c2a1b-7d8e-4f90-a1b2-c3d4e5f60718", "198.51.100.7"),
		call(2, keyA, instA, "198.51.100.8"))
	c, ok := d.Credential(podKey)
	if !ok || c.Role != "web" || c.Endpoint != "pod_identity" || c.InstanceID != instA {
		t.Fatalf("credential %+v %v: want role web from the trail, endpoint pod_identity, instance %s", c, ok, instA)
	}
	fs := findingsBySource(d)
	if r := fs["198.51.100.7|"].Reason; r != "198.51.100.7 is outside AWS's published ranges and not an egress address; "+
		"EKS Pod Identity credentials of pod payments/api-0 (service account api) on instance "+instA {
		t.Errorf("pod key's reason: %q", r)
	}
	if r := fs["198.51.100.8|"].Reason; r != "198.51.100.8 is outside AWS's published ranges and not an egress address" {
		t.Errorf("IMDS key's reason: %q", r)
	}
}
