package agent

import (
	"os"
	"runtime/debug"

	"github.com/rs/zerolog"
)

// memoryLimit is the Go runtime's soft memory limit the agent runs under unless
// GOMEMLIMIT says otherwise. Without one, an event flood grows the heap to twice its
// live size (GOGC=100) before each collection, and the agent peaked at 31-34 MB; with it,
// the collector runs earlier once the agent nears 16 MiB of Go memory and the peak stays
// near 26 MB (docs/performance.md). 12 MiB was too tight: it held the heap goal at 3 MB
// and the collector ran every few requests. The limit is soft: a live heap above it is
// never refused, the runtime caps the collector at half the CPU and lets the heap grow.
const memoryLimit = 16 << 20

// setMemoryLimit applies memoryLimit unless the operator chose one with GOMEMLIMIT
// (the runtime has already read it then).
func setMemoryLimit(log zerolog.Logger) {
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	debug.SetMemoryLimit(memoryLimit)
	log.Debug().Int64("memory_limit_bytes", memoryLimit).Msg("go soft memory limit set")
}
