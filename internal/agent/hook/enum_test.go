package hook

import "testing"

// Every counter the kernel keeps is read into Stats, each into its own field: a new
// enum stat in bpf/ fails here until Stats carries it.
func TestStatsReadsEveryCounter(t *testing.T) {
	var s Stats
	seen := map[imdsguardStat]bool{}
	fields := map[*uint64]bool{}
	for _, c := range s.counters() {
		if seen[c.stat] || fields[c.dst] {
			t.Errorf("stat %d or its field listed twice", c.stat)
		}
		seen[c.stat], fields[c.dst] = true, true
	}
	for i := imdsguardStat(0); i < imdsguardStatSTAT_MAX; i++ {
		if !seen[i] {
			t.Errorf("kernel counter %d is not read into Stats", i)
		}
	}
	if len(seen) != int(imdsguardStatSTAT_MAX) {
		t.Errorf("%d counters read, the kernel has %d", len(seen), imdsguardStatSTAT_MAX)
	}
}

func TestStatsMapHoldsEveryCounter(t *testing.T) {
	spec, err := loadImdsguard()
	if err != nil {
		t.Fatal(err)
	}
	if n := spec.Maps[imdsguardMapStats].MaxEntries; n != uint32(imdsguardStatSTAT_MAX) {
		t.Errorf("stats map has %d entries, enum stat has %d", n, imdsguardStatSTAT_MAX)
	}
}

// The kernel's verdicts and flags reach Event and Redirect under their names.
func TestFromRawUsesKernelEnums(t *testing.T) {
	raw := imdsguardEvent{
		Verdict: uint8(imdsguardVerdictVERDICT_AUDIT_DENY),
		Rule:    uint8(imdsguardRuleRULE_NONE),
		Flags:   uint8(imdsguardFlagFLAG_REDIRECTED | imdsguardFlagFLAG_V2REQUIRED),
	}
	ev := fromRaw(&raw, clock{})
	if ev.Verdict != VerdictAuditDeny || ev.Verdict.String() != "audit_deny" {
		t.Errorf("verdict %v", ev.Verdict)
	}
	if ev.Rule != -1 || !ev.Redirected || !ev.V2Required {
		t.Errorf("rule %d, redirected %v, v2 %v", ev.Rule, ev.Redirected, ev.V2Required)
	}
	raw.Rule, raw.Flags = 3, 0
	if ev := fromRaw(&raw, clock{}); ev.Rule != 3 || ev.Redirected || ev.V2Required {
		t.Errorf("rule %d, redirected %v, v2 %v", ev.Rule, ev.Redirected, ev.V2Required)
	}
}
