package testbed

import (
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"syscall"
)

// Addresses of the container credential endpoints inside the bed, the same as on ECS
// and EKS hosts.
var (
	ECSAddr          = netip.MustParseAddr("169.254.170.2")
	PodIdentityV4    = netip.MustParseAddr("169.254.170.23")
	PodIdentityV6    = netip.MustParseAddr("fd00:ec2::23")
	containerRoutes  = []netip.Addr{IMDSv4, ECSAddr, PodIdentityV4}
	containerRoutes6 = []netip.Addr{IMDSv6, PodIdentityV6}
)

// ContainerNetns is a network namespace joined to the bed's by a veth pair, routed so
// that IMDS and the container credential endpoints are reachable from it the way a
// container on a bridge reaches the host's.
type ContainerNetns struct {
	Name string // ip netns name
	Path string // /run/netns/<Name>: for Placement.Netns and OCI specs
	// HostVeth is the veth end in the bed's namespace. It goes when the container's
	// namespace is freed (the kernel deletes a veth pair with either namespace).
	HostVeth string
	Addr     netip.Addr // the namespace's IPv4 address on its eth0

	bed      *Bed
	mu       sync.Mutex
	detached bool
}

// NewContainerNetns creates a network namespace for a container, with its lo up and an
// eth0 whose other end is in the bed's namespace: a /30 of its own in 169.254.96.0/19
// (link-local, only inside the bed), an IPv6 /64 of its own, and routes to IMDS and the
// ECS and Pod Identity addresses. Each call makes a new one; Close removes them all.
func (b *Bed) NewContainerNetns() (*ContainerNetns, error) {
	n := int(b.netnsSeq.Add(1)) // 1, 2, ...
	if n > 2000 {
		return nil, fmt.Errorf("container namespace %d: at most 2000 per bed", n)
	}
	ns := &ContainerNetns{Name: b.Name + "-c" + strconv.Itoa(n), HostVeth: "ctr" + strconv.Itoa(n), bed: b}
	ns.Path = "/run/netns/" + ns.Name
	if err := run("ip", "netns", "add", ns.Name); err != nil {
		return nil, fmt.Errorf("create container namespace: %w", err)
	}
	b.closers = append(b.closers, func() error { return ns.Detach() })
	// /30 number n: 169.254.96.0 + 4n.
	base := 96<<8 + 4*n
	host := netip.AddrFrom4([4]byte{169, 254, byte(base >> 8), byte(base&0xff) + 1})
	ns.Addr = netip.AddrFrom4([4]byte{169, 254, byte(base >> 8), byte(base&0xff) + 2})
	host6 := fmt.Sprintf("fd69:6d64:7367:%x::1", n)
	addr6 := fmt.Sprintf("fd69:6d64:7367:%x::2", n)
	steps := [][]string{
		{"-n", ns.Name, "link", "set", "lo", "up"},
		// Made directly in the two namespaces: the name only has to be unique in the bed's.
		{"-n", b.Name, "link", "add", ns.HostVeth, "type", "veth", "peer", "name", "eth0", "netns", ns.Name},
		{"-n", b.Name, "addr", "add", host.String() + "/30", "dev", ns.HostVeth},
		{"-n", b.Name, "-6", "addr", "add", host6 + "/64", "dev", ns.HostVeth, "nodad"},
		{"-n", b.Name, "link", "set", ns.HostVeth, "up"},
		{"-n", ns.Name, "addr", "add", ns.Addr.String() + "/30", "dev", "eth0"},
		{"-n", ns.Name, "-6", "addr", "add", addr6 + "/64", "dev", "eth0", "nodad"},
		{"-n", ns.Name, "link", "set", "eth0", "up"},
	}
	for _, a := range containerRoutes {
		steps = append(steps, []string{"-n", ns.Name, "route", "add", a.String() + "/32", "via", host.String()})
	}
	for _, a := range containerRoutes6 {
		steps = append(steps, []string{"-n", ns.Name, "-6", "route", "add", a.String() + "/128", "via", host6})
	}
	for _, args := range steps {
		if err := run("ip", args...); err != nil {
			return nil, fmt.Errorf("set up container namespace %s: %w", ns.Name, err)
		}
	}
	return ns, nil
}

// AddContainerNetns is NewContainerNetns for tests that need only the path.
func (b *Bed) AddContainerNetns() (string, error) {
	ns, err := b.NewContainerNetns()
	if err != nil {
		return "", err
	}
	return ns.Path, nil
}

// Detach removes the namespace's name (/run/netns/<Name>). The namespace itself lives
// on while a process, a socket or a reference the agent holds is in it; when the last
// goes the kernel frees it, and with it the veth pair. Detaching twice is a no-op.
func (ns *ContainerNetns) Detach() error {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	if ns.detached {
		return nil
	}
	ns.detached = true
	if err := run("ip", "netns", "del", ns.Name); err != nil {
		if _, statErr := os.Stat(ns.Path); os.IsNotExist(statErr) {
			return nil
		}
		return err
	}
	return nil
}

// Freed reports whether the namespace has been freed by the kernel: its veth end in
// the bed's namespace is gone.
func (ns *ContainerNetns) Freed() bool {
	return run("ip", "-n", ns.bed.Name, "link", "show", ns.HostVeth) != nil
}

// Inode is the namespace's inode number (as `ip netns`, lsns and the agent's status
// name it); 0 once it has been detached.
func (ns *ContainerNetns) Inode() uint64 {
	var st syscall.Stat_t
	if err := syscall.Stat(ns.Path, &st); err != nil {
		return 0
	}
	return st.Ino
}
