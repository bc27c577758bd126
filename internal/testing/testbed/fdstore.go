package testbed

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// FDStore plays systemd's part in an agent's restart: a NOTIFY_SOCKET that keeps the
// descriptors the agent sends with FDSTORE=1, for StartAgentFiles to hand to the next
// agent in LISTEN_FDS. Point NOTIFY_SOCKET at Socket before starting agents.
type FDStore struct {
	Socket string
	conn   *net.UnixConn
	mu     sync.Mutex
	files  []*os.File
}

// NewFDStore listens in dir.
func NewFDStore(dir string) (*FDStore, error) {
	sock := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("listen on notify socket: %w", err)
	}
	s := &FDStore{Socket: sock, conn: conn}
	go s.serve()
	return s, nil
}

func (s *FDStore) serve() {
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4*16))
	for {
		n, oobn, _, _, err := s.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
		var files []*os.File
		for _, m := range msgs {
			fds, _ := unix.ParseUnixRights(&m)
			for _, fd := range fds {
				files = append(files, os.NewFile(uintptr(fd), "stored"))
			}
		}
		if !strings.Contains(string(buf[:n]), "FDSTORE=1") {
			for _, f := range files {
				f.Close()
			}
			continue
		}
		// Every store names the same listeners (systemd keeps one copy of each).
		s.mu.Lock()
		for _, f := range s.files {
			f.Close()
		}
		s.files = files
		s.mu.Unlock()
	}
}

// Held returns the stored descriptors, for the next agent.
func (s *FDStore) Held() []*os.File {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*os.File(nil), s.files...)
}

// Close stops listening and closes what it holds.
func (s *FDStore) Close() {
	s.conn.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range s.files {
		f.Close()
	}
	s.files = nil
}
