package ctcorpus

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net/netip"
	"time"

	"github.com/imdsguard/imdsguard/internal/wire"
)

// Large writes a CloudTrail log body of n records to w, streaming: the traffic of
// `instances` instances (each with a fingerprint and its own address), their AssumeRole
// issuance, service principal calls, and one use in a thousand from an outside address.
// It returns the fingerprints the records assume.
func Large(w io.Writer, n, instances int, seed int64) ([]wire.Fingerprint, error) {
	g := &gen{c: &Corpus{}, rnd: rand.New(rand.NewSource(seed))}
	bw := bufio.NewWriterSize(w, 1<<20)
	fps := make([]wire.Fingerprint, instances)
	ids := make([]identity, instances)
	for i := range fps {
		inst := fmt.Sprintf("i-%017x", 0xabc0000000000+i)
		ids[i] = identity{key: fmt.Sprintf("ASIALARGE%011d", i), account: Account, role: fmt.Sprintf("app%d", i%50), session: inst, delivery: "2.0"}
		fps[i] = wire.Fingerprint{ID: fmt.Sprintf("fp-%d", i), AccessKeyID: ids[i].key, Role: ids[i].role, LastUpdated: Base, Expiration: Base.Add(6 * time.Hour),
			Instance:      wire.Instance{ID: inst, AccountID: Account, Region: "us-east-1"},
			HostAddresses: []netip.Addr{netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), netip.AddrFrom4([4]byte{3, 5, byte(i >> 8), byte(i)})},
			IMDSVersion:   "v2", Process: wire.Process{PID: 1000 + i, Exe: "/usr/bin/app", User: "app"}}
	}
	if _, err := bw.WriteString(`{"Records":[`); err != nil {
		return nil, fmt.Errorf("write corpus: %w", err)
	}
	step := 6 * time.Hour / time.Duration(n+1)
	for j := 0; j < n; j++ {
		at := Base.Add(time.Duration(j) * step)
		i := g.rnd.Intn(instances)
		var r map[string]any
		switch k := g.rnd.Intn(1000); {
		case k < 5:
			g.assumeRole(at, "ec2.amazonaws.com", ids[i].role, ids[i].session, ids[i].key, at.Add(6*time.Hour))
			r = g.c.Records[len(g.c.Records)-1]
		case k < 50:
			r = g.call(at, ids[i], "cloudformation.amazonaws.com", invokedBy("cloudformation.amazonaws.com"))
		case k < 60:
			r = g.call(at, ids[i], fmt.Sprintf("10.1.%d.%d", i>>8, i&255), vpce("vpce-0large", Account))
		case k == 999:
			r = g.call(at, ids[i], fmt.Sprintf("192.0.2.%d", g.rnd.Intn(250)+1))
		default:
			r = g.call(at, ids[i], fmt.Sprintf("3.5.%d.%d", i>>8, i&255))
		}
		g.c.Records, g.c.Labels = g.c.Records[:0], g.c.Labels[:0]
		b, err := json.Marshal(r)
		if err != nil {
			return nil, fmt.Errorf("marshal record: %w", err)
		}
		if j > 0 {
			bw.WriteByte(',')
		}
		bw.WriteByte('\n')
		if _, err := bw.Write(b); err != nil {
			return nil, fmt.Errorf("write corpus: %w", err)
		}
	}
	if _, err := bw.WriteString("]}\n"); err != nil {
		return nil, fmt.Errorf("write corpus: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("write corpus: %w", err)
	}
	return fps, nil
}
