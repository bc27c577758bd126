package config

import (
	"strings"
	"testing"
)

func TestEndpointsDefaultToIMDSAlone(t *testing.T) {
	cfg, err := Parse([]byte("imds:\n  ipv4: 10.0.0.1\n  port: 8080\n"))
	if err != nil {
		t.Fatal(err)
	}
	got := cfg.GuardedAddrs()
	if len(cfg.Endpoints) != 1 || cfg.Endpoints[0].Kind != EndpointIMDS || len(got) != 2 ||
		got[0].AddrPort.String() != "10.0.0.1:8080" || got[1].AddrPort.String() != "[fd00:ec2::254]:8080" {
		t.Fatalf("endpoints %+v, guarded %v", cfg.Endpoints, got)
	}
}

func TestEndpointsOptIn(t *testing.T) {
	cfg, err := Parse([]byte(`
endpoints:
  - kind: imds
  - kind: ecs
  - kind: pod_identity
    port: 8080
    addresses: [169.254.170.23]
`))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, g := range cfg.GuardedAddrs() {
		got = append(got, g.AddrPort.String()+"="+string(g.Kind))
	}
	want := "169.254.169.254:80=imds [fd00:ec2::254]:80=imds 169.254.170.2:80=ecs 169.254.170.23:8080=pod_identity"
	if strings.Join(got, " ") != want {
		t.Fatalf("guarded %q, want %q", strings.Join(got, " "), want)
	}
	cfg, err = Parse([]byte("endpoints:\n  - kind: pod_identity\n  - kind: imds\n"))
	if err != nil {
		t.Fatal(err)
	}
	if g := cfg.GuardedAddrs(); len(g) != 4 || g[0].AddrPort.String() != "169.254.170.23:80" || g[1].AddrPort.String() != "[fd00:ec2::23]:80" || g[2].Endpoint != 1 {
		t.Fatalf("pod identity defaults: %v", g)
	}
}

func TestEndpointsErrorsNameKeyAndLine(t *testing.T) {
	cases := []struct{ name, yaml, want string }{
		{"no imds", "endpoints:\n  - kind: ecs\n", "1: endpoints: must list the imds endpoint"},
		{"empty", "endpoints: []\n", "1: endpoints: must list at least"},
		{"bad kind", "endpoints:\n  - kind: imds\n  - kind: lambda\n", "3: endpoints[1].kind: must be imds, ecs or pod_identity"},
		{"no kind", "endpoints:\n  - kind: imds\n  - port: 80\n", "endpoints[1]: needs a kind"},
		{"twice", "endpoints:\n  - kind: imds\n  - kind: ecs\n  - kind: ecs\n", "4: endpoints[2].kind: \"ecs\" already listed as endpoints[1]"},
		{"imds addresses", "endpoints:\n  - kind: imds\n    port: 81\n", "endpoints[0]: the imds entry takes its addresses from imds.ipv4"},
		{"bad address", "endpoints:\n  - kind: imds\n  - kind: ecs\n    addresses:\n      - 169.254.170.2\n      - nowhere\n", "6: endpoints[1].addresses[1]: not a unicast"},
		{"loopback", "endpoints:\n  - kind: imds\n  - kind: ecs\n    addresses: [127.0.0.1]\n", "endpoints[1].addresses[0]: not a unicast"},
		{"port", "endpoints:\n  - kind: imds\n  - kind: ecs\n    port: 70000\n", "4: endpoints[1].port: must be 1-65535"},
		{"shared address", "endpoints:\n  - kind: imds\n  - kind: ecs\n    addresses: [169.254.169.254]\n", "endpoints[1].addresses[0]: 169.254.169.254:80 is already endpoints[0]'s"},
		{"shared with imds listed later", "endpoints:\n  - kind: ecs\n    addresses: [169.254.169.254]\n  - kind: imds\n", "endpoints[1].addresses[0]: 169.254.169.254:80 is already endpoints[0]'s"},
		{"unknown key", "endpoints:\n  - kind: imds\n    adress: x\n", "3: endpoints[0].adress: unknown key"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
		})
	}
}
