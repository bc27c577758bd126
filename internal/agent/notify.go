package agent

import (
	"os"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// notifier speaks systemd's notify protocol (Type=notify): STATUS while the agent works,
// READY=1 only once the programs are attached with the policy in the kernel, so that
// units ordered after imdsguard (network-pre.target, cloud-init, every workload) start
// guarded, and WATCHDOG=1 from the loop that beats the kernel's heartbeat, so that a
// wedged agent is restarted. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
type notifier struct {
	log      zerolog.Logger
	watchdog time.Duration // 0: systemd asked for no watchdog
	lastPet  time.Time
}

func newNotifier(log zerolog.Logger) *notifier {
	n := &notifier{log: log}
	if d, err := daemon.SdWatchdogEnabled(false); err == nil {
		n.watchdog = d
	}
	return n
}

func (n *notifier) send(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		// Not fatal: the guard works without systemd hearing about it, but say so once
		// per call site rather than silently.
		n.log.Warn().Err(err).Str("event", "sd_notify_failed").Str("state", state).Msg("could not tell systemd")
	}
}

func (n *notifier) status(s string) { n.send("STATUS=" + s) }

func (n *notifier) ready() { n.send(daemon.SdNotifyReady + "\nSTATUS=guarding IMDS") }

func (n *notifier) stopping() {
	n.send(daemon.SdNotifyStopping + "\nSTATUS=stopping; pinned programs keep guarding")
}

// alive pets the watchdog after a successful heartbeat, about four times a watchdog period.
func (n *notifier) alive(now time.Time) {
	if n.watchdog == 0 || now.Sub(n.lastPet) < n.watchdog/4 {
		return
	}
	n.lastPet = now
	n.send(daemon.SdNotifyWatchdog)
}

// fdStoreName names the broker's listeners in systemd's file descriptor store.
const fdStoreName = "broker"

// storeFDs hands descriptors to systemd's file descriptor store (FDSTORE=1), which gives
// them back to the next start of the unit in LISTEN_FDS: the broker's listeners outlive
// a restart. go-systemd's SdNotify cannot pass descriptors, hence the datagram by hand.
// Outside systemd it is a no-op.
func (n *notifier) storeFDs(name string, fds []int) {
	if len(fds) == 0 {
		return
	}
	n.sendRights("FDSTORE=1\nFDNAME="+name, unix.UnixRights(fds...))
}

// forgetFiles empties the store of name (an uninstall: the next agent binds afresh).
func (n *notifier) forgetFiles(name string) {
	n.sendRights("FDSTOREREMOVE=1\nFDNAME="+name, nil)
}

func (n *notifier) sendRights(state string, oob []byte) {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return
	}
	// x/sys/unix reads a leading '@' as the abstract namespace, as systemd means it.
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err == nil {
		err = unix.Sendmsg(fd, []byte(state), oob, &unix.SockaddrUnix{Name: addr}, 0)
		_ = unix.Close(fd)
	}
	if err != nil {
		n.log.Warn().Err(err).Str("event", "sd_notify_failed").Str("state", state).Msg("could not tell systemd")
	}
}
