package agent

import (
	"os"
	"runtime/debug"

	"github.com/rs/zerolog"
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
