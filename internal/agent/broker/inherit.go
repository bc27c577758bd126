package broker

import (
	"fmt"
	"net"
	"syscall"
)

// Adopt serves ln when it is one of the broker's own listeners handed over by an
// earlier agent (systemd's file descriptor store, LISTEN_FDS): a TCP listener on the
// broker's port at 127.0.0.1 or [::1]. Listen then binds only the families not adopted.
// It reports whether it took ln; the caller closes what it did not take.
func (b *Broker) Adopt(ln net.Listener) bool {
	addr, ok := ln.Addr().(*net.TCPAddr)
	if !ok || addr.Port != b.cfg.Port {
		return false
	}
	switch {
	case addr.IP.Equal(net.IPv4(127, 0, 0, 1)) && !b.ipv4:
		b.ipv4 = true
	case addr.IP.Equal(net.IPv6loopback) && !b.ipv6:
		b.ipv6 = true
	default:
		return false
	}
	b.log.Info().Str("event", "broker_listener_adopted").Str("addr", addr.String()).
		Msg("serving the listener an earlier agent left in the file descriptor store")
	b.Serve(ln)
	return true
}

// ListenerConns give the broker's listening sockets of the agent's own network namespace, for systemd's file descriptor
// store: held there, a listener outlives the agent, and a client that connects while the
// next agent starts waits in its backlog instead of being refused. (Not os.File: its Fd
// would put the shared socket in blocking mode, and Shutdown could not stop Accept.)
func (b *Broker) ListenerConns() ([]syscall.RawConn, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var conns []syscall.RawConn
	for _, l := range b.listeners {
		tl, ok := l.ln.(*net.TCPListener)
		if !ok || l.guest { // containers' listeners are served anew by the next agent
			continue
		}
		rc, err := tl.SyscallConn()
		if err != nil {
			return nil, fmt.Errorf("broker listener: %w", err)
		}
		conns = append(conns, rc)
	}
	return conns, nil
}
