package agent

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// control is the agent's local command socket (root only): `imdsguard reload` talks to
// it and gets the outcome back, unlike a bare SIGHUP.
type control struct {
	ln     net.Listener
	reload chan chan error
}

func (a *agent) serveControl() (*control, error) {
	c := &control{reload: make(chan chan error)}
	path := a.cfg.ControlSocket
	if path == "" {
		return c, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create control socket directory: %w", err)
	}
	_ = os.Remove(path) // a stale socket of a dead agent
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod control socket: %w", err)
	}
	c.ln = ln
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go c.handle(conn)
		}
	}()
	return c, nil
}

func (c *control) handle(conn net.Conn) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second)) // a stuck peer then fails the read
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return
	}
	switch strings.TrimSpace(line) {
	case "reload":
		done := make(chan error, 1)
		select {
		case c.reload <- done:
		case <-time.After(10 * time.Second):
			fmt.Fprintln(conn, "error: agent busy")
			return
		}
		if err := <-done; err != nil {
			fmt.Fprintf(conn, "error: %v\n", err)
			return
		}
		fmt.Fprintln(conn, "ok")
	default:
		fmt.Fprintln(conn, "error: unknown command")
	}
}

func (c *control) Close() error {
	if c.ln == nil {
		return nil
	}
	return c.ln.Close()
}

// Reload asks the agent listening on path to reload its configuration.
func Reload(path string) error {
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return fmt.Errorf("reach the agent at %s (is it running?): %w", path, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second)) // a stuck peer then fails the read
	if _, err := fmt.Fprintln(conn, "reload"); err != nil {
		return fmt.Errorf("send reload: %w", err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read answer: %w", err)
	}
	line = strings.TrimSpace(line)
	if line != "ok" {
		return errors.New(strings.TrimPrefix(line, "error: "))
	}
	return nil
}
