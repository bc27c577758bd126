package agent

import (
	"fmt"
	"os"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// memoryLimit is the Go runtime's soft memory limit the agent runs under unless
// GOMEMLIMIT says otherwise. Without one, an event flood grows the heap to twice its
// live size (GOGC=100) before each collection, and the agent peaked at 31-34 MB; with it,
// the collector runs earlier once the agent nears the limit of Go memory and the peak
// stays near 29 MB (docs/performance.md). 16 MiB was too tight once the live heap
// reached 7 MB: the runtime's other memory (spans, metadata) took the rest, the heap
// goal sat at the live heap, and the collector ran every 8 ms under broker load (2,500
// collections in 25 s, half the agent's CPU: a new connection through the broker cost
// the agent 2.1 ms of CPU instead of 0.4 ms). The limit is soft: a live heap above it is
// never refused, the runtime caps the collector at half the CPU and lets the heap grow.
const memoryLimit = 20 << 20

// setMemoryLimit applies memoryLimit unless the operator chose one with GOMEMLIMIT
// (the runtime has already read it then).
func setMemoryLimit(log zerolog.Logger) {
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	debug.SetMemoryLimit(memoryLimit)
	log.Debug().Int64("memory_limit_bytes", memoryLimit).Msg("go soft memory limit set")
}

// dropStartupPages asks the kernel to reclaim the pages of the agent's own executable
// that start-up brought in (package initialisation of every linked library, the
// loader, the first policy resolution) and that running never touches again. The
// kernel maps a binary's pages in by 64 KiB windows around each fault, so start-up
// leaves nearly the whole 15 MB binary resident, most of it never used again; what
// the agent uses afterwards faults back in from the page cache or the disk. Failure
// changes nothing but the agent's resident size (a kernel before 5.4 has no
// MADV_PAGEOUT).
func dropStartupPages() (dropped int, err error) {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, err
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(maps), "\n") {
		f := strings.Fields(line)
		// start-end perms offset dev inode path; only the read-only or executable,
		// file-backed mappings of our binary: its writable data is not the file's.
		if len(f) < 6 || f[5] != exe || strings.Contains(f[1], "w") {
			continue
		}
		start, end, ok := strings.Cut(f[0], "-")
		if !ok {
			continue
		}
		s, err1 := strconv.ParseUint(start, 16, 64)
		e, err2 := strconv.ParseUint(end, 16, 64)
		if err1 != nil || err2 != nil || e <= s {
			continue
		}
		if _, _, errno := unix.Syscall(unix.SYS_MADVISE, uintptr(s), uintptr(e-s), unix.MADV_PAGEOUT); errno != 0 {
			return dropped, fmt.Errorf("madvise %s: %w", f[0], errno)
		}
		dropped++
	}
	return dropped, nil
}
