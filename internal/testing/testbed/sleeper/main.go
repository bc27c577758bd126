// Command sleeper sleeps until killed: the process that keeps a test container (or a
// network namespace of the benchmarks) alive. It is static, so a container of one file
// can run it.
package main

import "time"

func main() { time.Sleep(100 * 365 * 24 * time.Hour) }
