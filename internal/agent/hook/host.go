package hook

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// EnsureBPFFS makes sure pinDir can hold pins: it must be below a bpf file system. The
// conventional /sys/fs/bpf is mounted when missing, as systemd does on most hosts.
func EnsureBPFFS(pinDir string) error {
	pinDir = filepath.Clean(pinDir)
	if strings.HasPrefix(pinDir+"/", "/sys/fs/bpf/") {
		if isBPFFS("/sys/fs/bpf") {
			return nil
		}
		if err := os.MkdirAll("/sys/fs/bpf", 0o700); err != nil {
			return fmt.Errorf("create /sys/fs/bpf: %w", err)
		}
		if err := unix.Mount("bpf", "/sys/fs/bpf", "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("mount bpffs at /sys/fs/bpf: %w", err)
		}
		return nil
	}
	dir := pinDir
	for {
		if _, err := os.Stat(dir); err == nil || dir == "/" {
			break
		}
		dir = filepath.Dir(dir)
	}
	if !isBPFFS(dir) {
		return fmt.Errorf("pin_path %s is not on a bpf file system (use /sys/fs/bpf/...)", pinDir)
	}
	return nil
}

func isBPFFS(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == unix.BPF_FS_MAGIC
}

// OwnNetnsCookie returns the cookie of this process's network namespace, the one the
// kernel compares against to decide whether a connection may be redirected to the broker.
func OwnNetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("netns cookie: %w", err)
	}
	defer func() { _ = unix.Close(fd) }()
	// SO_NETNS_COOKIE (71) needs Linux 5.14.
	v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("read netns cookie (SO_NETNS_COOKIE needs Linux 5.14+): %w", err)
	}
	return v, nil
}
