package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// procCost is what a process has spent so far: CPU time and how often its threads were
// switched out. Read before and after a load run, the difference divided by the
// requests says where a request's time goes: a broker that costs little CPU but many
// wake-ups is bound by the scheduler, not by its own code.
type procCost struct {
	cpu      time.Duration
	switches int64
}

// readCost sums the context switches of every thread of pid and its CPU time
// (utime+stime, which include threads already gone).
func readCost(pid int) (procCost, error) {
	var c procCost
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return c, err
	}
	// Fields after the command name, which may contain spaces, start after ") ".
	i := bytes.LastIndexByte(stat, ')')
	f := strings.Fields(string(stat[i+2:]))
	if len(f) < 13 {
		return c, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	c.cpu = time.Duration(utime+stime) * time.Second / 100 // USER_HZ
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	if err != nil {
		return c, err
	}
	for _, t := range tasks {
		fh, err := os.Open(t)
		if err != nil {
			continue // the thread exited
		}
		s := bufio.NewScanner(fh)
		for s.Scan() {
			k, v, ok := strings.Cut(s.Text(), ":")
			if ok && (k == "voluntary_ctxt_switches" || k == "nonvoluntary_ctxt_switches") {
				n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				c.switches += n
			}
		}
		_ = fh.Close()
	}
	return c, nil
}

func (c procCost) sub(o procCost) procCost {
	return procCost{cpu: c.cpu - o.cpu, switches: c.switches - o.switches}
}

// perRequest formats a cost spread over n requests.
func (c procCost) perRequest(n int) string {
	return fmt.Sprintf("%.1f µs CPU, %.2f switches", float64(c.cpu.Microseconds())/float64(n), float64(c.switches)/float64(n))
}

// perfTop records the agent's call stacks with perf for the length of one load run and
// returns the report's top symbols, or "" when perf is not installed or refuses.
func perfTop(ctx context.Context, pid int, load func() error) (string, error) {
	perf, err := exec.LookPath("perf")
	if err != nil {
		return "", load()
	}
	data, err := os.CreateTemp("", "imdsguard-bench-*.perf")
	if err != nil {
		return "", err
	}
	_ = data.Close()
	defer func() { _ = os.Remove(data.Name()) }()
	rec := exec.CommandContext(ctx, perf, "record", "-q", "-g", "-p", strconv.Itoa(pid), "-o", data.Name())
	if err := rec.Start(); err != nil {
		return "", load()
	}
	time.Sleep(200 * time.Millisecond) // perf attaches before the load starts
	lerr := load()
	_ = rec.Process.Signal(os.Interrupt)
	_ = rec.Wait()
	if lerr != nil {
		return "", lerr
	}
	out, err := exec.CommandContext(ctx, perf, "report", "-i", data.Name(), "--stdio", "--children",
		"--sort", "symbol", "--percent-limit", "2", "-g", "none").Output()
	if err != nil {
		return "", nil
	}
	var top []string
	for _, l := range strings.Split(string(out), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			top = append(top, "     "+l)
		}
		if len(top) == 25 {
			break
		}
	}
	return strings.Join(top, "\n"), nil
}
