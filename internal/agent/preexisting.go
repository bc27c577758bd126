package agent

import (
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/imdsguard/imdsguard/internal/agent/events"
	"github.com/imdsguard/imdsguard/internal/agent/procinfo"
	"github.com/imdsguard/imdsguard/internal/agent/sockdiag"
)

// reportPreexisting writes one imds_preexisting line per IMDS connection that was open
// before the hooks were attached: no hook saw it, so it is reported by process here.
func (a *agent) reportPreexisting() {
	port := uint16(a.cfg.IMDS.Port)
	conns, err := sockdiag.Existing([]netip.AddrPort{
		netip.AddrPortFrom(a.cfg.IMDS.Addr4, port), netip.AddrPortFrom(a.cfg.IMDS.Addr6, port),
	})
	if err != nil {
		a.log.Warn().Err(err).Str("event", "preexisting_scan_failed").Msg("cannot list open IMDS connections")
		return
	}
	n := 0
	for _, c := range conns {
		if c.PID == os.Getpid() {
			continue // the agent's own (marked) connection, e.g. learning its identity
		}
		n++
		p := procinfo.Process{PID: uint32(c.PID), UID: c.UID}
		if stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(c.PID), "stat")); err == nil {
			if ticks, err := procinfo.StartTicks(stat); err == nil {
				p.StartBoottime = ticks * procinfo.NsPerTick
			}
		}
		info := a.resolver.Resolve(p)
		a.out.Write(events.Record{Kind: events.KindPreexisting, Time: time.Now(), PID: uint32(c.PID), UID: c.UID,
			User: info.User, Exe: info.Exe, Cmdline: info.Cmdline, Cgroup: info.Cgroup, Unit: info.Unit,
			ContainerID: info.ContainerID, Container: info.Container, Dst: c.Dst.String(), Verdict: "unguarded", Missing: info.Missing})
	}
	if n > 0 {
		a.log.Warn().Str("event", "preexisting_connections").Int("count", n).
			Msg("IMDS connections opened before the agent started are not guarded until they close")
	}
	_ = a.out.Flush()
}
