package netns

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// maxScan bounds the /proc entries looked at for another process of a namespace whose
// watched process exited: a scan costs a readlink per process, once per exit.
const maxScan = 1 << 17

// watch waits, in one goroutine for every namespace, for the watched processes to
// exit (a pidfd polls readable when its process has exited).
func (m *Manager) watch() {
	defer close(m.loopDone)
	evs := make([]unix.EpollEvent, 64)
	for {
		n, err := unix.EpollWait(m.epfd, evs, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			m.log.Error().Err(err).Str("event", "netns_watch_failed").Msg("no longer watching namespaces' processes")
			return
		}
		for _, ev := range evs[:n] {
			fd := int(ev.Fd)
			if fd == m.wakefd {
				return // Close
			}
			m.mu.Lock()
			ep := m.byPidfd[fd]
			m.mu.Unlock()
			if ep != nil {
				m.exited(ep)
			}
		}
	}
}

// exited handles the exit of the process an endpoint watches: another process still in
// the namespace is adopted, or the endpoint goes.
func (m *Manager) exited(ep *endpoint) {
	pid, pidfd, err := m.findProcess(ep.Inode, ep.PID)
	if err != nil {
		m.log.Warn().Err(err).Str("event", "netns_scan_failed").Uint64("netns", ep.Cookie).Msg("looking for a process in a network namespace")
	}
	if pidfd < 0 {
		m.remove(ep, "last_process_exited")
		return
	}
	m.mu.Lock()
	if m.byCookie[ep.Cookie] != ep || m.closed {
		m.mu.Unlock()
		_ = unix.Close(pidfd)
		return
	}
	old := ep.pidfd
	delete(m.byPidfd, old)
	ep.pidfd, ep.PID = pidfd, pid
	m.byPidfd[pidfd] = ep
	m.mu.Unlock()
	_ = unix.EpollCtl(m.epfd, unix.EPOLL_CTL_DEL, old, nil)
	_ = unix.Close(old)
	if err := unix.EpollCtl(m.epfd, unix.EPOLL_CTL_ADD, pidfd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(pidfd)}); err != nil {
		m.log.Error().Err(err).Str("event", "netns_watch_failed").Uint64("netns", ep.Cookie).Msg("cannot watch the namespace's process: removing its endpoint")
		m.remove(ep, "watch_failed")
		return
	}
	m.log.Debug().Str("event", "netns_process_adopted").Uint64("netns", ep.Cookie).Int("pid", pid).Msg("watching another process of a served namespace")
}

// findProcess looks, through at most maxScan entries of /proc, for a live process in
// the network namespace of inode other than exclude, and returns its pid and a pidfd
// (-1: none found).
func (m *Manager) findProcess(inode uint64, exclude int) (int, int, error) {
	want := "net:[" + strconv.FormatUint(inode, 10) + "]"
	dir, err := os.Open(m.cfg.Proc)
	if err != nil {
		return 0, -1, fmt.Errorf("open %s: %w", m.cfg.Proc, err)
	}
	defer dir.Close()
	seen := 0
	for seen < maxScan {
		names, err := dir.Readdirnames(1024)
		if err == io.EOF {
			return 0, -1, nil
		}
		if err != nil {
			return 0, -1, fmt.Errorf("read %s: %w", m.cfg.Proc, err)
		}
		for _, name := range names {
			seen++
			pid, err := strconv.Atoi(name)
			if err != nil || pid == exclude {
				continue
			}
			link := filepath.Join(m.cfg.Proc, name, "ns/net")
			if l, err := os.Readlink(link); err != nil || l != want {
				continue
			}
			pidfd, err := unix.PidfdOpen(pid, 0)
			if err != nil {
				continue // gone meanwhile
			}
			// Checked again with the pidfd held, and the process still alive: the pid
			// was not reused by a process of another namespace in between.
			l, err := os.Readlink(link)
			if err == nil && l == want && alive(pidfd) {
				return pid, pidfd, nil
			}
			_ = unix.Close(pidfd)
		}
	}
	return 0, -1, fmt.Errorf("no process of the namespace among the first %d entries of %s", maxScan, m.cfg.Proc)
}
