package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// nsListeners are the broker's listeners made in one namespace.
type nsListeners struct {
	ln4, ln6 net.Listener
	cookie   uint64   // the namespace's, read from a listener
	taken    []string // addresses another process holds
}

func (l nsListeners) listeners() []net.Listener {
	var out []net.Listener
	for _, ln := range []net.Listener{l.ln4, l.ln6} {
		if ln != nil {
			out = append(out, ln)
		}
	}
	return out
}

// listenIn creates the broker's listeners inside the network namespace nsfd. It runs on
// a goroutine of its own, locked to its OS thread, which enters the namespace, listens
// and returns to the namespace it came from. A thread that cannot return is never
// unlocked: the goroutine ends locked, so the runtime kills the thread rather than run
// other goroutines in a container's namespace.
func listenIn(nsfd, port int) (nsListeners, error) {
	type result struct {
		ls  nsListeners
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		ls, err := enterAndListen(nsfd, port)
		if !errors.Is(err, errThreadTainted) {
			runtime.UnlockOSThread()
		}
		done <- result{ls, err}
	}()
	r := <-done
	return r.ls, r.err
}

// enterAndListen runs on a locked thread.
func enterAndListen(nsfd, port int) (ls nsListeners, err error) {
	self, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return ls, fmt.Errorf("open own network namespace: %w", err)
	}
	defer closeFD(self)
	if err := unix.Setns(nsfd, unix.CLONE_NEWNET); err != nil {
		if errors.Is(err, unix.EPERM) {
			return ls, fmt.Errorf("%w: setns: %v", ErrNotPermitted, err)
		}
		return ls, fmt.Errorf("enter network namespace: %w", err)
	}
	defer func() {
		if rerr := unix.Setns(self, unix.CLONE_NEWNET); rerr != nil {
			for _, ln := range ls.listeners() {
				ln.Close()
			}
			ls, err = nsListeners{}, fmt.Errorf("%w: %v", errThreadTainted, rerr)
		}
	}()
	// Bound with IP_FREEBIND/IPV6_FREEBIND: a namespace is often served while the
	// runtime is still setting it up (the kernel reports its first socket, which is
	// runc's netlink socket that brings lo up), before lo has 127.0.0.1 and ::1.
	// Waiting for lo lost the race with a container that connects as it starts; a
	// listener bound early is there the moment lo comes up, and until then nothing in
	// the namespace reaches 127.0.0.1 anyway. A port another process holds is still
	// refused (EADDRINUSE): FREEBIND relaxes only the address check.
	lc := net.ListenConfig{Control: func(network, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if network == "tcp6" {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_FREEBIND, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_FREEBIND, 1)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	for _, fam := range []struct {
		network, host string
		ln            *net.Listener
	}{{"tcp4", "127.0.0.1", &ls.ln4}, {"tcp6", "::1", &ls.ln6}} {
		addr := net.JoinHostPort(fam.host, strconv.Itoa(port))
		ln, err := lc.Listen(context.Background(), fam.network, addr)
		switch {
		case errors.Is(err, syscall.EADDRINUSE):
			ls.taken = append(ls.taken, addr)
			continue
		case errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT):
			continue // no loopback address of this family (IPv6 disabled)
		case err != nil:
			for _, l := range ls.listeners() {
				l.Close()
			}
			return nsListeners{}, fmt.Errorf("listen on %s in the namespace: %w", addr, err)
		}
		*fam.ln = ln
	}
	for _, ln := range ls.listeners() {
		c, err := listenerCookie(ln)
		if err != nil {
			for _, l := range ls.listeners() {
				l.Close()
			}
			return nsListeners{}, err
		}
		ls.cookie = c
	}
	return ls, nil
}

// listenerCookie reads the cookie of a listener's network namespace (Linux 5.14+).
func listenerCookie(ln net.Listener) (uint64, error) {
	rc, err := ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("listener: %w", err)
	}
	var cookie uint64
	var serr error
	if err := rc.Control(func(fd uintptr) {
		cookie, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	}); err != nil {
		return 0, fmt.Errorf("listener: %w", err)
	}
	if serr != nil {
		return 0, fmt.Errorf("read netns cookie (SO_NETNS_COOKIE needs Linux 5.14+): %w", serr)
	}
	return cookie, nil
}
