// Command hostile is the test bed's local attacker: the probes of the security review
// (issue 11), each a few lines, so that every defence is proven against the attack it
// stops. It only ever talks to addresses inside the bed's network namespace.
//
//	hostile mark MARK ADDR:PORT          set SO_MARK=MARK on a socket, connect to ADDR:PORT,
//	                                     ask for the role's credentials, print the answer
//	hostile squat ADDR:PORT              listen on ADDR:PORT first; print "listening" (exit 3
//	                                     when the bind is refused) and answer every request
//	                                     with forged credentials until killed
//	hostile from SRC:PORT ADDR:PORT      bind SRC:PORT (SO_REUSEADDR), connect to ADDR:PORT,
//	                                     print "connected", ask for the role's credentials,
//	                                     print the answer
//	hostile flood udp|tcp ADDR:PORT DUR  connect() to ADDR:PORT from new sockets as fast as
//	                                     possible for DUR (IPv4); print "flooding", then
//	                                     "attempts N refused M" (ECONNREFUSED or EPERM)
//	hostile rawsyn ADDR:PORT             send a hand-built TCP SYN to ADDR:PORT (IPv4) from
//	                                     an IPPROTO_RAW socket (IP_HDRINCL: no connect hook
//	                                     runs), from ADDR itself; print "answered" when a
//	                                     SYN-ACK or RST comes back within 2 s (exit 0), else
//	                                     "no answer" (exit 7). Needs CAP_NET_RAW.
//
// Exit codes: 0 answered, 7 could not connect (as curl), 3 could not bind, 1 other.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"time"
)

// credsPath is what every probe asks for: the bed's role credentials.
const credsPath = "/latest/meta-data/iam/security-credentials/baskinc-role"

// Forged is what a squatter answers: a test that finds it in a client's output has
// proven the client reached the squatter.
const Forged = `{"Code":"Success","AccessKeyId":"FORGEDFORGEDFORGED","SecretAccessKey":"forged","Token":"forged"}`

func main() {
	code, err := run(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "hostile:", err)
	}
	os.Exit(code)
}

func run(args []string) (int, error) {
	if len(args) < 2 {
		return 1, errors.New("usage: hostile mark|squat|from ARGS")
	}
	switch args[0] {
	case "mark":
		if len(args) != 3 {
			return 1, fmt.Errorf("usage: hostile mark MARK ADDR:PORT")
		}
		mark, err := strconv.ParseUint(args[1], 0, 32)
		if err != nil {
			return 1, fmt.Errorf("mark %q: %w", args[1], err)
		}
		return fetch(args[2], "", func(fd int) error {
			return syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_MARK, int(mark))
		})
	case "squat":
		return squat(args[1])
	case "flood":
		if len(args) != 4 {
			return 1, fmt.Errorf("usage: hostile flood udp|tcp ADDR:PORT DURATION")
		}
		return flood(args[1], args[2], args[3])
	case "rawsyn":
		return rawSYN(args[1])
	case "from":
		if len(args) != 3 {
			return 1, fmt.Errorf("usage: hostile from SRC:PORT ADDR:PORT")
		}
		return fetch(args[2], args[1], func(fd int) error {
			return syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
		})
	}
	return 1, fmt.Errorf("unknown probe %q", args[0])
}

// fetch connects to addr (from src when set) with setup applied to the socket, asks for
// the credentials and prints what came back.
func fetch(addr, src string, setup func(fd int) error) (int, error) {
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) { serr = setup(int(fd)) }); err != nil {
			return err
		}
		return serr
	}}
	if src != "" {
		la, err := net.ResolveTCPAddr("tcp", src)
		if err != nil {
			return 1, fmt.Errorf("source %q: %w", src, err)
		}
		d.LocalAddr = la
	}
	conn, err := d.DialContext(context.Background(), "tcp", addr)
	if err != nil {
		return 7, fmt.Errorf("connect %s: %w", addr, err)
	}
	defer conn.Close()
	fmt.Println("connected")
	_ = conn.SetDeadline(time.Now().Add(8 * time.Second))
	if _, err := fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n", credsPath); err != nil {
		return 1, fmt.Errorf("send: %w", err)
	}
	answer, err := io.ReadAll(conn)
	os.Stdout.Write(answer)
	if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		return 1, fmt.Errorf("read: %w", err)
	}
	return 0, nil
}

// squat listens on addr and answers everything with forged credentials.
func squat(addr string) (int, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return 3, fmt.Errorf("listen %s: %w", addr, err)
	}
	fmt.Println("listening")
	for {
		c, err := ln.Accept()
		if err != nil {
			return 1, fmt.Errorf("accept: %w", err)
		}
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 4096)
			_, _ = c.Read(buf)
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(Forged), Forged)
		}()
	}
}

// flood connects to addr from a new socket each time, as fast as it can for dur: the
// review's 257,000 refused UDP connects in 2 s.
func flood(proto, addr, dur string) (int, error) {
	typ := syscall.SOCK_DGRAM
	switch proto {
	case "udp":
	case "tcp":
		typ = syscall.SOCK_STREAM
	default:
		return 1, fmt.Errorf("flood: protocol %q, want udp or tcp", proto)
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().Is4() {
		return 1, fmt.Errorf("flood: address %q: want IPv4 ADDR:PORT", addr)
	}
	d, err := time.ParseDuration(dur)
	if err != nil {
		return 1, fmt.Errorf("flood: duration %q: %w", dur, err)
	}
	sa := &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	fmt.Println("flooding")
	var attempts, refused int
	for end := time.Now().Add(d); time.Now().Before(end); {
		for range 256 {
			fd, err := syscall.Socket(syscall.AF_INET, typ|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, 0)
			if err != nil {
				return 1, fmt.Errorf("flood: socket: %w", err)
			}
			attempts++
			err = syscall.Connect(fd, sa)
			if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPERM) {
				refused++
			}
			syscall.Close(fd)
		}
	}
	fmt.Printf("attempts %d refused %d\n", attempts, refused)
	return 0, nil
}
