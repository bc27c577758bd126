// Package sockdiag finds IMDS connections that were already open when the agent started:
// they were made before any hook was attached, so no hook saw them. The kernel's socket
// table (netlink sock_diag) lists them; /proc maps each socket to its process.
package sockdiag

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Conn is one open TCP connection to IMDS.
type Conn struct {
	PID   int // 0 when no process holds the socket (closing)
	UID   uint32
	Src   netip.AddrPort
	Dst   netip.AddrPort
	Inode uint32
}

// Existing lists established TCP connections to any of dsts in this network namespace.
func Existing(dsts []netip.AddrPort) ([]Conn, error) {
	var out []Conn
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := netlink.SocketDiagTCP(fam)
		if err != nil {
			return nil, fmt.Errorf("sock_diag: %w", err)
		}
		for _, s := range socks {
			if s.State != netlink.TCP_ESTABLISHED {
				continue
			}
			dst := addrPort(s.ID.Destination, s.ID.DestinationPort)
			if !matches(dst, dsts) {
				continue
			}
			out = append(out, Conn{UID: s.UID, Src: addrPort(s.ID.Source, s.ID.SourcePort), Dst: dst, Inode: s.INode})
		}
	}
	if len(out) == 0 {
		return nil, nil
	}
	owners := socketOwners("/proc")
	for i := range out {
		out[i].PID = owners[out[i].Inode]
	}
	return out, nil
}

// addrPort unmaps ::ffff:a.b.c.d: a dual-stack socket's IPv4 peer is IPv4.
func addrPort(ip net.IP, port uint16) netip.AddrPort {
	a, _ := netip.AddrFromSlice(ip)
	return netip.AddrPortFrom(a.Unmap(), port)
}

func matches(dst netip.AddrPort, dsts []netip.AddrPort) bool {
	for _, d := range dsts {
		if dst.Port() == d.Port() && dst.Addr().Unmap() == d.Addr().Unmap() {
			return true
		}
	}
	return false
}

// socketOwners maps socket inodes to the pid of a process holding them.
func socketOwners(proc string) map[uint32]int {
	owners := map[uint32]int{}
	pids, _ := os.ReadDir(proc)
	for _, p := range pids {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		fds, err := os.ReadDir(filepath.Join(proc, p.Name(), "fd"))
		if err != nil {
			continue
		}
		for _, fd := range fds {
			link, err := os.Readlink(filepath.Join(proc, p.Name(), "fd", fd.Name()))
			if err != nil || !strings.HasPrefix(link, "socket:[") {
				continue
			}
			ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 32)
			if err == nil {
				owners[uint32(ino)] = pid
			}
		}
	}
	return owners
}
