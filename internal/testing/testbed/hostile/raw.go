package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"syscall"
	"time"
)

// rawSYN sends one TCP SYN to addr from a raw socket that builds the IP header itself
// (IPPROTO_RAW), so that no connect() and so no connect hook is involved, and waits for
// the answer a listener's kernel gives (SYN-ACK) or a closed port's (RST). The source is
// addr itself: in the bed's network namespace IMDS's address is local, so the answer
// comes back over loopback.
func rawSYN(addr string) (int, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().Is4() {
		return 1, fmt.Errorf("rawsyn: address %q: want IPv4 ADDR:PORT", addr)
	}
	// Every TCP packet the host receives, to find the answer among them.
	rx, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW|syscall.SOCK_CLOEXEC, syscall.IPPROTO_TCP)
	if err != nil {
		return 1, fmt.Errorf("rawsyn: receive socket: %w", err)
	}
	defer syscall.Close(rx)
	tv := syscall.NsecToTimeval(int64(200 * time.Millisecond))
	if err := syscall.SetsockoptTimeval(rx, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		return 1, fmt.Errorf("rawsyn: receive timeout: %w", err)
	}
	tx, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW|syscall.SOCK_CLOEXEC, syscall.IPPROTO_RAW)
	if err != nil {
		return 1, fmt.Errorf("rawsyn: send socket: %w", err)
	}
	defer syscall.Close(tx)

	ip := ap.Addr().As4()
	sport := uint16(20000 + rand.IntN(20000))
	pkt := synPacket(ip, ip, sport, ap.Port(), rand.Uint32())
	if err := syscall.Sendto(tx, pkt, 0, &syscall.SockaddrInet4{Addr: ip}); err != nil {
		if errors.Is(err, syscall.EPERM) {
			fmt.Println("no answer (send refused)")
			return 7, nil
		}
		return 1, fmt.Errorf("rawsyn: send: %w", err)
	}
	buf := make([]byte, 1500)
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); {
		n, _, err := syscall.Recvfrom(rx, buf, 0)
		if err != nil {
			continue // the receive timeout: look at the clock again
		}
		p := buf[:n]
		if n < 20 || int(p[0]&0xf)*4+14 > n {
			continue
		}
		tcp := p[int(p[0]&0xf)*4:]
		if [4]byte(p[12:16]) != ip || binary.BigEndian.Uint16(tcp[0:]) != ap.Port() || binary.BigEndian.Uint16(tcp[2:]) != sport {
			continue // not the answer to our SYN (our own SYN, looped back, among them)
		}
		fmt.Printf("answered flags=%#x\n", tcp[13])
		return 0, nil
	}
	fmt.Println("no answer")
	return 7, nil
}

// synPacket is an IPv4 header and a TCP SYN with no options, checksums filled in.
func synPacket(src, dst [4]byte, sport, dport uint16, seq uint32) []byte {
	p := make([]byte, 40)
	p[0] = 0x45                           // version 4, 5 words
	binary.BigEndian.PutUint16(p[2:], 40) // total length
	binary.BigEndian.PutUint16(p[4:], 1)  // id
	p[8] = 64                             // ttl
	p[9] = syscall.IPPROTO_TCP            // protocol
	copy(p[12:16], src[:])
	copy(p[16:20], dst[:])
	binary.BigEndian.PutUint16(p[10:], checksum(p[:20], 0))
	t := p[20:]
	binary.BigEndian.PutUint16(t[0:], sport)
	binary.BigEndian.PutUint16(t[2:], dport)
	binary.BigEndian.PutUint32(t[4:], seq)
	t[12] = 5 << 4                            // data offset
	t[13] = 0x02                              // SYN
	binary.BigEndian.PutUint16(t[14:], 65535) // window
	// Pseudo-header: addresses, protocol, TCP length.
	var sum uint32
	for _, w := range [][]byte{src[:], dst[:]} {
		sum += uint32(binary.BigEndian.Uint16(w)) + uint32(binary.BigEndian.Uint16(w[2:]))
	}
	sum += syscall.IPPROTO_TCP + 20
	binary.BigEndian.PutUint16(t[16:], checksum(t, sum))
	return p
}

func checksum(b []byte, sum uint32) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
