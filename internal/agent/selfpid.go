package agent

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The kernel names the agent's own sockets by cookie, network namespace and the
// agent's tgid as the kernel sees it, in the initial pid namespace. An agent in a pid
// namespace of its own (systemd-nspawn, a container with its own pid namespace) has
// another pid in os.Getpid(): its own sockets would then be judged as a client's, and
// the broker's upstream connections redirected back to the broker, in a loop. So the
// agent asks the kernel: it connects once to IMDS from a socket whose cookie it knows,
// and reads its own tgid from the event the programs record for it.

// selfProbeWait bounds the wait for the probe's event: an agent outside the cgroup it
// guards (tests, an unusual deployment) is never seen, and then os.Getpid() stands.
const selfProbeWait = 300 * time.Millisecond

// agentTGID is the agent's tgid for the kernel's policy.
func (a *agent) agentTGID() uint32 {
	if t := a.kernelTGID.Load(); t != 0 {
		return t
	}
	return uint32(os.Getpid())
}

// learnKernelTGID runs the probe once the event reader runs, then lets the agent's own
// sockets register (they must not be judged under a wrong tgid).
func (a *agent) learnKernelTGID() {
	defer close(a.ownReady)
	// Only an agent inside the cgroup it guards has its own connects judged; outside it
	// (tests, an unusual deployment) there is nothing to learn and nothing to wait for.
	if !a.guardsItself() {
		return
	}
	tgid, err := a.selfProbe()
	switch {
	case err != nil:
		a.log.Debug().Err(err).Str("event", "self_probe_skipped").Msg("keeping os.Getpid() as the agent's tgid")
		return
	case tgid == uint32(os.Getpid()):
		return
	}
	a.kernelTGID.Store(tgid)
	a.log.Info().Str("event", "agent_pid_namespace").Int("pid", os.Getpid()).Uint32("kernel_tgid", tgid).
		Msg("the agent runs in a pid namespace of its own; the kernel knows it by another pid")
	if err := a.applyPolicy(true); err != nil {
		a.log.Error().Err(err).Str("event", "policy_update_failed").Msg("the kernel may judge the agent's own sockets as a client's")
	}
}

func (a *agent) selfProbe() (uint32, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer func() { _ = unix.Close(fd) }()
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return 0, err
	}
	a.probeCookie.Store(cookie)
	defer a.probeCookie.Store(0)
	ip := a.cfg.IMDS.Addr4
	if !ip.IsValid() {
		ip = netip.MustParseAddr("169.254.169.254")
	}
	sa := &unix.SockaddrInet4{Port: a.cfg.IMDS.Port, Addr: ip.As4()}
	// Whatever the verdict (redirected, refused, in progress), the connect hook has run
	// and recorded it by the time connect returns.
	_ = unix.Connect(fd, sa)
	select {
	case tgid := <-a.probeTGID:
		return tgid, nil
	case <-time.After(selfProbeWait):
		return 0, errors.New("the programs did not see the agent's probe (the agent is outside the cgroup it guards)")
	}
}

// guardsItself reports whether the agent's own cgroup (cgroup v2, as /proc/self/cgroup
// names it relative to the cgroup2 root) lies inside the guarded cgroup.
func (a *agent) guardsItself() bool {
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return true // cannot tell: probe, at the cost of a short wait
	}
	own := ""
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			own = rest
		}
	}
	rel, err := filepath.Rel(a.cgroupRoot, a.guardedDir)
	if err != nil {
		return true
	}
	guarded := strings.TrimSuffix("/"+strings.TrimPrefix(filepath.ToSlash(rel), "."), "/")
	return guarded == "" || own == guarded || strings.HasPrefix(own, guarded+"/")
}
