package detector

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/cloudtrail"
	"github.com/imdsguard/imdsguard/internal/correlator/inventory"
	"github.com/imdsguard/imdsguard/internal/correlator/ipranges"
	"github.com/imdsguard/imdsguard/internal/testing/ctcorpus"
)

const (
	acct  = "111111111111"
	instA = "i-0a1a1a1a1a1a1a1a1"
	instB = "i-0b2b2b2b2b2b2b2b2"
	keyA  = "ASIAPLACEMENTKEYA"
)

var t0 = time.Date(2026, 11, 20, 10, 0, 0, 0, time.UTC)

// rec builds a CloudTrail record as AWS logs it and reads it back through the reader.
type rec map[string]any

func call(min int, key, inst, src string, extra ...func(rec)) rec {
	r := rec{"eventVersion": "1.09", "eventTime": t0.Add(time.Duration(min) * time.Minute).Format(time.RFC3339),
		"eventSource": "s3.amazonaws.com", "eventName": "ListBuckets", "awsRegion": "us-east-1", "sourceIPAddress": src,
		"eventID": fmt.Sprintf("e-%d-%s", min, src), "recipientAccountId": acct,
		"userIdentity": map[string]any{"type": "AssumedRole", "arn": "arn:aws:sts::" + acct + ":assumed-role/web/" + inst, "accountId": acct,
			"accessKeyId": key, "sessionContext": map[string]any{"sessionIssuer": map[string]any{"type": "Role", "userName": "web", "accountId": acct},
				"ec2RoleDelivery": "2.0"}}}
	for _, e := range extra {
		e(r)
	}
	return r
}

func ec2Event(min int, name string, req, resp map[string]any) rec {
	return rec{"eventVersion": "1.09", "eventTime": t0.Add(time.Duration(min) * time.Minute).Format(time.RFC3339),
		"eventSource": "ec2.amazonaws.com", "eventName": name, "awsRegion": "us-east-1", "sourceIPAddress": "198.51.100.1",
		"recipientAccountId": acct, "userIdentity": map[string]any{"type": "IAMUser", "accountId": acct},
		"requestParameters": req, "responseElements": resp}
}

func observeAll(t *testing.T, d *Detector, recs ...rec) {
	t.Helper()
	doc, _ := json.Marshal(map[string]any{"Records": recs})
	st := cloudtrail.Read("t.json", bytes.NewReader(doc), func(r *cloudtrail.Record, _ cloudtrail.Pos) { d.Observe(r) }, nil)
	if st.Records != int64(len(recs)) {
		t.Fatalf("read %d of %d records", st.Records, len(recs))
	}
}

func newTestDetector(t *testing.T, log zerolog.Logger) *Detector {
	t.Helper()
	ranges, err := ipranges.Parse(strings.NewReader(ctcorpus.IPRangesJSON))
	if err != nil {
		t.Fatal(err)
	}
	return New(Options{Ranges: ranges, Log: log})
}

func findingsBySource(d *Detector) map[string]Finding {
	out := map[string]Finding{}
	for _, f := range d.Findings() {
		out[f.SourceIP+"|"+f.VPCEndpointID] = f
	}
	return out
}

func vpce(id, account string) func(rec) {
	return func(r rec) {
		r["vpcEndpointId"] = id
		if account != "" {
			r["vpcEndpointAccountId"] = account
		}
	}
}

func TestVPCEndpointOfUnknownOwner(t *testing.T) {
	use := call(10, keyA, instA, "10.0.9.9", vpce("vpce-0unknown", ""))
	d := newTestDetector(t, zerolog.Nop())
	observeAll(t, d, use)
	f, ok := findingsBySource(d)["10.0.9.9|vpce-0unknown"]
	if !ok || f.Type != TypeInsideAWS || f.Severity != Medium || !strings.HasPrefix(f.Reason, "VPC endpoint of unknown owner") {
		t.Fatalf("finding %+v (found %v)", f, ok)
	}
	// Each of these makes the endpoint the account's own: no finding.
	known := map[string]func(*Detector){
		"inventory": func(d *Detector) {
			d.AddInventory(&inventory.Inventory{Endpoints: []inventory.Endpoint{{ID: "vpce-0unknown", OwnerID: acct}}})
		},
		"CreateVpcEndpoint": func(d *Detector) {
			observeAll(t, d, ec2Event(50, "CreateVpcEndpoint", map[string]any{"vpcId": "vpc-1"},
				map[string]any{"CreateVpcEndpointResponse": map[string]any{"vpcEndpoint": map[string]any{"vpcEndpointId": "vpce-0unknown", "ownerId": acct}}}))
		},
		"another record naming its account": func(d *Detector) {
			observeAll(t, d, call(60, keyA, instA, "10.0.9.10", vpce("vpce-0unknown", acct)))
		},
	}
	for name, teach := range known {
		d := newTestDetector(t, zerolog.Nop())
		observeAll(t, d, use)
		teach(d)
		if fs := d.Findings(); len(fs) != 0 {
			t.Errorf("%s: endpoint known, yet %s: %s", name, ShortType(fs[0].Type), fs[0].Reason)
		}
	}
	// Known, but another account's: InsideAWS High.
	d = newTestDetector(t, zerolog.Nop())
	d.AddInventory(&inventory.Inventory{Endpoints: []inventory.Endpoint{{ID: "vpce-0unknown", OwnerID: "999999999999"}}})
	observeAll(t, d, use)
	if f := findingsBySource(d)["10.0.9.9|vpce-0unknown"]; f.Type != TypeInsideAWS || f.Severity != High || f.SourceAccountID != "999999999999" {
		t.Fatalf("another account's endpoint: %+v", f)
	}
}

func TestElasticIPByAllocationID(t *testing.T) {
	// B's elastic IP, associated by allocation id (the VPC way); A's key used from it.
	assoc := ec2Event(5, "AssociateAddress", map[string]any{"allocationId": "eipalloc-0b", "instanceId": instB},
		map[string]any{"_return": true, "associationId": "eipassoc-0b"})
	alloc := ec2Event(1, "AllocateAddress", map[string]any{"domain": "vpc"}, map[string]any{"publicIp": "3.5.7.7", "allocationId": "eipalloc-0b", "domain": "vpc"})
	d := newTestDetector(t, zerolog.Nop())
	// The records arrive in any order: the association before the allocation.
	observeAll(t, d, call(3, keyA, instA, "3.5.1.11"), call(20, keyA, instA, "3.5.7.7"), assoc, alloc)
	f := findingsBySource(d)["3.5.7.7|"]
	if f.Type != TypeOtherInstance || f.PlacedBy != PlacedByTrail || !strings.Contains(f.Reason, instB) {
		t.Fatalf("use from another instance's elastic IP: %+v", f)
	}
	// Disassociated before the use: the address is no longer B's.
	d = newTestDetector(t, zerolog.Nop())
	observeAll(t, d, call(3, keyA, instA, "3.5.1.11"), call(20, keyA, instA, "3.5.7.7"), assoc, alloc,
		ec2Event(10, "DisassociateAddress", map[string]any{"associationId": "eipassoc-0b"}, map[string]any{"_return": true}))
	if f := findingsBySource(d)["3.5.7.7|"]; f.Type == TypeOtherInstance {
		t.Fatalf("after DisassociateAddress still B's: %+v", f)
	}
	// Released before the use, by allocation id: likewise.
	d = newTestDetector(t, zerolog.Nop())
	observeAll(t, d, call(3, keyA, instA, "3.5.1.11"), call(20, keyA, instA, "3.5.7.7"), assoc, alloc,
		ec2Event(10, "ReleaseAddress", map[string]any{"allocationId": "eipalloc-0b"}, map[string]any{"_return": true}))
	if f := findingsBySource(d)["3.5.7.7|"]; f.Type == TypeOtherInstance {
		t.Fatalf("after ReleaseAddress still B's: %+v", f)
	}
}

func TestInventoryBeforeGuess(t *testing.T) {
	// The thief's AWS-hosted use comes first; the host's own calls later, from its
	// public address and its IPv6 address.
	recs := []rec{call(1, keyA, instA, "52.9.9.9"), call(5, keyA, instA, "3.5.1.11"), call(6, keyA, instA, "2600:1f18:aaaa:bbbb::11"),
		call(7, keyA, instA, "3.225.16.109")}
	d := newTestDetector(t, zerolog.Nop())
	observeAll(t, d, recs...)
	guessed := findingsBySource(d)
	if _, ok := guessed["3.5.1.11|"]; !ok {
		t.Fatalf("without an inventory the guess was expected to miss (and flag the host): %v", guessed)
	}
	if f := guessed["3.5.1.11|"]; f.PlacedBy != PlacedByGuess {
		t.Fatalf("placed_by %q, want guess", f.PlacedBy)
	}
	inv, err := inventory.Load("../inventory/testdata/network-interfaces.json")
	if err != nil {
		t.Fatal(err)
	}
	d = newTestDetector(t, zerolog.Nop())
	d.AddInventory(inv)
	observeAll(t, d, recs...)
	got := findingsBySource(d)
	f, ok := got["52.9.9.9|"]
	if len(got) != 1 || !ok || f.Type != TypeInsideAWS || f.PlacedBy != PlacedByInventory {
		t.Fatalf("with the inventory: %v", got)
	}
}

func TestLambdaKnownByItsFunction(t *testing.T) {
	const keyL = "ASIALAMBDAKEY"
	use := call(10, keyL, "billing-fn", "198.51.100.23", func(r rec) {
		ui := r["userIdentity"].(map[string]any)
		ui["arn"] = "arn:aws:sts::" + acct + ":assumed-role/billing-role/billing-fn"
		ui["sessionContext"] = map[string]any{"sessionIssuer": map[string]any{"type": "Role", "userName": "billing-role", "accountId": acct}}
	})
	create := rec{"eventVersion": "1.08", "eventTime": t0.Format(time.RFC3339), "eventSource": "lambda.amazonaws.com", "eventName": "CreateFunction20150331",
		"sourceIPAddress": "198.51.100.1", "recipientAccountId": acct, "userIdentity": map[string]any{"type": "IAMUser", "accountId": acct},
		"requestParameters": map[string]any{"functionName": "billing-fn", "role": "arn:aws:iam::" + acct + ":role/billing-role"},
		"responseElements": map[string]any{"functionName": "billing-fn", "functionArn": "arn:aws:lambda:us-east-1:" + acct + ":function:billing-fn",
			"role": "arn:aws:iam::" + acct + ":role/billing-role"}}
	d := newTestDetector(t, zerolog.Nop())
	observeAll(t, d, use)
	if fs := d.Findings(); len(fs) != 0 {
		t.Fatalf("unknown key flagged: %+v", fs)
	}
	for name, teach := range map[string]func(*Detector){
		"trail": func(d *Detector) { observeAll(t, d, create) },
		"inventory": func(d *Detector) {
			inv, _ := inventory.Load("../inventory/testdata/functions.json")
			d.AddInventory(inv)
		},
	} {
		d := newTestDetector(t, zerolog.Nop())
		observeAll(t, d, use)
		teach(d)
		fs := d.Findings()
		if len(fs) != 1 || fs[0].Type != TypeResourceOutsideAWS || fs[0].FunctionName != "billing-fn" || fs[0].CredentialSource != "function" {
			t.Fatalf("%s: %+v", name, fs)
		}
	}
}

func TestDroppedRecordsCountedAndLoggedOncePerCause(t *testing.T) {
	var logs bytes.Buffer
	d := newTestDetector(t, zerolog.New(&logs))
	observeAll(t, d, call(1, keyA, instA, ""), call(2, keyA, instA, ""), call(3, keyA, instA, "not-an-address"),
		call(4, "ASIAHUMAN", "alice", ""), // not an instance key: not reported
		call(5, keyA, instA, "3.5.1.11"))
	d.Findings()
	d.Findings()
	got := d.Dropped()
	if got[DropNoSource] != 2 || got[DropBadSource] != 1 || len(got) != 2 {
		t.Fatalf("dropped %v", got)
	}
	if n := strings.Count(logs.String(), `"event":"records_dropped"`); n != 2 {
		t.Fatalf("%d drop log lines, want one per cause:\n%s", n, logs.String())
	}
}

// TestSetInventoryReplaces: a newer inventory replaces the older one (the poller's
// rounds), while AddInventory adds; what the trail taught stays.
func TestSetInventoryReplaces(t *testing.T) {
	recs := []rec{call(1, keyA, instA, "52.9.9.9"), call(5, keyA, instA, "3.5.1.11"), call(6, keyA, instA, "2600:1f18:aaaa:bbbb::11"),
		call(7, keyA, instA, "3.225.16.109")}
	inv, err := inventory.Load("../inventory/testdata/network-interfaces.json")
	if err != nil {
		t.Fatal(err)
	}
	d := newTestDetector(t, zerolog.Nop())
	d.SetInventory(&inventory.Inventory{Endpoints: []inventory.Endpoint{{ID: "vpce-0old", OwnerID: acct}}})
	d.SetInventory(inv)
	observeAll(t, d, recs...)
	if got := findingsBySource(d); len(got) != 1 || got["52.9.9.9|"].PlacedBy != PlacedByInventory {
		t.Fatalf("with the inventory set: %v", got)
	}
	if _, ok := d.endpointOwner("vpce-0old"); ok {
		t.Fatal("the replaced inventory's endpoint is still known")
	}
	// The instance's addresses are gone from the next round: back to the guess.
	d.SetInventory(&inventory.Inventory{})
	if got := findingsBySource(d); got["3.5.1.11|"].PlacedBy != PlacedByGuess {
		t.Fatalf("after the inventory was replaced by an empty one: %v", got)
	}
	d.AddInventory(inv)
	d.AddInventory(inv)
	if got := findingsBySource(d); len(got) != 1 || got["52.9.9.9|"].PlacedBy != PlacedByInventory {
		t.Fatalf("after adding it again: %v", got)
	}
}
