// Package procinfo enriches what the kernel recorded at connect time with what /proc
// still knows: the full command line, the executable's path as the host sees it, the
// user's name, the systemd unit and container of the cgroup, and what the container's
// runtime knows of it (package containers).
//
// It never overrides the kernel: a pid is only read from /proc after proving that it
// is still the same process (same start time and executable), so a reused pid cannot
// lend its identity to an exited one. What cannot be learnt is listed in Missing.
package procinfo

import (
	"bytes"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/imdsguard/imdsguard/internal/agent/containers"
)

// Process is what the kernel said about the process that connected.
type Process struct {
	PID           uint32
	StartBoottime uint64 // ns since boot
	UID           uint32
	CgroupID      uint64
	ExePath       string // as the kernel walked it; used when /proc is gone
	ExeDev        uint64 // user-space encoding
	ExeIno        uint64
}

// Info is the enrichment of one Process.
type Info struct {
	Exe         string
	Cmdline     []string
	User        string
	Cgroup      string // path below the cgroup2 root
	Unit        string
	ContainerID string
	// Container is the container whose cgroup (made by its runtime at the runtime's
	// place) holds the process, with what its runtime's state says; zero outside one.
	Container containers.Info
	// Missing names the fields that could not be learnt, e.g. "cmdline" when the
	// process had already exited.
	Missing []string
}

// CgroupPaths resolves cgroup ids to paths (cgroup.Paths).
type CgroupPaths interface {
	Lookup(id uint64) (string, bool)
}

// Resolver enriches processes, caching per process and per uid.
type Resolver struct {
	proc       string
	cgroups    CgroupPaths
	containers *containers.Resolver
	maxSize    int

	mu    sync.Mutex
	procs map[procKey]Info
	users map[uint32]string
}

type procKey struct {
	pid   uint32
	start uint64
	dev   uint64
	ino   uint64 // exec changes the executable but not the pid or start time
}

// NewResolver reads from the proc file system at procRoot ("/proc") and resolves cgroup
// ids with cgroups. At most maxEntries processes are cached.
func NewResolver(procRoot string, cgroups CgroupPaths, maxEntries int) *Resolver {
	return &Resolver{
		proc: procRoot, cgroups: cgroups, maxSize: maxEntries,
		procs: map[procKey]Info{}, users: map[uint32]string{},
	}
}

// WithContainers makes the resolver name containers from their runtimes' state.
func (r *Resolver) WithContainers(c *containers.Resolver) *Resolver {
	r.containers = c
	return r
}

// Resolve enriches p. It may block on /proc and on the user database, so it must not be
// called from the ring-buffer reader.
func (r *Resolver) Resolve(p Process) Info {
	key := procKey{p.PID, p.StartBoottime, p.ExeDev, p.ExeIno}
	r.mu.Lock()
	info, ok := r.procs[key]
	r.mu.Unlock()
	if ok {
		return clone(info)
	}
	info = r.resolve(p)
	// Cache only complete answers: a miss may be a race that the next event wins.
	if len(info.Missing) == 0 {
		r.mu.Lock()
		if len(r.procs) >= r.maxSize {
			// Crude but bounded: dropping everything costs one /proc read per process.
			clear(r.procs)
		}
		r.procs[key] = info
		r.mu.Unlock()
	}
	return clone(info)
}

func clone(i Info) Info {
	i.Cmdline = append([]string(nil), i.Cmdline...)
	i.Missing = append([]string(nil), i.Missing...)
	return i
}

func (r *Resolver) resolve(p Process) Info {
	var info Info
	info.User = r.userName(p.UID)
	if info.User == "" {
		info.Missing = append(info.Missing, "user")
	}
	if path, ok := r.cgroups.Lookup(p.CgroupID); ok {
		info.Cgroup = path
	}
	dir := filepath.Join(r.proc, strconv.FormatUint(uint64(p.PID), 10))
	alive := r.sameProcess(dir, p)
	if alive {
		if exe, err := os.Readlink(filepath.Join(dir, "exe")); err == nil {
			info.Exe = strings.TrimSuffix(exe, " (deleted)")
		}
		if raw, err := os.ReadFile(filepath.Join(dir, "cmdline")); err == nil && len(raw) > 0 {
			// Secrets out before anything can record them (redact.go).
			info.Cmdline = RedactCmdline(strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00"))
		}
		if info.Cgroup == "" {
			info.Cgroup = readCgroup(filepath.Join(dir, "cgroup"))
		}
	}
	if info.Exe == "" {
		info.Exe = p.ExePath // the kernel's view, true even after exit
	}
	if info.Exe == "" {
		info.Missing = append(info.Missing, "exe")
	}
	if info.Cmdline == nil {
		info.Missing = append(info.Missing, "cmdline")
	}
	if info.Cgroup == "" {
		info.Missing = append(info.Missing, "cgroup")
	}
	info.Unit = UnitFromCgroup(info.Cgroup)
	info.ContainerID = ContainerFromCgroup(info.Cgroup)
	if id, runtime, _ := containers.ContainerOf(info.Cgroup); id != "" {
		info.Container = containers.Info{ID: id, Runtime: runtime}
		if r.containers != nil {
			var found bool
			if info.Container, found = r.containers.Lookup(id, runtime); !found {
				// The runtime may not have written its state yet: not cached, asked again.
				info.Missing = append(info.Missing, "container")
			}
		}
	}
	return info
}

// sameProcess checks that /proc/<pid> is still the process the kernel reported: same
// start time, and same executable when the kernel recorded one.
func (r *Resolver) sameProcess(dir string, p Process) bool {
	stat, err := os.ReadFile(filepath.Join(dir, "stat"))
	if err != nil {
		return false
	}
	start, err := StartTicks(stat)
	if err != nil || start != p.StartBoottime/NsPerTick {
		return false
	}
	if p.ExeIno == 0 {
		return true
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dir, "exe"), &st); err != nil {
		return false
	}
	return st.Ino == p.ExeIno && st.Dev == p.ExeDev
}

// NsPerTick converts /proc clock ticks to nanoseconds: USER_HZ is 100 on every
// architecture imdsguard supports.
const NsPerTick = 1_000_000_000 / 100

// StartTicks returns field 22 (starttime, clock ticks since boot) of /proc/<pid>/stat.
// The command name in field 2 may contain spaces and parentheses, so fields are counted
// from the last ')'.
func StartTicks(stat []byte) (uint64, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse stat: no comm")
	}
	fields := strings.Fields(string(stat[i+1:]))
	// fields[0] is field 3 (state); starttime is field 22.
	if len(fields) < 20 {
		return 0, fmt.Errorf("parse stat: %d fields", len(fields)+2)
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

func readCgroup(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			return rest
		}
	}
	return ""
}

func (r *Resolver) userName(uid uint32) string {
	r.mu.Lock()
	name, ok := r.users[uid]
	r.mu.Unlock()
	if ok {
		return name
	}
	if u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10)); err == nil {
		name = u.Username
	}
	r.mu.Lock()
	r.users[uid] = name // remember misses too: a uid without a name stays nameless
	r.mu.Unlock()
	return name
}

// UnitFromCgroup returns the systemd unit that owns a cgroup path: the deepest
// component that is a service or scope ("/system.slice/sshd.service" → "sshd.service").
func UnitFromCgroup(path string) string {
	parts := strings.Split(path, "/")
	for i := len(parts) - 1; i >= 0; i-- {
		if strings.HasSuffix(parts[i], ".service") || strings.HasSuffix(parts[i], ".scope") {
			return parts[i]
		}
	}
	return ""
}

var containerID = regexp.MustCompile(`(?:^|[-/_:])([0-9a-f]{64})(?:\.scope)?$`)

// ContainerFromCgroup returns the 64-hex container id that Docker, containerd, CRI-O,
// podman and ECS put in a container's cgroup path, or "".
func ContainerFromCgroup(path string) string {
	parts := strings.Split(path, "/")
	for i := len(parts) - 1; i >= 0; i-- {
		if m := containerID.FindStringSubmatch(parts[i]); m != nil {
			return m[1]
		}
	}
	return ""
}
